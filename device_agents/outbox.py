"""A durable, bounded queue of samples waiting to be uploaded, in one SQLite file.

Each row is one sample keyed by ``sample_id`` (the server's idempotency key). Arrays are stored as ``.npy``
bytes; their total length is the row's ``nbytes``, which the byte bound counts. The database runs in WAL mode
with ``synchronous=FULL`` and every write commits before returning, so a sample acknowledged by :meth:`put`
survives a crash.

The byte bound is enforced by an explicit eviction policy (:data:`EVICTION_POLICIES`): when the pending
bytes exceed ``max_bytes`` after a :meth:`SqliteOutbox.put`, ``"drop_oldest"`` deletes the oldest samples
(fresh data wins: after a drift the new domain matters more), ``"drop_newest"`` deletes the newest ones, i.e.
refuses what did not fit (the backlog wins). Either way the persisted ``dropped`` / ``dropped_bytes`` counters
grow (as they do for a row whose arrays no longer decode, which :meth:`SqliteOutbox.peek_batch` deletes); the
agent reports them to the server (``ReportOutbox``), so a fleet operator sees what was lost.
A sample is *acknowledged locally* once ``put`` returned it in :attr:`PutResult.stored`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agents.errors import OutboxError
from device_agents.sqlite_store import SqliteStore, from_npy, to_npy

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL UNIQUE,
    bundle_id TEXT NOT NULL,
    input_npy BLOB,
    features_npy BLOB,
    entropy REAL NOT NULL,
    prediction INTEGER NOT NULL,
    stream_position INTEGER NOT NULL,
    captured_ms INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_due ON samples (next_attempt_ms, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped', 0);
INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped_bytes', 0);
"""
EVICTION_POLICIES = ("drop_oldest", "drop_newest")
"""How the byte bound is enforced: delete the oldest pending samples, or the newest (refuse new ones)."""
_COLUMNS = (
    "sample_id, bundle_id, input_npy, features_npy, entropy, prediction, stream_position, captured_ms, "
    "created_ms, attempts, next_attempt_ms"
)


@dataclass(frozen=True)
class OutboxSample:
    """One sample to upload. ``input``/``features`` may be None (features-only or input-only mode).

    ``attempts`` and ``next_attempt_ms`` are filled in by the outbox when read back.
    """

    sample_id: str
    bundle_id: str
    input: np.ndarray | None
    features: np.ndarray | None
    entropy: float
    prediction: int
    stream_position: int
    captured_ms: int
    attempts: int = 0
    next_attempt_ms: int = 0


@dataclass(frozen=True)
class BackoffPolicy:
    """Retry delay after the k-th failed attempt: ``min(max_ms, base_ms · 2^(k-1)) · (1 + jitter · u)``,
    u ~ U[0, 1) from the outbox's random generator."""

    base_ms: int = 1_000
    max_ms: int = 300_000
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.base_ms <= 0 or self.max_ms < self.base_ms:
            raise ValueError(f"need 0 < base_ms <= max_ms, got base_ms={self.base_ms}, max_ms={self.max_ms}")
        if not (math.isfinite(self.jitter) and self.jitter >= 0):
            raise ValueError(f"jitter must be finite and >= 0, got {self.jitter}")

    def delay_ms(self, attempts: int, u: float) -> int:
        """Delay before the next try of a sample that has failed ``attempts`` (>= 1) times."""
        base = min(float(self.max_ms), self.base_ms * 2.0 ** min(attempts - 1, 62))
        return int(base * (1.0 + self.jitter * u))


@dataclass(frozen=True)
class PutResult:
    """Outcome of :meth:`SqliteOutbox.put`.

    ``stored``: ids newly stored and still pending after eviction (acknowledged locally, in input order);
    ``duplicates``: ids already present (ignored); ``evicted``: samples (new or old) dropped by the byte bound.
    """

    stored: tuple[str, ...]
    duplicates: int
    evicted: int


@dataclass(frozen=True)
class OutboxStats:
    """A snapshot of the outbox: what is pending, and what was dropped since creation (byte bound, unreadable)."""

    pending_count: int
    pending_bytes: int
    dropped: int
    dropped_bytes: int
    max_bytes: int
    eviction: str


def _check_array(sample_id: str, what: str, array: np.ndarray | None) -> None:
    """A sample's array must hold finite float32 numbers: the server refuses anything else, and a sample it
    refuses would be retried forever at the head of the queue."""
    if array is None:
        return
    arr = np.asarray(array)
    if arr.dtype != np.float32:
        raise ValueError(f"sample {sample_id!r}: {what} has dtype {arr.dtype}, expected float32")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sample {sample_id!r}: {what} holds NaN or infinite values")


