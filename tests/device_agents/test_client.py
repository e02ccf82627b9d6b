"""DeviceClient against a real edgeloop server on 127.0.0.1:0, and against a faulty test servicer."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from device_agents.client import DeviceClient, decode_update
from device_agents.errors import BundleDownloadError, TransportError, UpdateIntegrityError
from device_agents.outbox import OutboxSample, SqliteOutbox
from device_agents.updates import check_signature, decode_params
from proto.edgeloop.v1 import common_pb2, device_pb2_grpc
from runtime import AdaptableModel, load_bundle
from runtime.errors import ManifestError
from runtime.files import STALE_TEMPORARY_SECONDS
from runtime.manifest import read_manifest


def _samples(bundle_id: str, n: int, start: int = 0) -> list[OutboxSample]:
    rng = np.random.default_rng(start)
    return [
        OutboxSample(f"dev-1:{i}", bundle_id, rng.random((1, 8, 8), dtype=np.float32), None, 0.3, 1, i, 1000 + i)
        for i in range(start, start + n)
    ]


@pytest.fixture
def client(edge_server) -> Iterator[DeviceClient]:
    with DeviceClient(edge_server.target, "dev-1", timeout=10.0) as c:
        yield c


def test_register_fetch_and_reuse(edge_server, client: DeviceClient, tmp_path: Path, bundle_dir: Path) -> None:
    info = client.register({"cohort": "test"})
    assert info.bundle_id == edge_server.bundle_id and info.latest_update_version == 0
    assert "manifest.json" in info.bundle_files
    path = client.fetch_bundle(info.bundle_id, tmp_path / "bundles")
    assert path == tmp_path / "bundles" / info.bundle_id
    assert load_bundle(path).bundle_id == info.bundle_id
    manifest = read_manifest(bundle_dir)[0]
    needed = ["manifest.json", "manifest.sig", *manifest.files_for(manifest.default_model)]
    size = sum((bundle_dir / name).stat().st_size for name in needed)
    assert size < client.bytes_down < size * 1.1  # only the default model's files were fetched
    assert sorted(p.name for p in path.iterdir()) == sorted(needed)
    assert not (path / "model_int8.onnx").exists()
    assert [p.name for p in (tmp_path / "bundles").iterdir()] == [info.bundle_id]  # no temp dir left
    before = client.bytes_down
    assert client.fetch_bundle(info.bundle_id, tmp_path / "bundles") == path
    assert client.bytes_down == before  # already installed and verified: no download


def test_fetch_removes_downloads_a_killed_process_left(
    client: DeviceClient, edge_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed mid-download (SIGKILL, power loss) left its temporary ``.<id[:12]>-XXXX`` directory
    behind for ever: the next fetch into the same directory removes those in which nothing changed for an hour
    (STALE_TEMPORARY_SECONDS), each logged at INFO, and keeps younger ones — a download in progress, maybe
    another process's, that may still be writing a file in an old directory — and everything else."""
    client.register()
    dest = tmp_path / "bundles"
    hour_ago = time.time() - STALE_TEMPORARY_SECONDS - 60

    def made(name: str, mtime: float, file_mtime: float | None = None) -> Path:
        path = dest / name
        path.mkdir(parents=True)
        if file_mtime is not None:
            (path / "model_fp32.onnx").write_bytes(b"partial")
            os.utime(path / "model_fp32.onnx", (file_mtime, file_mtime))
        os.utime(path, (mtime, mtime))
        return path

    stale = made(f".{edge_server.bundle_id[:12]}-k1ll3d_x", hour_ago, hour_ago)
    stale_other = made(".0123456789ab-0ld_6ndl", hour_ago)  # another bundle's, empty
    fresh = made(f".{edge_server.bundle_id[:12]}-fresh_01", time.time())
    writing = made(f".{edge_server.bundle_id[:12]}-wr1t1ng0", hour_ago, time.time())
    kept = [made(name, hour_ago) for name in ("notes", ".cache", ".0123456789ab", ".0123456789AB-0ld_6ndl")]
    with caplog.at_level(logging.INFO, logger="device_agents.client"):
        path = client.fetch_bundle(edge_server.bundle_id, dest)
    assert load_bundle(path).bundle_id == edge_server.bundle_id
    assert not stale.exists() and not stale_other.exists()
    assert all(p.is_dir() for p in [fresh, writing, *kept]) and (writing / "model_fp32.onnx").is_file()
    removals = [r.getMessage() for r in caplog.records
                if r.levelno == logging.INFO and "removed the interrupted download" in r.getMessage()]
    assert len(removals) == 2 and {str(stale), str(stale_other)} == {m.split()[4] for m in removals}


