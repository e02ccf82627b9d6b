"""BlobStore atomicity and integrity, the SQLite registry (WAL, idempotent samples, versions), the codec."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from server.codec import CodecError, decode_array, decode_arrays, encode_array, encode_arrays
from server.errors import BlobCorruptError, BlobNotFoundError, InvalidRequestError, StorageError
from server.records import BundleRecord, FileEntry, OutboxRecord, SampleRecord, Storage, UpdateRecord
from server.storage import SCHEMA_VERSION, BlobStore, Registry


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_blob_put_get_is_content_addressed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.path(digest) == tmp_path / "blobs" / digest[:2] / digest
    assert store.exists(digest) and store.get(digest) == b"hello"
    assert store.put(b"hello") == digest
    assert _files(tmp_path / "blobs") == [f"{digest[:2]}/{digest}"]  # one file, no temporaries


def test_blob_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path / "blobs")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put(b"payload")
    digest = hashlib.sha256(b"payload").hexdigest()
    assert not store.exists(digest)
    assert _files(tmp_path / "blobs") == []  # the temporary file was removed too


def test_blob_fsync_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path / "blobs")

    def failing_fsync(fd: int) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        store.put(b"payload")
    assert _files(tmp_path / "blobs") == []


def test_blob_corruption_is_detected_and_repaired(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.put(b"original bytes")
    store.path(digest).write_bytes(b"bit rot")
    with pytest.raises(BlobCorruptError, match=digest):
        store.get(digest)
    assert store.put(b"original bytes") == digest  # re-put rewrites the damaged file
    assert store.get(digest) == b"original bytes"


def test_blob_missing_and_malformed_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(BlobNotFoundError, match="a" * 64):
        store.get("a" * 64)
    with pytest.raises(InvalidRequestError, match="malformed"):
        store.path("../../etc/passwd")


def _sample(sid: str, device: str = "d1", bundle: str = "b" * 64) -> SampleRecord:
    return SampleRecord(sid, device, bundle, None, None, 0.5, 1, 0, 10, 20)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "reg.sqlite3")
    reg.upsert_device("d1", {"site": "lab"}, "onnx", 100)
    reg.put_bundle(BundleRecord("b" * 64, {"schema_version": 1}, {"m.onnx": FileEntry("c" * 64, 3)}, 1), True)
    return reg


def test_registry_is_wal_full_sync_and_versioned(registry: Registry, tmp_path: Path) -> None:
    assert isinstance(registry, Storage)
    assert registry.schema_version() == SCHEMA_VERSION
    conn = registry._conn  # the live connection: synchronous is a per-connection setting
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    registry.close()
    with sqlite3.connect(tmp_path / "reg.sqlite3") as raw:
        raw.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StorageError, match="99"):
        Registry(tmp_path / "reg.sqlite3")


def test_sample_insert_is_idempotent_and_survives_reopen(registry: Registry, tmp_path: Path) -> None:
    assert registry.insert_samples([_sample("a"), _sample("b")]) == [True, True]
    assert registry.insert_samples([_sample("b"), _sample("c"), _sample("c")]) == [False, True, False]
    registry.close()
    reopened = Registry(tmp_path / "reg.sqlite3")
    assert [s.sample_id for s in reopened.unused_samples("b" * 64, None, with_input=False)] == ["a", "b", "c"]
    assert reopened.get_device("d1").samples_stored == 3  # type: ignore[union-attr]
    assert reopened.current_bundle().files == {"m.onnx": FileEntry("c" * 64, 3)}  # type: ignore[union-attr]
    reopened.mark_samples_used(["a", "c"], round_id=7)
    assert [s.sample_id for s in reopened.unused_samples("b" * 64, None, with_input=False)] == ["b"]
    assert reopened.get_sample("a").used_in_round == 7  # type: ignore[union-attr]


def test_concurrent_writers_are_serialised(registry: Registry) -> None:
    results: list[list[bool]] = []

    def writer(t: int) -> None:
        for i in range(20):
            results.append(registry.insert_samples([_sample(f"{t}-{i}"), _sample("shared")]))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert len(registry.unused_samples("b" * 64, None, with_input=False)) == 81
    assert sum(r[1] for r in results) == 1  # "shared" was new exactly once


def _update(bundle_id: str, cohort: str = "default", blob: str = "1" * 64) -> UpdateRecord:
    return UpdateRecord(0, bundle_id, "fedavg", None, blob, "s", 1, cohort, blob, "s", "f32", 0, "", "")


def test_update_versions_count_per_cohort(registry: Registry) -> None:
    registry.put_bundle(BundleRecord("e" * 64, {}, {}, 2), make_current=False)
    v1 = registry.insert_update(_update("b" * 64))
    v2 = registry.insert_update(_update("e" * 64))
    v3 = registry.insert_update(_update("b" * 64))
    w1 = registry.insert_update(_update("b" * 64, cohort="lab"))
    assert (v1.version, v2.version, v3.version, w1.version) == (1, 2, 3, 1)
    assert [u.version for u in registry.updates_since("b" * 64, 0)] == [1, 3]
    assert [u.version for u in registry.updates_since("b" * 64, 1)] == [3]
    assert [u.version for u in registry.updates_since("b" * 64, 0, "lab")] == [1]
    assert registry.latest_update("e" * 64) == v2 and registry.latest_version() == 3
    assert registry.latest_version("lab") == 1 and registry.latest_update("b" * 64, "lab") == w1
    assert registry.current_bundle().bundle_id == "b" * 64  # type: ignore[union-attr]
    registry.set_acked_version("d1", 3)
    registry.set_acked_version("d1", 1)  # never lowers
    assert registry.get_device("d1").acked_update_version == 3  # type: ignore[union-attr]


def test_round_records_round_trip(registry: Registry) -> None:
    from dataclasses import replace

    r = registry.create_round("fedavg", 5)
    assert (r.round_id, r.state) == (1, "queued")
    registry.save_round(replace(r, state="done", update_version=2, samples_used=9, seconds=0.5,
                                metrics={"kl": 0.25}))
    assert registry.get_round(1) == replace(r, state="done", update_version=2, samples_used=9, seconds=0.5,
                                            metrics={"kl": 0.25})
    assert registry.get_round(2) is None


def test_codec_round_trip_is_canonical() -> None:
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, -2], dtype=np.int64),
              "s": np.float32(3.5) * np.ones((), np.float32)}
    blob = encode_arrays(arrays)
    assert blob == encode_arrays(dict(reversed(list(arrays.items()))))
    out = decode_arrays(blob)
    assert sorted(out) == ["a", "b", "s"]
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)
    x = np.random.default_rng(0).random((1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(decode_array(encode_array(x)), x)
    with pytest.raises(CodecError):
        decode_arrays(blob[:-4])
    with pytest.raises(CodecError):
        decode_arrays(b"nonsense")


def _outbox(dropped: int, pending: int, reported_ms: int, policy: str = "drop_oldest") -> OutboxRecord:
    return OutboxRecord("d1", dropped, dropped * 100, pending, pending * 100, 10_000, policy, reported_ms, 5)


def test_outbox_reports_merge_monotone_drops_and_newest_pending(registry: Registry, tmp_path: Path) -> None:
    assert registry.get_outbox("d1") is None
    assert registry.get_device("d1").outbox_dropped == 0  # type: ignore[union-attr]
    registry.record_outbox(_outbox(dropped=3, pending=7, reported_ms=200))
    merged = registry.record_outbox(_outbox(dropped=1, pending=2, reported_ms=100))  # older, reordered
    got = (merged.dropped_samples, merged.dropped_bytes, merged.pending_samples, merged.reported_ms)
    assert got == (3, 300, 7, 200)
    merged = registry.record_outbox(_outbox(dropped=2, pending=0, reported_ms=300, policy="drop_newest"))
    assert (merged.dropped_samples, merged.pending_samples, merged.eviction_policy) == (3, 0, "drop_newest")
    registry.record_outbox(_outbox(dropped=9, pending=4, reported_ms=400))
    registry.close()
    reopened = Registry(tmp_path / "reg.sqlite3")
    device = reopened.get_device("d1")
    assert (device.outbox_dropped, device.outbox_pending) == (9, 4)  # type: ignore[union-attr]
    assert [d.outbox_dropped for d in reopened.list_devices()] == [9]


def test_samples_and_the_devices_last_seen_time_commit_together(registry: Registry) -> None:
    """One transaction per upload: the inserted samples and the device's last-seen time."""
    assert registry.device_exists("d1") and not registry.device_exists("ghost")
    assert registry.insert_samples([_sample("a")], seen_ms=5_000) == [True]
    device = registry.get_device("d1")
    assert device is not None and device.last_seen_ms == 5_000 and device.samples_stored == 1
    registry.insert_samples([_sample("b")], seen_ms=4_000)  # never moves back
    assert registry.get_device("d1").last_seen_ms == 5_000  # type: ignore[union-attr]