class SqliteOutbox(SqliteStore):
    """Durable sample queue bounded by ``max_bytes`` of stored array bytes under an ``eviction`` policy.

    ``rng`` draws the backoff jitter (seed it for a reproducible retry schedule). Thread-safe. A file that
    cannot be opened as an outbox raises :class:`~device_agents.errors.OutboxError` naming it, and so does every
    later read or write SQLite fails (a page damaged on disk, a lock held beyond the timeout, an I/O error).
    """

    def __init__(
        self,
        path: str | Path,
        max_bytes: int,
        *,
        eviction: str = "drop_oldest",
        backoff: BackoffPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")
        self.max_bytes = int(max_bytes)
        self.eviction = eviction
        self.backoff = backoff or BackoffPolicy()
        self._rng = rng or random.Random()
        super().__init__(path, _SCHEMA, [f"SELECT {_COLUMNS}, seq, nbytes FROM samples LIMIT 0"], OutboxError,
                         "outbox")

    def put(self, samples: Iterable[OutboxSample], now_ms: int | None = None) -> PutResult:
        """Store samples (ids already present are ignored), enforce ``max_bytes`` by the eviction policy, commit.

        ``now_ms`` (default: wall clock) becomes the samples' ``created_ms`` and first due time. Returning
        means the samples in :attr:`PutResult.stored` are durable. A single sample larger than ``max_bytes``, with
        a non-finite entropy, with neither array, or with an array that is not finite float32 (what the server
        takes) raises ``ValueError`` before anything is written; only an id already present
        counts as a duplicate (any other constraint failure raises and writes nothing). A database that cannot
        be written (disk full, locked, I/O error) raises :class:`~device_agents.errors.OutboxError` naming the
        file; nothing is written then either.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
        rows = []
        for s in samples:
            if not math.isfinite(s.entropy):  # SQLite stores NaN as NULL: the row would not be written
                raise ValueError(f"sample {s.sample_id!r} has a non-finite entropy {s.entropy}")
            if s.input is None and s.features is None:
                raise ValueError(f"sample {s.sample_id!r} carries neither input nor features")
            for what, array in (("input", s.input), ("features", s.features)):
                _check_array(s.sample_id, what, array)
            inp, feat = to_npy(s.input), to_npy(s.features)
            nbytes = len(inp or b"") + len(feat or b"")
            if nbytes > self.max_bytes:
                raise ValueError(f"sample {s.sample_id!r} takes {nbytes} bytes, above max_bytes {self.max_bytes}")
            rows.append((s.sample_id, s.bundle_id, inp, feat, float(s.entropy), int(s.prediction),
                         int(s.stream_position), int(s.captured_ms), nbytes, int(now_ms), int(now_ms)))
        inserted: list[tuple[int, str]] = []
        try:
            with self._lock, self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                for row in rows:
                    cur = self._conn.execute(
                        "INSERT INTO samples (sample_id, bundle_id, input_npy, features_npy, entropy, "
                        "prediction, stream_position, captured_ms, nbytes, created_ms, next_attempt_ms) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sample_id) DO NOTHING",
                        row,
                    )
                    if cur.rowcount == 1:
                        inserted.append((int(cur.lastrowid or 0), row[0]))
                evicted = self._evict()
        except sqlite3.Error as exc:  # disk full, database locked beyond the timeout, I/O error: nothing written
            raise OutboxError(f"outbox {self.path}: could not store {len(rows)} samples ({exc}); none was "
                              "written") from exc
        stored = tuple(sample_id for seq, sample_id in inserted if seq not in evicted)
        return PutResult(stored, len(rows) - len(inserted), len(evicted))

    def _evict(self) -> set[int]:
        total = self._conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM samples").fetchone()[0]
        if total <= self.max_bytes:
            return set()
        order = "ASC" if self.eviction == "drop_oldest" else "DESC"
        doomed: list[int] = []
        freed = 0
        for seq, nbytes in self._conn.execute(f"SELECT seq, nbytes FROM samples ORDER BY seq {order}"):
            if total <= self.max_bytes:
                break
            doomed.append(seq)
            total -= nbytes
            freed += nbytes
        self._conn.executemany("DELETE FROM samples WHERE seq = ?", [(s,) for s in doomed])
        self._count_dropped(len(doomed), freed)
        logger.warning("outbox %s over %d bytes: %s dropped %d samples (%d bytes)", self.path, self.max_bytes,
                       self.eviction, len(doomed), freed)
        return set(doomed)

    def _count_dropped(self, samples: int, nbytes: int) -> None:
        """Add to the persisted ``dropped`` / ``dropped_bytes`` counters (inside the caller's transaction)."""
        self._conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (samples,))
        self._conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_bytes'", (nbytes,))

    def peek_batch(self, n: int, now_ms: int) -> list[OutboxSample]:
        """Up to ``n`` samples due at ``now_ms`` (next_attempt_ms <= now_ms), oldest first; not removed.

        A row whose stored arrays no longer decode as finite float32 (the file was damaged under SQLite, which
        checks no contents) can never be sent: it is deleted, counted in ``dropped`` / ``dropped_bytes`` like an
        eviction (so the server's ``ReportOutbox`` shows it) and logged, instead of failing every later upload."""
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        with self._failing("read the samples due"), self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS}, seq, nbytes FROM samples WHERE next_attempt_ms <= ? ORDER BY seq LIMIT ?",
                (int(now_ms), int(n)),
            ).fetchall()
            samples: list[OutboxSample] = []
            unreadable: list[tuple[int, int]] = []
            for r in rows:
                try:
                    arrays = from_npy(r[2]), from_npy(r[3])
                    for what, array in zip(("input", "features"), arrays, strict=True):
                        _check_array(r[0], what, array)
                except (ValueError, OSError, EOFError) as exc:
                    logger.error("outbox %s: sample %r is unreadable (%s); dropped", self.path, r[0], exc)
                    unreadable.append((r[11], r[12]))
                    continue
                samples.append(OutboxSample(
                    sample_id=r[0], bundle_id=r[1], input=arrays[0], features=arrays[1], entropy=r[4],
                    prediction=r[5], stream_position=r[6], captured_ms=r[7], attempts=r[9], next_attempt_ms=r[10],
                ))
            if unreadable:
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.executemany("DELETE FROM samples WHERE seq = ?", [(seq,) for seq, _ in unreadable])
                    self._count_dropped(len(unreadable), sum(nbytes for _, nbytes in unreadable))
        return samples

    def ack(self, ids: Sequence[str]) -> int:
        """Delete delivered samples; returns how many were present."""
        with self._failing("remove delivered samples"), self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            before = self._conn.total_changes
            self._conn.executemany("DELETE FROM samples WHERE sample_id = ?", [(i,) for i in ids])
            return self._conn.total_changes - before

    def nack(self, ids: Sequence[str], now_ms: int) -> int:
        """Record a failed attempt for each id and schedule its retry with :class:`BackoffPolicy`.

        Returns how many were present.
        """
        with self._failing("record a failed upload"), self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            changed = 0
            for sample_id in ids:
                row = self._conn.execute(
                    "SELECT attempts FROM samples WHERE sample_id = ?", (sample_id,)
                ).fetchone()
                if row is None:
                    continue
                attempts = row[0] + 1
                due = int(now_ms) + self.backoff.delay_ms(attempts, self._rng.random())
                self._conn.execute(
                    "UPDATE samples SET attempts = ?, next_attempt_ms = ? WHERE sample_id = ?",
                    (attempts, due, sample_id),
                )
                changed += 1
            return changed

    def _scalar(self, sql: str) -> int:
        with self._failing("read its counts"), self._lock:
            return int(self._conn.execute(sql).fetchone()[0])

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """Raise a SQLite failure (a page damaged on disk, locked beyond the timeout, an I/O error) as an
        :class:`~device_agents.errors.OutboxError` naming the file and what could not be done."""
        try:
            yield
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path}: could not {what} ({exc}); move the file away if it is "
                              "damaged") from exc

    @property
    def pending_count(self) -> int:
        """Samples stored and not yet acknowledged."""
        return self._scalar("SELECT COUNT(*) FROM samples")

    @property
    def pending_bytes(self) -> int:
        """Array bytes of the pending samples (what ``max_bytes`` bounds)."""
        return self._scalar("SELECT COALESCE(SUM(nbytes), 0) FROM samples")

    def bytes_created_after(self, ms: int) -> int:
        """Stored bytes of the pending samples queued after ``ms`` (wall clock, ms since the epoch)."""
        with self._failing("read its counts"), self._lock:
            return int(self._conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM samples WHERE created_ms > ?",
                                          (int(ms),)).fetchone()[0])

    @property
    def dropped(self) -> int:
        """Samples dropped since the database was created (persisted): evicted by the byte bound, or found
        unreadable by :meth:`peek_batch`."""
        return self._scalar("SELECT value FROM meta WHERE key = 'dropped'")

    @property
    def dropped_bytes(self) -> int:
        """Array bytes of the samples evicted by the byte bound since the database was created (persisted)."""
        return self._scalar("SELECT value FROM meta WHERE key = 'dropped_bytes'")

    @property
    def stats(self) -> OutboxStats:
        """A consistent snapshot of the pending and dropped counts."""
        with self._failing("read its counts"), self._lock:
            count, nbytes = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM samples").fetchone()
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        return OutboxStats(int(count), int(nbytes), int(meta["dropped"]), int(meta["dropped_bytes"]),
                           self.max_bytes, self.eviction)
