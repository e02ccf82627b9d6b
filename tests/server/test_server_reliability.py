"""Reliability of a real server: ``kill -9`` during uploads then restart on the same data directory, graceful
stop finishing an in-flight upload, a bundle chunk corrupted on the wire fetched again, and malformed and
oversized messages sent to every RPC (hypothesis) while the server keeps serving."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from proto.edgeloop.v1 import admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import ServerConfig, create_server
from server.interceptors import rewrap
from server.state import sample_tensor
from tests.server.server_testkit import (
    RPC_TIMEOUT,
    FakeDistiller,
    bundle_chunks,
    make_bundle_files,
    sample_msg,
    start_server_process,
)

ROOT = Path(__file__).resolve().parents[2]


def _upload_until_failure(target: str, bundle_id: str, worker: int, acked: list[str], stop: threading.Event) -> None:
    """Upload 4-sample batches until an RPC fails or ``stop``; append every acknowledged id to ``acked``."""
    with grpc.insecure_channel(target) as ch:
        device = device_pb2_grpc.DeviceServiceStub(ch)
        batch = 0
        while not stop.is_set():
            msgs = [sample_msg(f"w{worker}-b{batch}-{i}", bundle_id, seed=batch * 4 + i) for i in range(4)]
            try:
                ack = device.UploadSamples(iter(msgs), timeout=5)
            except grpc.RpcError:
                return
            acked.extend([*ack.stored_ids, *ack.duplicate_ids])
            batch += 1


def test_kill9_during_uploads_keeps_every_acknowledged_sample(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, port = start_server_process(data)
    target = f"127.0.0.1:{port}"
    acked: list[str] = []
    stop = threading.Event()
    try:
        with grpc.insecure_channel(target) as ch:
            bundle_id = admin_pb2_grpc.AdminServiceStub(ch).PublishBundle(bundle_chunks(make_bundle_files()),
                                                                          timeout=RPC_TIMEOUT).bundle_id
            device_pb2_grpc.DeviceServiceStub(ch).Register(device_pb2.RegisterRequest(device_id="dev-1"),
                                                           timeout=RPC_TIMEOUT)
        workers = [threading.Thread(target=_upload_until_failure, args=(target, bundle_id, w, acked, stop))
                   for w in range(4)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 15
        while len(acked) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # uploads are in flight: the workers never stop on their own
        assert proc.wait(timeout=10) == -signal.SIGKILL
        for w in workers:
            w.join(10)
        assert not any(w.is_alive() for w in workers)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 200, "too few uploads were acknowledged before the kill"

    cfg = ServerConfig(data_dir=data, port=0, max_workers=4, grace_seconds=1)
    with create_server(cfg, FakeDistiller()) as srv:  # restart on the same data directory
        for sample_id in acked:
            record = srv.registry.get_sample(sample_id)
            assert record is not None, f"acknowledged sample {sample_id} is missing after kill -9"
            assert record.input_blob is not None and sample_tensor(srv.state, record.input_blob)  # present, verified
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            ack = device_pb2_grpc.DeviceServiceStub(ch).UploadSamples(
                iter([sample_msg("after-restart", bundle_id), sample_msg(acked[0], bundle_id)]), timeout=RPC_TIMEOUT)
        assert list(ack.stored_ids) == ["after-restart"] and list(ack.duplicate_ids) == [acked[0]]


def test_graceful_stop_finishes_an_in_flight_upload(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path, port=0, max_workers=4, grace_seconds=5)
    srv = create_server(cfg, FakeDistiller())
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            bundle_id = admin_pb2_grpc.AdminServiceStub(ch).PublishBundle(bundle_chunks(make_bundle_files()),
                                                                          timeout=RPC_TIMEOUT).bundle_id
            device = device_pb2_grpc.DeviceServiceStub(ch)
            device.Register(device_pb2.RegisterRequest(device_id="dev-1"), timeout=RPC_TIMEOUT)
            streaming = threading.Event()

            def slow_stream() -> Iterator[device_pb2.Sample]:
                for i in range(5):
                    yield sample_msg(f"slow-{i}", bundle_id, seed=i)
                    streaming.set()
                    time.sleep(0.2)

            future = device.UploadSamples.future(slow_stream(), timeout=RPC_TIMEOUT)
            assert streaming.wait(5)
            stopper = threading.Thread(target=srv.stop)
            stopper.start()
            ack = future.result(timeout=10)  # the upload in flight when stop() began still completes
            stopper.join(10)
            assert not stopper.is_alive()
        assert list(ack.stored_ids) == [f"slow-{i}" for i in range(5)]
    finally:
        srv.stop(grace=0)
    with create_server(ServerConfig(data_dir=tmp_path, port=0, max_workers=4), FakeDistiller()) as again:
        assert all(again.registry.get_sample(f"slow-{i}") is not None for i in range(5))


class CorruptOnce(grpc.ServerInterceptor):
    """Flips one byte of the first FetchBundle chunk of ``path`` (a fault on the wire); records requests."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.left = 1
        self.requests: list[list[str]] = []

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.endswith("/FetchBundle"):
            return handler

        def wrap(behavior: Any, _req: bool, _resp: bool) -> Any:
            def corrupted(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self.requests.append(list(request.paths))
                for chunk in behavior(request, context):
                    if chunk.path == self.path and self.left and chunk.data:
                        self.left -= 1
                        chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
                    yield chunk
            return corrupted

        return rewrap(handler, wrap)


def test_a_chunk_corrupted_on_the_wire_is_detected_and_fetched_again(tmp_path: Path, digits_bundle: Path) -> None:
    from device_agents.client import DeviceClient
    from runtime import load_bundle
    from runtime.manifest import read_manifest

    manifest = read_manifest(digits_bundle)[0]
    model_file = manifest.files_for(manifest.model(None).name)[0]  # as shipped (packed or not)
    fault = CorruptOnce(model_file)
    secret, admin_token = "enroll-secret-0123456789", "admin-token-0123456789"
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=4, grace_seconds=1, chunk_size=4096,
                       enrollment_secret=secret, admin_token=admin_token)
    with create_server(cfg, FakeDistiller(), interceptors=[fault]) as srv:
        from edgeloop.admin import AdminClient

        target = f"127.0.0.1:{srv.port}"
        with AdminClient(target, admin_token=admin_token) as admin:
            bundle_id = admin.publish_bundle(digits_bundle)
        with DeviceClient(target, "dev-1", timeout=10) as client:
            client.enroll(secret)
            client.register()
            path = client.fetch_bundle(bundle_id, tmp_path / "device")
    assert fault.left == 0
    assert fault.requests[-1] == [model_file]  # the corrupted file, and only it, was fetched once more
    assert load_bundle(path).bundle_id == bundle_id