def test_small_tensors_commit_with_their_samples(registry: Registry, tmp_path: Path) -> None:
    """An upload's small tensors are rows of the registry, written in the samples' own transaction."""
    digest = hashlib.sha256(b"tensor").hexdigest()
    assert registry.insert_samples([_sample("t")], seen_ms=1, tensors={digest: b"tensor"}) == [True]
    assert registry.get_tensor(digest) == b"tensor" and registry.get_tensor("0" * 64) is None
    registry.close()
    assert Registry(tmp_path / "reg.sqlite3").get_tensor(digest) == b"tensor"  # durable across a reopen


def test_sample_tensor_reads_the_registry_then_the_blob_store_and_verifies(tmp_path: Path) -> None:
    from server.broker import UpdateBroker
    from server.state import Limits, ServerState, sample_tensor

    reg = Registry(tmp_path / "reg.sqlite3")
    reg.upsert_device("d1", {}, "onnx", 1)
    reg.put_bundle(BundleRecord("b" * 64, {"schema_version": 1}, {"m.onnx": FileEntry("c" * 64, 3)}, 1), True)
    state = ServerState(reg, BlobStore(tmp_path / "blobs"), UpdateBroker(0), Limits())
    small, big = hashlib.sha256(b"small").hexdigest(), state.blobs.put(b"big" * 10)
    reg.insert_samples([_sample("s")], tensors={small: b"small"})
    assert sample_tensor(state, small) == b"small" and sample_tensor(state, big) == b"big" * 10
    with pytest.raises(BlobNotFoundError):
        sample_tensor(state, "f" * 64)
    reg.insert_samples([_sample("r")], tensors={small: b"bit rot"})  # a damaged row is refused on read
    with pytest.raises(BlobCorruptError, match=small):
        sample_tensor(state, small)


def test_temporaries_a_crashed_write_left_are_removed_when_the_store_opens(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"kept")
    shard = store.path(digest).parent
    stale, fresh = shard / ".tmp-crashed", shard / ".tmp-in-flight"
    stale.write_bytes(b"half a blob")
    fresh.write_bytes(b"a write still going on")
    hours_ago = os.stat(stale).st_mtime - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    reopened = BlobStore(tmp_path / "blobs")
    assert not stale.exists() and fresh.exists()  # only what no live writer can still be using
    assert reopened.get(digest) == b"kept"
