"""Fixtures for the server tests: a real server on 127.0.0.1:0 with data in tmp_path, stubs, publishing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from proto.edgeloop.v1 import admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import EdgeloopServer, ServerConfig, create_server
from tests.server.server_testkit import RPC_TIMEOUT, FakeDistiller, bundle_chunks, make_bundle_files


@pytest.fixture
def fake_distiller() -> FakeDistiller:
    """A fresh :class:`FakeDistiller`."""
    return FakeDistiller()


@pytest.fixture
def config(tmp_path: Path) -> ServerConfig:
    """A config on 127.0.0.1:0 with data in ``tmp_path``, small chunks and a short grace."""
    return ServerConfig(data_dir=tmp_path / "data", port=0, chunk_size=1000, max_workers=8, grace_seconds=2.0,
                        distill_steps=3)


@pytest.fixture
def running(config: ServerConfig, fake_distiller: FakeDistiller) -> Iterator[EdgeloopServer]:
    """A started server (fake distiller), stopped after the test."""
    srv = create_server(config, distiller=fake_distiller)
    srv.start()
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture
def channel(running: EdgeloopServer) -> Iterator[grpc.Channel]:
    """An insecure channel to the running server."""
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        yield ch


@pytest.fixture
def device(channel: grpc.Channel) -> device_pb2_grpc.DeviceServiceStub:
    """DeviceService stub."""
    return device_pb2_grpc.DeviceServiceStub(channel)


@pytest.fixture
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminServiceStub:
    """AdminService stub."""
    return admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture
def published(admin: admin_pb2_grpc.AdminServiceStub, device: device_pb2_grpc.DeviceServiceStub
              ) -> Callable[..., str]:
    """Publish the test bundle, register ``dev-1``; return the bundle id (call it as a function)."""

    def _publish(files: dict[str, bytes] | None = None) -> str:
        resp = admin.PublishBundle(bundle_chunks(files or make_bundle_files()), timeout=RPC_TIMEOUT)
        device.Register(device_pb2.RegisterRequest(device_id="dev-1", runtime_backend="onnx"), timeout=RPC_TIMEOUT)
        return resp.bundle_id

    return _publish


