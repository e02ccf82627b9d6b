"""Server load on loopback: many simulated devices uploading at once, against a bare grpcio echo server.

* edgeloop: a real server on 127.0.0.1:0 (SQLite ``synchronous=FULL``, fsynced content-addressed blobs,
  device tokens **off**, no TLS, 32 RPC threads) with the digits small_cnn bundle published. N registered
  devices (N = 50, 200), one thread and one channel each, call ``UploadSamples`` back to back for a fixed
  window: 16 samples per call, each a digits-sized float32 input (1×8×8) plus the model's 64-d features,
  every sample distinct (its first value is a counter), so every blob is really written.
* echo: a bare ``grpc.server`` with one generic client-streaming handler (no protobuf code generation, raw
  bytes in, an ack of the same size as ``UploadAck`` out) fed the very same serialized ``Sample`` messages by
  the same client threads: the ceiling of grpcio itself on this machine.

Uploads/s counts completed calls in the window, latencies are per call; an error is any call that raised.
The verdict is edgeloop's throughput over echo's at the same concurrency (target ≥ 0.5). Also measured:
the bytes of one parameter update of the bundle's adaptable parameters as full float32, int8 delta and
int8 top-k delta (10 %, 25 %), signed message sizes included.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import numpy as np

from benchmarks.common import fmt, md_table, scratch_dir, student_artifacts

NAME = "load"
TITLE = "Server load: concurrent device uploads vs a bare grpcio echo server (loopback)"
BATCH = 16
CONCURRENCY = (50, 200)
_ECHO_METHOD = "/bench.Echo/Upload"


def _sample_template(bundle_id: str) -> tuple[Any, np.ndarray, np.ndarray]:
    from proto.edgeloop.v1 import device_pb2

    rng = np.random.default_rng(0)
    x = rng.random((1, 8, 8), dtype=np.float32) * 16
    f = rng.random(64, dtype=np.float32)
    return device_pb2.Sample(bundle_id=bundle_id, entropy=0.4, prediction=3), x, f


def _messages(device_id: str, bundle_id: str, counter: list[int]) -> list[Any]:
    """``BATCH`` distinct Sample messages of ``device_id``."""
    from proto.convert import tensor_to_proto
    from proto.edgeloop.v1 import device_pb2

    out = []
    _, x, f = _TEMPLATE
    for _ in range(BATCH):
        counter[0] += 1
        xi = x.copy()
        xi.flat[0] = counter[0]
        out.append(device_pb2.Sample(device_id=device_id, sample_id=f"{device_id}:{counter[0]}", bundle_id=bundle_id,
                                     input=tensor_to_proto("input", xi), features=tensor_to_proto("features", f),
                                     entropy=0.4, prediction=3, stream_position=counter[0]))
    return out


_TEMPLATE: tuple[Any, np.ndarray, np.ndarray] = (None, np.zeros(1), np.zeros(1))


def _drive(n: int, call: Callable[[str, list[Any]], None], ids: list[str], bundle_id: str,
           seconds: float) -> dict[str, Any]:
    """Run ``n`` device threads calling ``call`` back to back for ``seconds``; count and time the calls."""
    start = threading.Barrier(n + 1)
    stop_at = [0.0]
    lat: list[list[float]] = [[] for _ in range(n)]
    errors = [0] * n

    def device(i: int) -> None:
        counter = [0]
        start.wait()
        while True:
            msgs = _messages(ids[i], bundle_id, counter)
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            try:
                call(ids[i], msgs)
            except Exception:
                errors[i] += 1
                continue
            t1 = time.perf_counter()
            if t1 <= stop_at[0]:
                lat[i].append(t1 - t0)

    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    start.wait()
    for t in threads:
        t.join(seconds + 60)
    all_lat = np.array([v for per in lat for v in per]) * 1000
    calls = int(all_lat.size)
    return {"devices": n, "seconds": seconds, "uploads": calls, "uploads_per_s": calls / seconds,
            "samples_per_s": calls * BATCH / seconds, "errors": int(sum(errors)),
            "p50_ms": float(np.percentile(all_lat, 50)) if calls else None,
            "p99_ms": float(np.percentile(all_lat, 99)) if calls else None}


def _edgeloop(n: int, seconds: float, art: Any) -> dict[str, Any]:
    import grpc

    from edgeloop.admin import AdminClient
    from proto.edgeloop.v1 import device_pb2, device_pb2_grpc
    from server.app import ServerConfig, create_server

    work = scratch_dir("load")
    with create_server(ServerConfig(data_dir=work, port=0, grace_seconds=1.0)) as srv:
        address = f"127.0.0.1:{srv.port}"
        with AdminClient(address) as admin:
            bundle_id = admin.publish_bundle(art.bundle)
        channels = [grpc.insecure_channel(address) for _ in range(n)]
        stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in channels]
        ids = [f"load-{i:03d}" for i in range(n)]
        for stub, device_id in zip(stubs, ids, strict=True):
            stub.Register(device_pb2.RegisterRequest(device_id=device_id), timeout=30)
        by_id = dict(zip(ids, stubs, strict=True))

        def call(device_id: str, msgs: list[Any]) -> None:
            ack = by_id[device_id].UploadSamples(iter(msgs), timeout=60)
            if len(ack.stored_ids) != len(msgs):
                raise RuntimeError(f"{len(ack.stored_ids)} of {len(msgs)} stored")

        try:
            result = _drive(n, call, ids, bundle_id, seconds)
        finally:
            for c in channels:
                c.close()
        stored = sum(d.samples_stored for d in srv.state.storage.list_devices())
    return {**result, "samples_stored": stored}


def _echo(n: int, seconds: float) -> dict[str, Any]:
    import grpc

    from proto.edgeloop.v1 import device_pb2

    ack_size = [0]

    def upload(request_iterator: Any, context: Any) -> bytes:
        ids = [len(m) for m in request_iterator]  # raw bytes, not parsed: grpcio's own cost only
        return b"\x0a" * (ack_size[0] or 8 * len(ids))

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Upload": grpc.stream_unary_rpc_method_handler(upload)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ids = [f"load-{i:03d}" for i in range(n)]
    ack_size[0] = device_pb2.UploadAck(stored_ids=[f"{ids[0]}:{i}" for i in range(BATCH)]).ByteSize()
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(n)]
    calls = {d: c.stream_unary(_ECHO_METHOD, request_serializer=device_pb2.Sample.SerializeToString,
                               response_deserializer=None) for d, c in zip(ids, channels, strict=True)}
    try:
        return _drive(n, lambda d, msgs: calls[d](iter(msgs), timeout=60), ids, "", seconds)
    finally:
        for c in channels:
            c.close()
        server.stop(1.0).wait()


def _update_bytes(art: Any) -> list[dict[str, Any]]:
    """Bytes of one update of the bundle's adaptable parameters in each encoding (message incl. signature)."""
    from proto.edgeloop.v1 import common_pb2
    from runtime import AdaptableModel, load_bundle
    from runtime.update_codec import compress_delta, encode_full

    base = AdaptableModel(load_bundle(art.bundle, threads=1)).params
    rng = np.random.default_rng(0)
    # a distillation-like change: the affine weights and biases move by ~5 % of their spread, statistics stay
    target = {k: v + (0.05 * float(v.std() or 1.0) * rng.standard_normal(v.shape)).astype(np.float32)
              if k.endswith((".weight", ".bias")) else v for k, v in base.items()}
    delta = {k: target[k] - base[k] for k in base}
    raw = sum(v.nbytes for v in base.values())
    rows = []
    for label, encoding, frac in (("full float32", "f32", 1.0), ("int8 delta", "int8_delta", 1.0),
                                  ("int8 top-k 25 %", "int8_topk_delta", 0.25),
                                  ("int8 top-k 10 %", "int8_topk_delta", 0.10)):
        if encoding == "f32":
            payload, err = encode_full(target), 0.0
        else:
            out = compress_delta(delta, None, encoding, frac)
            payload = out.payload
            err = float(np.sqrt(sum(float((r**2).sum()) for r in out.residual.values()))
                        / np.sqrt(sum(float((d**2).sum()) for d in delta.values())))
        msg = common_pb2.ParameterUpdate(version=12, bundle_id="b" * 64, kind="distill", sha256="s" * 64,
                                         created_unix_ms=1_700_000_000_000, round_id=3, cohort="default",
                                         base_version=11, encoding=encoding, payload=payload, base_sha256="t" * 64,
                                         signature=b"\x01" * 64, key_id="k" * 16)
        rows.append({"encoding": label, "payload_bytes": len(payload), "message_bytes": msg.ByteSize(),
                     "raw_fp32_bytes": raw, "relative_residual": err})
    return rows


