"""SqliteOutbox on a real SQLite file: durability, idempotency, backoff, eviction policies and their counts."""

from __future__ import annotations

import io
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from device_agents.outbox import BackoffPolicy, OutboxSample, OutboxStats, PutResult, SqliteOutbox


def _sample(i: int, size: int = 64, features: bool = True) -> OutboxSample:
    rng = np.random.default_rng(i)
    return OutboxSample(
        sample_id=f"dev-{i}",
        bundle_id="b" * 64,
        input=rng.random((1, 8, 8), dtype=np.float32)[:, :, : size // 32],
        features=rng.random(4, dtype=np.float32) if features else None,
        entropy=0.1 * (i % 10),
        prediction=i % 10,
        stream_position=i,
        captured_ms=1_000 + i,
    )


def test_put_survives_reopen_and_round_trips_fields(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    originals = [_sample(i) for i in range(5)]
    with SqliteOutbox(path, max_bytes=1 << 20) as box:
        assert box.put(originals, now_ms=10) == PutResult(tuple(s.sample_id for s in originals), 0, 0)
    with SqliteOutbox(path, max_bytes=1 << 20) as box:
        assert box.pending_count == 5
        got = box.peek_batch(10, now_ms=10)
    assert [s.sample_id for s in got] == [s.sample_id for s in originals]
    for a, b in zip(got, originals, strict=True):
        np.testing.assert_array_equal(a.input, b.input)
        np.testing.assert_array_equal(a.features, b.features)
        assert a.input.dtype == np.float32
        assert (a.entropy, a.prediction, a.stream_position, a.captured_ms) == pytest.approx(
            (b.entropy, b.prediction, b.stream_position, b.captured_ms)
        )


def test_wal_and_full_sync_are_on(tmp_path: Path) -> None:
    with SqliteOutbox(tmp_path / "o.db", max_bytes=1000) as box:
        assert box._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_put_is_visible_to_another_connection_immediately(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with SqliteOutbox(path, max_bytes=1 << 20) as box:
        box.put([_sample(1)], now_ms=0)
        other = sqlite3.connect(path)
        assert other.execute("SELECT sample_id FROM samples").fetchall() == [("dev-1",)]
        other.close()


def test_ids_are_idempotent(tmp_path: Path) -> None:
    with SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20) as box:
        assert box.put([_sample(1), _sample(2)], now_ms=0).stored == ("dev-1", "dev-2")
        assert box.put([_sample(2), _sample(3)], now_ms=0) == PutResult(("dev-3",), 1, 0)
        assert box.pending_count == 3
        assert box.ack(["dev-1", "dev-1", "nope"]) == 1
        assert box.pending_count == 2


def test_features_only_samples(tmp_path: Path) -> None:
    s = OutboxSample("x", "b", None, np.ones(3, np.float32), 0.2, 1, 0, 0)
    with SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20) as box:
        box.put([s], now_ms=0)
        (got,) = box.peek_batch(1, now_ms=0)
    assert got.input is None and got.features.tolist() == [1.0, 1.0, 1.0]


def test_nack_backoff_schedule_is_exponential_capped_and_jittered(tmp_path: Path) -> None:
    policy = BackoffPolicy(base_ms=100, max_ms=1000, jitter=0.5)
    box = SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20, backoff=policy, rng=random.Random(3))
    box.put([_sample(1)], now_ms=0)
    expected_rng = random.Random(3)
    now = 0
    for attempt in range(1, 8):
        assert box.nack(["dev-1"], now_ms=now) == 1
        base = min(1000, 100 * 2 ** (attempt - 1))
        due = now + int(base * (1 + 0.5 * expected_rng.random()))
        assert box.peek_batch(5, now_ms=due - 1) == []
        (s,) = box.peek_batch(5, now_ms=due)
        assert s.attempts == attempt and s.next_attempt_ms == due
        assert base <= due - now <= 1.5 * base
        now = due
    box.close()


