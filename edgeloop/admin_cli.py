"""``edgeloop admin``: the operator's side of a running server from a shell (no torch needed).

``publish BUNDLE`` uploads a signed bundle; ``devices`` lists the fleet with its counters; ``round start KIND``
queues a distillation or federated round (``--wait`` follows it to the end); ``round status ID`` reports one.
Every subcommand talks to :class:`edgeloop.admin.AdminClient` over the same channel options as ``edgeloop
agent`` (TLS, mutual TLS) with the server's admin token. Exit status: 0 on success, 1 when the round reported or
followed failed, 2 on an error — a bad argument, an unreachable server, a refused call (one line naming the gRPC
status and the server's reason) or a round still running after ``--wait-timeout``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROUND_KINDS = ("distill", "fedavg")
"""What ``round start`` may ask for (the server's ``StartRound`` kinds)."""


class AdminCommandError(RuntimeError):
    """An admin subcommand could not do what was asked; the message says why (printed as one line)."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``admin`` subcommand's parser (its own subcommands under ``admin_command``)."""
    p = sub.add_parser(
        "admin", help="operate a running server: publish a bundle, list devices, start and follow rounds",
        description="Operate a running edgeloop server through its admin service. Exit status 0 on success, 1 "
        "when the round reported or followed failed, 2 on an error (a bad argument, an unreachable server, a "
        "refused call, a round still running after --wait-timeout).")
    _add_connection(p, leaf=False)
    commands = p.add_subparsers(dest="admin_command", metavar="SUBCOMMAND", required=True)

    pub = commands.add_parser("publish", help="upload a signed bundle; print the id the server gave it")
    _add_connection(pub, leaf=True)
    pub.add_argument("bundle", type=Path, help="bundle directory (manifest.json, manifest.sig and its files)")

    _add_connection(commands.add_parser("devices", help="every registered device with its cohort, counters and "
                                        "last contact"), leaf=True)

    rnd = commands.add_parser("round", help="start a round or report one")
    rounds = rnd.add_subparsers(dest="round_command", metavar="ROUND_COMMAND", required=True)
    start = rounds.add_parser("start", help="queue a distillation or federated round; print its id")
    _add_connection(start, leaf=True)
    start.add_argument("kind", choices=ROUND_KINDS, help="distill: distil the teacher into the student on the "
                       "uploaded samples; fedavg: aggregate the devices' submissions with the server's aggregator")
    start.add_argument("--max-samples", type=int, default=0, help="distill: the most uploaded samples to use; "
                       "default 0 (the server's round_max_samples)")
    start.add_argument("--steps", type=int, default=0, help="distill: optimiser steps; default 0 (the server's "
                       "distill_steps)")
    start.add_argument("--cohort", default="", help="the cohort the round's update is published to; default: "
                       "the server's default cohort")
    _add_wait(start)
    status = rounds.add_parser("status", help="the state, outcome and metrics of one round")
    _add_connection(status, leaf=True)
    status.add_argument("round_id", type=int, help="the id `round start` printed")
    _add_wait(status)
    return p


def _add_connection(p: argparse.ArgumentParser, *, leaf: bool) -> None:
    """The options every admin subcommand shares; they may stand before or after the subcommand's name (on the
    subcommands they default to nothing, so a value given before the name is kept)."""
    def arg(*names: str, default: object = None, **kwargs: Any) -> None:
        p.add_argument(*names, default=argparse.SUPPRESS if leaf else default, **kwargs)

    arg("--server", help="server address host:port (required)")
    arg("--admin-token-file", type=Path, help="file holding the server's admin token (its admin_token / "
        "admin_token_file); needed unless the server runs without tokens")
    arg("--tls-ca", type=Path, help="CA (PEM) of the server's certificate; turns on TLS")
    arg("--tls-cert", type=Path, help="this client's certificate (PEM), for mutual TLS")
    arg("--tls-key", type=Path, help="this client's private key (PEM), for mutual TLS")
    arg("--tls-server-name", help="name in the server's certificate, when it differs from the --server host")
    arg("--timeout", type=float, default=30.0, help="seconds each call may take; default 30")
    arg("--json", type=Path, help="also write the result as JSON to this file")


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="follow the round until it is done or failed (exit 1 "
                   "when it failed)")
    p.add_argument("--wait-timeout", type=float, default=600.0, help="with --wait: give up after this many "
                   "seconds (exit 2); default 600")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value}")


def _validate(args: argparse.Namespace) -> None:
    """Refuse bad values before anything is sent, each named."""
    if not args.server:
        raise ValueError("--server HOST:PORT is required: the address of the server to operate")
    _check_positive("--timeout", args.timeout)
    if getattr(args, "wait", False):
        _check_positive("--wait-timeout", args.wait_timeout)
    if args.admin_command == "round" and args.round_command == "start":
        for flag, value in (("--max-samples", args.max_samples), ("--steps", args.steps)):
            if not 0 <= value <= 2**31 - 1:
                raise ValueError(f"{flag} must be an integer in [0, {2**31 - 1}] (0: the server's default), "
                                 f"got {value}")
    if args.admin_command == "round" and args.round_command == "status" and args.round_id <= 0:
        raise ValueError(f"round_id must be a positive integer, got {args.round_id}")
    if args.admin_command == "publish" and not (args.bundle / "manifest.json").is_file():
        raise FileNotFoundError(f"{args.bundle} is not a bundle: {args.bundle / 'manifest.json'} does not exist")