def test_class_statistics_are_fetched_only_on_request(client: DeviceClient, edge_server, tmp_path: Path) -> None:
    """The class-conditional Gaussians (kilobytes a default device never reads) come only when asked for; an
    installed copy without them is completed when a later caller needs them."""
    client.register()
    path = client.fetch_bundle(edge_server.bundle_id, tmp_path)
    manifest = read_manifest(path)[0]
    assert manifest.class_statistics_file == "class_statistics.bin" and not (path / "class_statistics.bin").exists()
    with pytest.raises(ManifestError, match="fetches it only when it needs it"):
        manifest.class_gaussians(path)
    before = client.bytes_down
    assert client.fetch_bundle(edge_server.bundle_id, tmp_path, class_statistics=True) == path
    assert client.bytes_down > before and (path / "class_statistics.bin").is_file()
    means, cov, _ = read_manifest(path)[0].class_gaussians(path)
    assert means.shape[1] == cov.shape[0] == manifest.feature_dim


def test_fetch_replaces_a_corrupted_installed_copy(client: DeviceClient, edge_server, tmp_path: Path) -> None:
    client.register()
    path = client.fetch_bundle(edge_server.bundle_id, tmp_path)
    assert (path / "golden_fp32.bin").is_file()
    (path / "golden_fp32.bin").write_bytes(b"tampered")
    assert client.fetch_bundle(edge_server.bundle_id, tmp_path) == path
    assert load_bundle(path).bundle_id == edge_server.bundle_id


def test_upload_drains_outbox_and_duplicates_are_not_double_stored(
    edge_server, client: DeviceClient, tmp_path: Path
) -> None:
    client.register()
    with SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20) as box:
        box.put(_samples(edge_server.bundle_id, 10))
        result = client.upload(box, max_batch=4)
        assert (result.batches, result.sent, result.stored, result.duplicates) == (3, 10, 10, 0)
        assert result.bytes_sent > 10 * 256
        assert box.pending_count == 0
        assert edge_server.samples_stored("dev-1") == 10
        box.put(_samples(edge_server.bundle_id, 6, start=6))  # 4 retried ids + 2 new
        again = client.upload(box)
        assert (again.stored, again.duplicates) == (2, 4)
        assert box.pending_count == 0
    assert edge_server.samples_stored("dev-1") == 12
    assert client.bytes_up >= result.bytes_sent + again.bytes_sent


def test_upload_failure_nacks_and_raises(edge_server, tmp_path: Path) -> None:
    with DeviceClient(edge_server.target, "never-registered") as c, \
            SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20) as box:
        box.put(_samples(edge_server.bundle_id, 3), now_ms=0)
        with pytest.raises(TransportError) as err:
            c.upload(box, now_ms=0)
        assert err.value.method == "UploadSamples"
        assert box.pending_count == 3
        assert box.peek_batch(10, now_ms=0) == []
        assert all(s.attempts == 1 for s in box.peek_batch(10, now_ms=10**12))


def test_a_sample_the_server_refuses_does_not_hold_back_the_rest(edge_server, client: DeviceClient,
                                                                   tmp_path: Path) -> None:
    client.register()
    with SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20) as box:
        bad_shape = OutboxSample("dev-1:bad", edge_server.bundle_id, np.zeros((3, 5), np.float32), None, 0.3, 1, 99, 0)
        old_bundle = OutboxSample("dev-1:old", "c" * 64, np.zeros((1, 8, 8), np.float32), None, 0.3, 1, 98, 0)
        box.put([bad_shape, old_bundle], now_ms=0)  # oldest: at the head of every batch
        box.put(_samples(edge_server.bundle_id, 5), now_ms=0)
        with pytest.raises(TransportError, match="dev-1:bad") as err:
            client.upload(box, max_batch=8, now_ms=0)
        assert err.value.code == "INVALID_ARGUMENT"
        assert edge_server.samples_stored("dev-1") == 5  # delivered although the batch was refused
        pending = box.peek_batch(10, now_ms=10**12)
        assert [(s.sample_id, s.attempts) for s in pending] == [("dev-1:bad", 1), ("dev-1:old", 1)]  # kept


def test_watch_updates_yields_signed_deltas_that_chain(edge_server, client: DeviceClient, bundle_dir: Path) -> None:
    info = client.register()
    held = AdaptableModel(load_bundle(bundle_dir)).params
    params = dict(held)
    params["bn1.bias"] = params["bn1.bias"] + 0.25
    v1 = edge_server.publish_update(params)
    params["bn1.bias"] = params["bn1.bias"] + 0.25
    v2 = edge_server.publish_update(params)
    got = list(client.watch_updates(edge_server.bundle_id, since_version=0, max_wait=0.3))
    assert [u.version for u in got] == [v1, v2] and [u.base_version for u in got] == [0, v1]
    assert {u.encoding for u in got} == {"int8_delta"} and got[1].kind == "distill"
    for update, version in zip(got, (0, v1), strict=True):
        check_signature(update, (info.update_public_key,))
        held = decode_params(update, held, version)
    np.testing.assert_allclose(held["bn1.bias"], params["bn1.bias"], rtol=0, atol=0.25 / 254 + 1e-6)
    assert list(client.watch_updates(edge_server.bundle_id, since_version=v2, max_wait=0.2)) == []
    # a device holding another base (e.g. after a rollback) gets the update in full
    full = list(client.watch_updates(edge_server.bundle_id, since_version=v1, max_wait=0.2, held_version=0))
    assert [(u.version, u.encoding) for u in full] == [(v2, "f32")]
    assert decode_params(full[0], {}, 0)["bn1.bias"].tolist() == held["bn1.bias"].tolist()