def test_backoff_delay_without_jitter() -> None:
    policy = BackoffPolicy(base_ms=1000, max_ms=8000, jitter=0.0)
    assert [policy.delay_ms(k, 0.9) for k in range(1, 7)] == [1000, 2000, 4000, 8000, 8000, 8000]


def test_peek_returns_only_due_oldest_first(tmp_path: Path) -> None:
    with SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20, rng=random.Random(0)) as box:
        box.put([_sample(i) for i in range(6)], now_ms=0)
        box.nack(["dev-0", "dev-2"], now_ms=0)
        assert [s.sample_id for s in box.peek_batch(3, now_ms=0)] == ["dev-1", "dev-3", "dev-4"]
        assert len(box.peek_batch(10, now_ms=10**9)) == 6


def _sample_bytes(tmp_path: Path) -> int:
    with SqliteOutbox(tmp_path / "probe.db", max_bytes=1 << 20) as probe:
        probe.put([_sample(0)], now_ms=0)
        return probe.pending_bytes


def test_eviction_drops_oldest_and_persists_count(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    size = _sample_bytes(tmp_path)
    with SqliteOutbox(path, max_bytes=3 * size) as box:
        first = box.put([_sample(i) for i in range(5)], now_ms=0)
        assert first == PutResult(("dev-2", "dev-3", "dev-4"), 0, 2)  # dev-0, dev-1 never acknowledged
        assert box.pending_count == 3 and box.dropped == 2 and box.dropped_bytes == 2 * size
        assert box.pending_bytes <= 3 * size
        assert box.put([_sample(i) for i in range(5, 7)], now_ms=1) == PutResult(("dev-5", "dev-6"), 0, 2)
        assert box.dropped == 4
    with SqliteOutbox(path, max_bytes=3 * size) as box:
        assert box.stats == OutboxStats(3, 3 * size, 4, 4 * size, 3 * size, "drop_oldest")
        assert [s.sample_id for s in box.peek_batch(10, now_ms=5)] == ["dev-4", "dev-5", "dev-6"]


def test_eviction_drop_newest_keeps_the_backlog(tmp_path: Path) -> None:
    size = _sample_bytes(tmp_path)
    with SqliteOutbox(tmp_path / "o.db", max_bytes=3 * size, eviction="drop_newest") as box:
        assert box.put([_sample(i) for i in range(2)], now_ms=0) == PutResult(("dev-0", "dev-1"), 0, 0)
        assert box.put([_sample(i) for i in range(2, 5)], now_ms=1) == PutResult(("dev-2",), 0, 2)
        assert [s.sample_id for s in box.peek_batch(10, now_ms=5)] == ["dev-0", "dev-1", "dev-2"]
        box.ack(["dev-0"])
        assert box.put([_sample(9)], now_ms=2).stored == ("dev-9",)  # room again
        assert box.stats == OutboxStats(3, 3 * size, 2, 2 * size, 3 * size, "drop_newest")


def test_every_sample_is_pending_acked_or_counted_as_dropped(tmp_path: Path) -> None:
    size = _sample_bytes(tmp_path)
    rng = random.Random(5)
    offered = acked = 0
    with SqliteOutbox(tmp_path / "o.db", max_bytes=10 * size) as box:
        for step in range(30):
            n = rng.randint(1, 6)
            offered += n
            box.put([_sample(100 * step + i) for i in range(n)], now_ms=step)
            assert box.pending_bytes <= 10 * size
            acked += box.ack([s.sample_id for s in box.peek_batch(rng.randint(1, 3), now_ms=step)])
        stats = box.stats
    assert stats.dropped > 0
    assert stats.pending_count + stats.dropped + acked == offered
    assert stats.dropped_bytes == stats.dropped * size


def test_oversized_sample_is_rejected(tmp_path: Path) -> None:
    with SqliteOutbox(tmp_path / "o.db", max_bytes=100) as box, pytest.raises(ValueError, match="dev-1"):
        box.put([_sample(1)], now_ms=0)


def test_invalid_eviction_policy_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drop_random"):
        SqliteOutbox(tmp_path / "o.db", max_bytes=10, eviction="drop_random")


@pytest.mark.parametrize("kwargs", [{"base_ms": 0}, {"base_ms": 10, "max_ms": 5}, {"jitter": -0.1}])
def test_invalid_backoff_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)