def run(quick: bool) -> dict[str, Any]:
    """Both servers at each concurrency; the update-size table."""
    global _TEMPLATE
    art = student_artifacts()
    _TEMPLATE = _sample_template("")
    seconds = 4.0 if quick else 15.0
    levels = []
    for n in CONCURRENCY:
        echo = _echo(n, seconds)
        edge = _edgeloop(n, seconds, art)
        ratio = edge["uploads_per_s"] / echo["uploads_per_s"] if echo["uploads_per_s"] else None
        levels.append({"devices": n, "edgeloop": edge, "echo": echo, "ratio": ratio,
                       "meets_target": ratio is not None and ratio >= 0.5})
    sample_bytes = sum(m.ByteSize() for m in _messages("load-000", "b" * 64, [0]))
    return {"batch": BATCH, "seconds": seconds, "upload_message_bytes": sample_bytes, "mode": "tokens off, no TLS",
            "levels": levels, "update_bytes": _update_bytes(art)}


def render(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section body."""
    rows = []
    for lv in r["levels"]:
        for name in ("edgeloop", "echo"):
            m = lv[name]
            rows.append([lv["devices"], name, fmt(m["uploads_per_s"], 0), fmt(m["samples_per_s"], 0),
                         fmt(m["p50_ms"], 1), fmt(m["p99_ms"], 1), m["errors"]])
    load = md_table(["devices", "server", "uploads/s", "samples/s", "p50 ms", "p99 ms", "errors"], rows)
    verdict = md_table(["devices", "edgeloop / echo throughput", "target ≥ 0.5"], [
        [lv["devices"], fmt(lv["ratio"], 2), "met" if lv["meets_target"] else "**not met**"] for lv in r["levels"]])
    upd = md_table(["update encoding", "payload bytes", "signed message bytes", "× full", "relative residual"], [
        [u["encoding"], u["payload_bytes"], u["message_bytes"],
         fmt(u["message_bytes"] / r["update_bytes"][0]["message_bytes"], 3), fmt(u["relative_residual"], 4)]
        for u in r["update_bytes"]])
    return (f"Each call uploads {r['batch']} samples ({r['upload_message_bytes']} bytes of Sample messages: "
            f"1×8×8 float32 input + 64-d features); {r['seconds']:.0f} s window per run; {r['mode']}; one "
            f"thread and channel per device, client and server share the machine's cores.\n\n{load}\n\n{verdict}\n\n"
            "One parameter update of the digits small_cnn bundle's adaptable parameters (affine weights/biases "
            "moved by ~5 % of their spread, statistics unchanged); the residual is what error feedback carries to "
            f"the next update (‖residual‖ / ‖delta‖).\n\n{upd}\n")