def _admin_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise AdminCommandError(f"cannot read --admin-token-file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise AdminCommandError(f"--admin-token-file {path} is empty")
    return token


def command(args: argparse.Namespace) -> int:
    """Run one admin subcommand; print its result (and write ``--json``). 0 on success, 1 on a failed round."""
    import grpc

    from device_agents.channel import TlsOptions
    from edgeloop.admin import AdminClient

    _validate(args)
    tls_given = any(v is not None for v in (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name))
    tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) if tls_given else None
    token = _admin_token(args.admin_token_file)
    action = _ACTIONS[args.admin_command if args.admin_command != "round" else f"round {args.round_command}"]
    try:
        with AdminClient(args.server, timeout=args.timeout, admin_token=token, tls=tls) as client:
            payload, text, ok = action(client, args)
    except grpc.RpcError as exc:
        raise AdminCommandError(_describe_rpc_error(exc, args.server)) from exc
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return 0 if ok else 1


def _describe_rpc_error(exc: Any, server: str) -> str:
    """One line for a failed call: the status code and the server's reason."""
    import grpc

    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the server at {server} (UNAVAILABLE): {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the server at {server} did not answer within --timeout (DEADLINE_EXCEEDED)"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return f"the server at {server} refused the admin credential ({name}): {details}; pass the server's " \
               "admin token with --admin-token-file"
    return f"the server at {server} refused the call ({name}): {details}"


# -- the subcommands: (client, args) -> (JSON payload, text to print, succeeded) ---------------------------------
def _publish(client: Any, args: argparse.Namespace) -> tuple[dict[str, Any], str, bool]:
    files = sorted(p for p in args.bundle.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    bundle_id = client.publish_bundle(args.bundle)
    payload = {"bundle_id": bundle_id, "files": len(files), "bytes": total}
    return payload, f"published {args.bundle} ({len(files)} files, {total:,} B) as bundle {bundle_id}", True


def _devices(client: Any, args: argparse.Namespace) -> tuple[dict[str, Any], str, bool]:
    now_ms = int(time.time() * 1000)
    devices = [{
        "device_id": d.device_id, "cohort": d.cohort, "labels": dict(sorted(d.labels.items())),
        "registered_unix_ms": d.registered_unix_ms, "last_seen_unix_ms": d.last_seen_unix_ms,
        "samples_stored": d.samples_stored, "drift_events": d.drift_events,
        "acked_update_version": d.acked_update_version, "outbox_pending_samples": d.outbox_pending_samples,
        "outbox_dropped_samples": d.outbox_dropped_samples, "rollbacks": d.rollbacks,
    } for d in client.list_devices()]
    if not devices:
        return {"devices": []}, "no devices registered", True
    header = ("device", "cohort", "last seen", "samples", "drifts", "update", "outbox pending", "dropped",
              "rollbacks", "labels")
    rows = [(d["device_id"], d["cohort"], _age(now_ms - d["last_seen_unix_ms"]), str(d["samples_stored"]),
             str(d["drift_events"]), f"v{d['acked_update_version']}" if d["acked_update_version"] else "-",
             str(d["outbox_pending_samples"]), str(d["outbox_dropped_samples"]), str(d["rollbacks"]),
             ",".join(f"{k}={v}" for k, v in d["labels"].items()) or "-") for d in devices]
    return {"devices": devices}, _table(header, rows, numeric={3, 4, 6, 7, 8}) + f"\n{len(devices)} devices", True


def _round_start(client: Any, args: argparse.Namespace) -> tuple[dict[str, Any], str, bool]:
    round_id = client.start_round(args.kind, args.max_samples, args.steps, args.cohort)
    queued = f"round {round_id} ({args.kind}) queued"
    if not args.wait:
        return {"round_id": round_id}, queued, True
    payload, text, ok = _follow(client, round_id, args.wait_timeout)
    return payload, f"{queued}\n{text}", ok


def _round_status(client: Any, args: argparse.Namespace) -> tuple[dict[str, Any], str, bool]:
    if args.wait:
        return _follow(client, args.round_id, args.wait_timeout)
    info = client.get_round(args.round_id)
    return asdict(info), _describe_round(info), info.state != "failed"


def _follow(client: Any, round_id: int, timeout: float) -> tuple[dict[str, Any], str, bool]:
    """Poll the round until it is done or failed; a round still running after ``timeout`` is an error."""
    deadline = time.monotonic() + timeout
    poll = 0.05
    while True:
        info = client.get_round(round_id)
        if info.state in ("done", "failed"):
            return asdict(info), _describe_round(info), info.state == "done"
        if time.monotonic() >= deadline:
            raise AdminCommandError(f"round {round_id} is still {info.state} after --wait-timeout {timeout:g} s; "
                                    f"follow it with `edgeloop admin --server … round status {round_id} --wait`")
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        poll = min(poll * 2, 1.0)


def _describe_round(info: Any) -> str:
    lines = [f"round {info.round_id} ({info.kind}): {info.state}"]
    if info.state == "done":
        lines.append(f"  update version {info.update_version}, {info.samples_used} samples, {info.seconds:.2f} s")
    if info.error:
        lines.append(f"  error: {info.error}")
    lines += [f"  {name} = {value:.6g}" for name, value in sorted(info.metrics.items())]
    return "\n".join(lines)


_ACTIONS: dict[str, Callable[[Any, argparse.Namespace], tuple[dict[str, Any], str, bool]]] = {
    "publish": _publish, "devices": _devices, "round start": _round_start, "round status": _round_status,
}


def _age(ms: int) -> str:
    """How long ago, in the largest whole unit (``12s ago``, ``3m ago``, ``5h ago``, ``2d ago``)."""
    seconds = max(0, ms) // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """Plain aligned columns (numbers right-aligned): readable over ssh, no extra dependency."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