def test_invalid_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        SqliteOutbox(tmp_path / "o.db", max_bytes=0)
    with SqliteOutbox(tmp_path / "p.db", max_bytes=10) as box, pytest.raises(ValueError, match="n must"):
        box.peek_batch(0, now_ms=0)


def test_put_refuses_samples_the_server_would_refuse_and_writes_nothing(tmp_path: Path) -> None:
    good = _sample(1)
    bad = {
        "non-finite entropy": OutboxSample("nan-entropy", "b", good.input, None, float("nan"), 0, 0, 0),
        "NaN or infinite": OutboxSample("nan-input", "b", np.full((1, 8, 8), np.nan, np.float32), None, 0.5, 0, 0, 0),
        "expected float32": OutboxSample("f64", "b", np.zeros((1, 8, 8)), None, 0.5, 0, 0, 0),
        "neither": OutboxSample("empty", "b", None, None, 0.5, 0, 0, 0),
    }
    with SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20) as box:
        for reason, sample in bad.items():
            with pytest.raises(ValueError, match=f"{sample.sample_id}.*{reason}"):
                box.put([good, sample], now_ms=0)  # the whole call is refused, the good sample included
        assert box.pending_count == 0
        assert box.put([good], now_ms=0).stored == (good.sample_id,)


@pytest.mark.parametrize("content", ["garbage", "other schema"])
def test_a_file_that_is_not_an_outbox_raises_an_error_naming_it(tmp_path: Path, content: str) -> None:
    from device_agents.errors import OutboxError

    path = tmp_path / "outbox.sqlite3"
    if content == "garbage":
        path.write_bytes(b"not a database " * 100)
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE samples (x INTEGER)")
    with pytest.raises(OutboxError, match=r"outbox\.sqlite3"):
        SqliteOutbox(path, max_bytes=1 << 20)


@pytest.mark.parametrize("damage", ["truncated npy", "not npy", "NaN array"])
def test_a_row_damaged_on_disk_is_dropped_and_counted_not_failing_every_upload(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "o.db"
    samples = [_sample(i) for i in range(3)]
    with SqliteOutbox(path, max_bytes=1 << 20) as box:
        box.put(samples, now_ms=0)
        before = box.stats
    nan = np.full((1, 8, 2), np.nan, np.float32)
    blob = {"truncated npy": None, "not npy": b"\x00" * 40, "NaN array": None}[damage]
    with sqlite3.connect(path) as conn:  # damage the middle sample's input under SQLite's feet
        if damage == "truncated npy":
            (stored,) = conn.execute("SELECT input_npy FROM samples WHERE sample_id = 'dev-1'").fetchone()
            blob = stored[: len(stored) // 2]
        elif damage == "NaN array":
            buf = io.BytesIO()
            np.save(buf, nan, allow_pickle=False)
            blob = buf.getvalue()
        conn.execute("UPDATE samples SET input_npy = ? WHERE sample_id = 'dev-1'", (blob,))
    with SqliteOutbox(path, max_bytes=1 << 20) as box:
        batch = box.peek_batch(10, now_ms=0)
        assert [s.sample_id for s in batch] == ["dev-0", "dev-2"]
        np.testing.assert_array_equal(batch[1].input, samples[2].input)
        stats = box.stats
        assert stats.pending_count == 2 and stats.dropped == before.dropped + 1
        assert stats.dropped_bytes > before.dropped_bytes
        assert [s.sample_id for s in box.peek_batch(10, now_ms=0)] == ["dev-0", "dev-2"]  # gone for good
