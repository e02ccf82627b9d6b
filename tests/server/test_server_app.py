"""ServerConfig validation, the watcher cap, and ``serve`` stopping cleanly on SIGTERM (in a subprocess)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.edgeloop.v1 import admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import ServerConfig, create_server
from tests.server.server_testkit import (
    RPC_TIMEOUT,
    FakeDistiller,
    bundle_chunks,
    make_bundle_files,
    start_server_process,
)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"port": 70000}, "port"),
        ({"chunk_size": 16 << 20}, "chunk_size"),
        ({"max_workers": 0}, "max_workers"),
        ({"max_workers": 4, "max_watchers": 4}, "max_watchers"),
        ({"teacher_ckpt": "t.pt"}, "student_ckpt"),
        ({"distill_alpha": -0.1}, "distill_alpha"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ServerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    cfg = ServerConfig(data_dir="x", max_workers=8)  # type: ignore[arg-type]
    assert cfg.data_dir == Path("x") and cfg.max_watchers == 6 and cfg.chunk_size == 64 << 10
    assert cfg.max_message_bytes == 16 << 20


def test_watchers_beyond_the_cap_are_refused(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path, port=0, max_workers=4, max_watchers=1, grace_seconds=1)
    with create_server(cfg, FakeDistiller()) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        admin_pb2_grpc.AdminServiceStub(ch).PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT)
        device = device_pb2_grpc.DeviceServiceStub(ch)
        device.Register(device_pb2.RegisterRequest(device_id="d"), timeout=RPC_TIMEOUT)
        first = device.WatchUpdates(device_pb2.WatchRequest(device_id="d", max_wait_seconds=5), timeout=10)
        deadline = time.monotonic() + 5
        while srv.state.broker.watchers == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            list(device.WatchUpdates(device_pb2.WatchRequest(device_id="d", max_wait_seconds=5), timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()


def test_serve_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    proc, port = start_server_process(  # the port is printed by serve's on_started hook
        tmp_path, setup="import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
