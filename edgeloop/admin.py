"""Operator-side gRPC client for the admin service: publish bundles, list devices, run rounds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from device_agents.channel import TlsOptions, open_channel
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, common_pb2

CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class RoundInfo:
    """State of one server round."""

    round_id: int
    kind: str
    state: str
    update_version: int
    samples_used: int
    error: str
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class RoundFailedError(RuntimeError):
    """A round ended in state ``failed``; the message carries the server's error text."""


def _bundle_chunks(bundle_dir: Path, chunk: int) -> Iterator[common_pb2.BundleChunk]:
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        rel = path.relative_to(bundle_dir).as_posix()
        for offset in range(0, max(len(data), 1), chunk):
            yield common_pb2.BundleChunk(
                path=rel, offset=offset, data=data[offset : offset + chunk], file_size=len(data)
            )


class AdminClient:
    """Blocking admin client; ``admin_token`` is sent as a bearer token, ``tls`` turns on (mutual) TLS."""

    def __init__(self, target: str, timeout: float = 30.0, *, admin_token: str | None = None,
                 tls: TlsOptions | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target, (), tls, (lambda: admin_token) if admin_token else None)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish_bundle(self, bundle_dir: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
        """Upload every file of ``bundle_dir``; return the bundle id the server assigned."""
        bundle_dir = Path(bundle_dir)
        if not (bundle_dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{bundle_dir} is not a bundle: manifest.json missing")
        resp = self._stub.PublishBundle(_bundle_chunks(bundle_dir, chunk_bytes), timeout=self.timeout)
        return str(resp.bundle_id)

    def list_devices(self) -> list[admin_pb2.DeviceInfo]:
        """Every registered device with its counters."""
        return list(self._stub.ListDevices(admin_pb2.ListDevicesRequest(), timeout=self.timeout).devices)

    def start_round(self, kind: str, max_samples: int = 0, steps: int = 0, cohort: str = "") -> int:
        """Queue a ``distill`` or ``fedavg`` round whose update is published to ``cohort`` ("": the server's
        default cohort); ``max_samples``/``steps`` 0: the server's defaults. Return the round's id."""
        req = admin_pb2.StartRoundRequest(kind=kind, max_samples=max_samples, steps=steps, cohort=cohort)
        return int(self._stub.StartRound(req, timeout=self.timeout).round_id)

    def get_round(self, round_id: int) -> RoundInfo:
        """Current state of a round."""
        s = self._stub.GetRound(admin_pb2.GetRoundRequest(round_id=round_id), timeout=self.timeout)
        return RoundInfo(
            s.round_id, s.kind, s.state, s.update_version, s.samples_used, s.error, s.seconds, dict(s.metrics)
        )

    def wait_round(self, round_id: int, timeout: float = 120.0, poll: float = 0.05) -> RoundInfo:
        """Poll until the round is done; raise :class:`RoundFailedError` or ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.get_round(round_id)
            if info.state == "done":
                return info
            if info.state == "failed":
                raise RoundFailedError(f"round {round_id} ({info.kind}) failed: {info.error}")
            time.sleep(poll)
        raise TimeoutError(f"round {round_id} did not finish within {timeout} s")