def test_drift_report_and_federated_submission(edge_server, client: DeviceClient, bundle_dir: Path) -> None:
    client.register()
    assert client.report_drift("page_hinkley", "entropy", 7.5, 5.0, 1234) >= 1
    params = AdaptableModel(load_bundle(bundle_dir)).params
    assert client.submit_update(edge_server.bundle_id, 0, 64, params) >= 1


def test_unreachable_server_raises_transport_error() -> None:
    with DeviceClient("127.0.0.1:1", "dev-x", timeout=0.5) as c, pytest.raises(TransportError) as err:
        c.register()
    assert err.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_decode_update_needs_this_bundle_and_a_payload() -> None:
    msg = common_pb2.ParameterUpdate(version=3, bundle_id="b" * 64, kind="fedavg", encoding="f32", payload=b"x")
    assert decode_update(msg, "b" * 64).version == 3
    with pytest.raises(UpdateIntegrityError, match="bundle"):
        decode_update(msg, "c" * 64)
    with pytest.raises(UpdateIntegrityError, match="payload"):
        decode_update(common_pb2.ParameterUpdate(version=3, bundle_id="b" * 64), "b" * 64)


class FaultyDeviceService(device_pb2_grpc.DeviceServiceServicer):
    """Serves a bundle directory, corrupting the first ``corrupt_times`` sends of ``corrupt_path``."""

    def __init__(self, root: Path, bundle_id: str, corrupt_path: str, corrupt_times: int,
                 unsafe: bool = False) -> None:
        self.root, self.bundle_id = root, bundle_id
        self.corrupt_path, self.corrupt_left, self.unsafe = corrupt_path, corrupt_times, unsafe
        self.requests: list[list[str]] = []

    def FetchBundle(self, request, context):  # noqa: N802 - gRPC method name
        self.requests.append(list(request.paths))
        files = list(request.paths) or sorted(p.name for p in self.root.iterdir())
        for rel in files:
            data = (self.root / rel).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if rel == self.corrupt_path and self.corrupt_left > 0:
                self.corrupt_left -= 1
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            path = "../evil" if self.unsafe else rel
            for off in range(0, len(data), 1000):
                yield common_pb2.BundleChunk(bundle_id=self.bundle_id, path=path, offset=off,
                                             data=data[off : off + 1000], file_size=len(data), file_sha256=digest)


@pytest.fixture
def faulty(bundle_dir: Path) -> Iterator[tuple[FaultyDeviceService, str]]:
    bundle_id = hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    service = FaultyDeviceService(bundle_dir, bundle_id, "model_fp32.onnx", 1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    device_pb2_grpc.add_DeviceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(0)


def test_fetch_refetches_a_corrupted_file_once(faulty, tmp_path: Path) -> None:
    service, target = faulty
    with DeviceClient(target, "dev-1") as c:
        path = c.fetch_bundle(service.bundle_id, tmp_path)
    manifest = read_manifest(service.root)[0]
    # the signed manifest first, then only the default model's files, then the corrupted file once more
    assert service.requests == [["manifest.json", "manifest.sig"], manifest.files_for("fp32"), ["model_fp32.onnx"]]
    assert load_bundle(path).bundle_id == service.bundle_id


def test_fetch_gives_up_after_second_mismatch_and_leaves_nothing(faulty, tmp_path: Path) -> None:
    service, target = faulty
    service.corrupt_left = 2
    with DeviceClient(target, "dev-1") as c, pytest.raises(BundleDownloadError, match=r"model_fp32\.onnx"):
        c.fetch_bundle(service.bundle_id, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_rejects_unsafe_paths(faulty, tmp_path: Path) -> None:
    service, target = faulty
    service.unsafe = True
    with DeviceClient(target, "dev-1") as c, pytest.raises(BundleDownloadError, match="unsafe path"):
        c.fetch_bundle(service.bundle_id, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_fetch_rejects_a_bundle_whose_manifest_does_not_match_its_id(faulty, tmp_path: Path) -> None:
    service, target = faulty
    service.corrupt_left = 0
    wrong = "0" * 64
    service.bundle_id = wrong
    with DeviceClient(target, "dev-1") as c, pytest.raises(BundleDownloadError, match="hashes to"):
        c.fetch_bundle(wrong, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_watch_without_limit_is_cancelled_from_another_thread(edge_server, client: DeviceClient) -> None:
    client.register()
    stream = client.watch_updates(edge_server.bundle_id, since_version=0, max_wait=0.0)
    timer = threading.Timer(0.2, stream.cancel)
    started = time.monotonic()
    timer.start()
    with pytest.raises(StopIteration):
        next(stream)
    assert 0.15 < time.monotonic() - started < 3.0
