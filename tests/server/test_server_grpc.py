"""End-to-end tests over a real gRPC server on 127.0.0.1:0 with a real SQLite registry in tmp_path."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.convert import tensor_to_proto, tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc
from runtime.params import params_digest
from server.app import ADMIN_SERVICE, DEVICE_SERVICE, EdgeloopServer, ServerConfig, create_server
from server.state import sample_tensor
from server.storage import Registry
from tests.server.server_testkit import (
    FEATURE_DIM,
    RPC_TIMEOUT,
    bundle_chunks,
    initial_params,
    make_bundle_files,
    rpc_error,
    sample_msg,
    update_params,
    wait_round,
)

Stub = device_pb2_grpc.DeviceServiceStub
Admin = admin_pb2_grpc.AdminServiceStub


def test_health_serving_for_both_services(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", DEVICE_SERVICE, ADMIN_SERVICE):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_register_before_publish_has_no_bundle(device: Stub) -> None:
    resp = device.Register(device_pb2.RegisterRequest(device_id="d0", labels={"hw": "pi"}), timeout=RPC_TIMEOUT)
    assert (resp.device_id, resp.bundle_id, resp.latest_update_version) == ("d0", "", 0)


def test_publish_then_fetch_round_trip_with_verified_chunks(device: Stub, published: Callable[..., str]) -> None:
    files = make_bundle_files()
    bundle_id = published(files)
    assert bundle_id == hashlib.sha256(files["manifest.json"]).hexdigest()
    reg = device.Register(device_pb2.RegisterRequest(device_id="dev-1"), timeout=RPC_TIMEOUT)
    assert reg.bundle_id == bundle_id and sorted(reg.bundle_files) == sorted(files)

    received: dict[str, bytearray] = {}
    chunks = list(device.FetchBundle(device_pb2.FetchBundleRequest(device_id="dev-1", bundle_id=bundle_id,
                                                                   chunk_size=256), timeout=RPC_TIMEOUT))
    assert chunks[0].path == "manifest.json"
    for c in chunks:
        assert c.bundle_id == bundle_id and len(c.data) <= 256
        buf = received.setdefault(c.path, bytearray())
        assert c.offset == len(buf)
        buf.extend(c.data)
        assert c.file_size == len(files[c.path])
        assert c.file_sha256 == hashlib.sha256(files[c.path]).hexdigest()
    assert {p: bytes(b) for p, b in received.items()} == files
    assert sum(1 for c in chunks if c.path == "model_int8.onnx") == 3  # 768 bytes in 256-byte chunks

    one = list(device.FetchBundle(device_pb2.FetchBundleRequest(device_id="dev-1", paths=["golden.npz"]),
                                  timeout=RPC_TIMEOUT))
    assert [c.path for c in one] == ["golden.npz"] and one[0].data == files["golden.npz"]


def test_fetch_unknown_bundle_or_file_is_not_found(device: Stub, published: Callable[..., str]) -> None:
    published()
    code, msg = rpc_error(lambda: list(device.FetchBundle(
        device_pb2.FetchBundleRequest(device_id="dev-1", bundle_id="f" * 64), timeout=RPC_TIMEOUT)))
    assert code == grpc.StatusCode.NOT_FOUND and "f" * 64 in msg
    code, msg = rpc_error(lambda: list(device.FetchBundle(
        device_pb2.FetchBundleRequest(device_id="dev-1", paths=["nope.bin"]), timeout=RPC_TIMEOUT)))
    assert code == grpc.StatusCode.NOT_FOUND and "nope.bin" in msg


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda f: f.update({"golden.npz": b"tampered"}), "golden.npz"),
        (lambda f: f.pop("model_int8.onnx"), "model_int8.onnx"),
        (lambda f: f.update({"stray.bin": b"x"}), "stray.bin"),
        (lambda f: f.update({"manifest.json": b"{not json"}), "manifest.json"),
        (lambda f: f.pop("manifest.json"), "manifest.json"),
        (lambda f: f.pop("manifest.sig"), "unsigned"),
        (lambda f: f.update({"manifest.json": f["manifest.json"].replace(b'"tiny"', b'"evil"')}), "signature"),
    ],
    ids=["wrong-sha", "missing-file", "extra-file", "bad-json", "no-manifest", "unsigned", "forged"],
)
def test_publish_rejects_inconsistent_bundle_naming_the_file(
    admin: Admin, device: Stub, mutate: Callable[[dict[str, bytes]], object], needle: str
) -> None:
    files = make_bundle_files()
    mutate(files)
    code, msg = rpc_error(lambda: admin.PublishBundle(bundle_chunks(files), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in msg
    reg = device.Register(device_pb2.RegisterRequest(device_id="d"), timeout=RPC_TIMEOUT)
    assert reg.bundle_id == ""  # nothing became current


def test_publish_rejects_non_contiguous_chunks(admin: Admin) -> None:
    chunks = list(bundle_chunks(make_bundle_files(), chunk_size=100))
    chunks[1].offset += 1
    code, msg = rpc_error(lambda: admin.PublishBundle(iter(chunks), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "offset" in msg


def test_upload_acks_are_durable_and_duplicates_stored_once(
    device: Stub, published: Callable[..., str], running: EdgeloopServer
) -> None:
    bundle_id = published()
    msgs = [sample_msg(f"s{i}", bundle_id, seed=i) for i in range(3)]
    ack = device.UploadSamples(iter(msgs), timeout=RPC_TIMEOUT)
    assert list(ack.stored_ids) == ["s0", "s1", "s2"] and not ack.duplicate_ids
    assert ack.bytes_received == sum(m.ByteSize() for m in msgs)

    retry = device.UploadSamples(iter([msgs[1], sample_msg("s3", bundle_id, seed=3), msgs[1]]), timeout=RPC_TIMEOUT)
    assert list(retry.stored_ids) == ["s3"] and list(retry.duplicate_ids) == ["s1", "s1"]

    reopened = Registry(running.config.data_dir / "registry.sqlite3")  # a second, independent connection
    try:
        for i in range(4):
            rec = reopened.get_sample(f"s{i}")
            assert rec is not None and rec.device_id == "dev-1" and rec.bundle_id == bundle_id
            assert rec.input_blob is not None and sample_tensor(running.state, rec.input_blob)
        assert reopened.get_device("dev-1").samples_stored == 4  # type: ignore[union-attr]
    finally:
        reopened.close()


def _bad_byte_size(bundle_id: str) -> device_pb2.Sample:
    msg = sample_msg("bad", bundle_id)
    msg.input.data = msg.input.data[:-4]
    return msg


def _nan_input(bundle_id: str) -> device_pb2.Sample:
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 2, 3] = np.nan
    return sample_msg("bad", bundle_id, input_array=x)


@pytest.mark.parametrize(
    ("make_bad", "needle"),
    [
        (_bad_byte_size, "bytes"),
        (_nan_input, "NaN"),
        (lambda b: sample_msg("bad", b, input_array=np.zeros((1, 1, 8, 9), np.float32)), "shape"),
        (lambda b: sample_msg("bad", b, input_array=np.zeros((2, 1, 8, 8), np.float32)), "shape"),
        (lambda b: sample_msg("bad", b, input_array=np.zeros((1, 1, 8, 8), np.float16)), "float32"),
    ],
    ids=["byte-size", "nan", "wrong-shape", "batch-2", "float16"],
)
def test_malformed_sample_rejects_whole_upload(
    device: Stub, published: Callable[..., str], running: EdgeloopServer,
    make_bad: Callable[[str], device_pb2.Sample], needle: str,
) -> None:
    bundle_id = published()
    stream = [sample_msg("good-0", bundle_id), make_bad(bundle_id), sample_msg("good-1", bundle_id, seed=1)]
    code, msg = rpc_error(lambda: device.UploadSamples(iter(stream), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg
    for sid in ("good-0", "bad", "good-1"):
        assert running.registry.get_sample(sid) is None


def test_features_of_wrong_width_rejected(device: Stub, published: Callable[..., str]) -> None:
    bundle_id = published()
    msg = sample_msg("f", bundle_id)
    msg.features.CopyFrom(tensor_to_proto("features", np.zeros(FEATURE_DIM + 1, np.float32)))
    code, text = rpc_error(lambda: device.UploadSamples(iter([msg]), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"({FEATURE_DIM},)" in text


def test_unregistered_device_is_failed_precondition(device: Stub, published: Callable[..., str]) -> None:
    bundle_id = published()
    code, msg = rpc_error(lambda: device.UploadSamples(iter([sample_msg("x", bundle_id, device_id="ghost")]),
                                                   timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "ghost" in msg
    code, _ = rpc_error(lambda: device.ReportDrift(device_pb2.DriftReport(device_id="ghost", detector="ph"),
                                               timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_bundle_in_sample_is_not_found(device: Stub, published: Callable[..., str]) -> None:
    published()
    code, _ = rpc_error(lambda: device.UploadSamples(iter([sample_msg("x", "a" * 64)]), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND


def test_oversized_upload_is_resource_exhausted(tmp_path, fake_distiller) -> None:  # type: ignore[no-untyped-def]
    from server.app import ServerConfig, create_server

    cfg = ServerConfig(data_dir=tmp_path / "d", port=0, max_upload_bytes=1000, max_workers=4, grace_seconds=1)
    with create_server(cfg, fake_distiller) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        admin, device = admin_pb2_grpc.AdminServiceStub(ch), device_pb2_grpc.DeviceServiceStub(ch)
        bundle_id = admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id
        device.Register(device_pb2.RegisterRequest(device_id="dev-1"), timeout=RPC_TIMEOUT)
        msgs = [sample_msg(f"s{i}", bundle_id, seed=i) for i in range(5)]  # ~330 bytes each
        code, _ = rpc_error(lambda: device.UploadSamples(iter(msgs), timeout=RPC_TIMEOUT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert srv.registry.get_sample("s0") is None


def test_drift_report_is_stored(device: Stub, published: Callable[..., str], running: EdgeloopServer,
                                admin: Admin) -> None:
    published()
    ack = device.ReportDrift(device_pb2.DriftReport(
        device_id="dev-1", detector="page_hinkley", signal="entropy", statistic=3.5, threshold=2.0,
        stream_position=1234, detected_unix_ms=99), timeout=RPC_TIMEOUT)
    events = running.registry.list_drift("dev-1")
    assert [e.id for e in events] == [ack.event_id]
    e = events[0]
    assert (e.detector, e.signal, e.statistic, e.threshold, e.stream_position, e.detected_ms) == (
        "page_hinkley", "entropy", 3.5, 2.0, 1234, 99)
    info = admin.ListDevices(admin_pb2.ListDevicesRequest(), timeout=RPC_TIMEOUT).devices
    assert [(d.device_id, d.drift_events) for d in info] == [("dev-1", 1)]


def test_outbox_report_is_recorded_and_listed(device: Stub, published: Callable[..., str],
                                              running: EdgeloopServer, admin: Admin) -> None:
    published()

    def report(dropped: int, pending: int, at_ms: int, policy: str = "drop_oldest") -> device_pb2.OutboxAck:
        return device.ReportOutbox(device_pb2.OutboxReport(
            device_id="dev-1", dropped_samples=dropped, dropped_bytes=dropped * 10, pending_samples=pending,
            pending_bytes=pending * 10, max_bytes=1000, eviction_policy=policy, reported_unix_ms=at_ms),
            timeout=RPC_TIMEOUT)

    assert report(4, 12, 100).dropped_samples == 4
    assert report(2, 3, 50).dropped_samples == 4  # an older, retried report never lowers the count
    assert report(6, 1, 200).dropped_samples == 6
    info = admin.ListDevices(admin_pb2.ListDevicesRequest(), timeout=RPC_TIMEOUT).devices
    assert [(d.device_id, d.outbox_dropped_samples, d.outbox_pending_samples) for d in info] == [("dev-1", 6, 1)]
    stored = running.registry.get_outbox("dev-1")
    assert stored is not None and (stored.dropped_bytes, stored.max_bytes) == (60, 1000)
    code, msg = rpc_error(lambda: report(1, 1, 300, policy="drop_random"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "drop_random" in msg
    code, msg = rpc_error(lambda: report(-1, 1, 300))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "negative" in msg
    code, _ = rpc_error(lambda: device.ReportOutbox(device_pb2.OutboxReport(device_id="ghost",
                                                eviction_policy="drop_oldest"), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def _submit(device: Stub, device_id: str, bundle_id: str, params: dict[str, np.ndarray], n: int) -> int:
    device.Register(device_pb2.RegisterRequest(device_id=device_id), timeout=RPC_TIMEOUT)
    return device.SubmitUpdate(device_pb2.FederatedUpdate(
        device_id=device_id, bundle_id=bundle_id, base_version=0, num_samples=n, tensors=tensors_to_proto(params)),
        timeout=RPC_TIMEOUT).submission_id


def test_fedavg_round_weighted_mean_reaches_a_watcher(
    device: Stub, admin: Admin, published: Callable[..., str], running: EdgeloopServer
) -> None:
    bundle_id = published()
    base = initial_params()
    a = {k: v + 1.0 for k, v in base.items()}
    b = {k: v - (0.5 if k.endswith(".var") else 2.0) for k, v in base.items()}  # variances (>= 1) stay >= 0
    _submit(device, "dev-a", bundle_id, {k: v + 50.0 for k, v in base.items()}, 7)  # superseded by the next
    _submit(device, "dev-a", bundle_id, a, 1)
    _submit(device, "dev-b", bundle_id, b, 3)

    got: list[common_pb2.ParameterUpdate] = []
    watching = threading.Event()

    def watch() -> None:
        stream = device.WatchUpdates(device_pb2.WatchRequest(device_id="dev-1", bundle_id=bundle_id,
                                                              since_version=0, max_wait_seconds=5.0), timeout=8.0)
        watching.set()
        for update in stream:
            got.append(update)
            stream.cancel()  # one update is enough
            break

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert watching.wait(5.0)
    round_id = admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT).round_id
    status = wait_round(admin, round_id)
    watcher.join(8.0)
    assert not watcher.is_alive()

    assert status.state == "done", status.error
    assert status.update_version == 1 and status.samples_used == 4
    assert status.metrics["submissions"] == 2 and status.metrics["superseded"] == 1
    expected = {k: (1 * a[k] + 3 * b[k]) / 4 for k in base}  # = base - 1.25 (variances: base - 0.125)
    assert len(got) == 1 and got[0].version == 1 and got[0].kind == "fedavg" and got[0].round_id == round_id
    params = update_params(got[0], base)
    assert sorted(params) == sorted(base)
    for k in base:
        np.testing.assert_allclose(params[k], expected[k], rtol=0, atol=1e-6)
    assert got[0].sha256 == params_digest(params)
    assert running.registry.get_device("dev-1").acked_update_version == 1  # type: ignore[union-attr]

    # every submission is now used: a second round has nothing to aggregate
    code, msg = rpc_error(lambda: admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "submission" in msg
    # a late watcher gets the stored update at once, then its max wait ends the stream
    late = list(device.WatchUpdates(device_pb2.WatchRequest(device_id="dev-1", since_version=0,
                                                            max_wait_seconds=0.2), timeout=5.0))
    assert [u.version for u in late] == [1]


def test_submit_rejects_unknown_param_and_bad_shape(device: Stub, published: Callable[..., str]) -> None:
    bundle_id = published()
    code, msg = rpc_error(lambda: _submit(device, "d", bundle_id, {"bn9.weight": np.ones(4, np.float32)}, 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bn9.weight" in msg
    code, msg = rpc_error(lambda: _submit(device, "d", bundle_id, {"bn1.weight": np.ones(5, np.float32)}, 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bn1.weight" in msg
    code, msg = rpc_error(lambda: device.SubmitUpdate(device_pb2.FederatedUpdate(
        device_id="d", bundle_id=bundle_id, base_version=3, num_samples=1,
        tensors=tensors_to_proto({"bn1.weight": np.ones(4, np.float32)})), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "base_version 3" in msg


def test_distill_round_with_fake_distiller(device: Stub, admin: Admin, published: Callable[..., str],
                                           fake_distiller) -> None:  # type: ignore[no-untyped-def]
    bundle_id = published()
    device.UploadSamples(iter([sample_msg(f"s{i}", bundle_id, seed=i) for i in range(5)]), timeout=RPC_TIMEOUT)
    rid = admin.StartRound(admin_pb2.StartRoundRequest(kind="distill", max_samples=4, steps=2),
                           timeout=RPC_TIMEOUT).round_id
    status = wait_round(admin, rid)
    assert status.state == "done", status.error
    assert status.samples_used == 4 and status.metrics["kl_after"] == pytest.approx(0.1)
    assert fake_distiller.calls == [((4, 1, 8, 8), 2)]
    updates = list(device.WatchUpdates(device_pb2.WatchRequest(device_id="dev-1", max_wait_seconds=0.1),
                                       timeout=5.0))
    assert [(u.version, u.kind) for u in updates] == [(1, "distill")]
    params = update_params(updates[0], initial_params())
    np.testing.assert_allclose(params["bn1.weight"], initial_params()["bn1.weight"] + 0.02, atol=1e-6)
    np.testing.assert_array_equal(params["bn1.var"], initial_params()["bn1.var"])
    # the one sample left is used by the next round
    status2 = wait_round(admin, admin.StartRound(admin_pb2.StartRoundRequest(kind="distill"),
                                                 timeout=RPC_TIMEOUT).round_id)
    assert status2.state == "done" and status2.samples_used == 1 and status2.update_version == 2


def test_round_errors(admin: Admin, published: Callable[..., str]) -> None:
    code, _ = rpc_error(lambda: admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # nothing published
    published()
    code, msg = rpc_error(lambda: admin.StartRound(admin_pb2.StartRoundRequest(kind="krum"), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "krum" in msg
    code, _ = rpc_error(lambda: admin.StartRound(admin_pb2.StartRoundRequest(kind="distill"), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # no samples
    code, msg = rpc_error(lambda: admin.GetRound(admin_pb2.GetRoundRequest(round_id=42), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND and "42" in msg


def test_graceful_stop_ends_watchers_and_health(running: EdgeloopServer, device: Stub, channel: grpc.Channel,
                                                published: Callable[..., str]) -> None:
    published()
    stream = device.WatchUpdates(device_pb2.WatchRequest(device_id="dev-1", max_wait_seconds=0), timeout=10.0)
    done = threading.Event()
    result: list[object] = []

    def consume() -> None:
        try:
            result.extend(stream)
        except grpc.RpcError as exc:
            result.append(exc.code())
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 5.0
    while running.state.broker.waiting == 0 and time.monotonic() < deadline:  # the watcher is blocked
        time.sleep(0.01)
    assert running.state.broker.waiting == 1
    health = health_pb2_grpc.HealthStub(channel)
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 3.0})
    stopper.start()
    assert done.wait(5.0), "watcher was not released by stop()"
    stopper.join(5.0)
    assert not stopper.is_alive()
    assert result == []  # the stream ended cleanly, with no update
    assert running.health.Check(health_pb2.HealthCheckRequest(service=DEVICE_SERVICE), None).status == (
        health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)


def test_client_cancel_releases_the_server_watcher(running: EdgeloopServer, device: Stub,
                                                   published: Callable[..., str]) -> None:
    published()
    stream = device.WatchUpdates(device_pb2.WatchRequest(device_id="dev-1", max_wait_seconds=0), timeout=10.0)
    broker = running.state.broker
    deadline = time.monotonic() + 5.0
    while broker.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broker.waiting == 1
    stream.cancel()
    deadline = time.monotonic() + 5.0
    while broker.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broker.waiting == 0  # woken by the RPC's termination callback, not by a timeout


def test_trusted_publisher_keys_restrict_who_may_publish(tmp_path, fake_distiller) -> None:  # type: ignore[no-untyped-def]
    from exporter.signing import generate_key, public_path

    generate_key(tmp_path / "ops.pem")
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, trusted_publisher_keys=(public_path(tmp_path / "ops.pem"),))
    with create_server(cfg, distiller=fake_distiller) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        code, msg = rpc_error(lambda: stub.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not among the 1 trusted keys" in msg
        assert srv.registry.current_bundle() is None
