"""Persistence: the content-addressed :class:`BlobStore` and the metadata :class:`Storage` interface,
implemented over SQLite by :class:`Registry`.

Handlers depend on the :class:`Storage` protocol only, so a PostgreSQL backend can implement it later.
The SQLite registry runs in WAL mode with ``synchronous=FULL``: a committed transaction survives a crash,
which is what lets the server acknowledge a sample only after its row is committed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.blobstore import BlobStore, sha256_hex
from server.errors import SampleIdConflictError, StorageError
from server.records import (
    DEFAULT_COHORT,
    AggregatorStateRecord,
    BundleRecord,
    DeviceRecord,
    DriftRecord,
    FileEntry,
    OutboxRecord,
    RoundRecord,
    SampleRecord,
    Storage,
    SubmissionRecord,
    UpdateRecord,
)
from server.storage_updates import UPDATES_SCHEMA, UpdateTables, migrate_v1_updates, set_aside_v1_updates

__all__ = ["SCHEMA_VERSION", "BlobStore", "Registry", "Storage", "sha256_hex"]

logger = logging.getLogger(__name__)
SCHEMA_VERSION = 3  # 2: updates keyed by (cohort, version), encodings; rollbacks. 3: submissions carry their
# cohort; strategies' persisted state (aggregator_state); which submissions each round took (round_inputs)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY, labels TEXT NOT NULL, backend TEXT NOT NULL,
  registered_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
  acked_update_version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bundles (
  bundle_id TEXT PRIMARY KEY, manifest TEXT NOT NULL, files TEXT NOT NULL,
  created_ms INTEGER NOT NULL, is_current INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS samples (
  sample_id TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(device_id),
  bundle_id TEXT NOT NULL REFERENCES bundles(bundle_id), input_blob TEXT, features_blob TEXT,
  entropy REAL NOT NULL, prediction INTEGER NOT NULL, stream_position INTEGER NOT NULL,
  captured_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, used_in_round INTEGER);
CREATE INDEX IF NOT EXISTS samples_by_bundle ON samples(bundle_id, used_in_round);
CREATE INDEX IF NOT EXISTS samples_by_device ON samples(device_id);
CREATE TABLE IF NOT EXISTS sample_tensors (digest TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS drift_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL REFERENCES devices(device_id),
  detector TEXT NOT NULL, signal TEXT NOT NULL, statistic REAL NOT NULL, threshold REAL NOT NULL,
  stream_position INTEGER NOT NULL, detected_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS drift_by_device ON drift_events(device_id);
CREATE TABLE IF NOT EXISTS outbox_reports (
  device_id TEXT PRIMARY KEY REFERENCES devices(device_id), dropped_samples INTEGER NOT NULL,
  dropped_bytes INTEGER NOT NULL, pending_samples INTEGER NOT NULL, pending_bytes INTEGER NOT NULL,
  max_bytes INTEGER NOT NULL, eviction_policy TEXT NOT NULL, reported_ms INTEGER NOT NULL,
  received_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
  id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL REFERENCES devices(device_id),
  bundle_id TEXT NOT NULL REFERENCES bundles(bundle_id), base_version INTEGER NOT NULL,
  num_samples INTEGER NOT NULL, blob TEXT NOT NULL, received_ms INTEGER NOT NULL, used_in_round INTEGER,
  cohort TEXT NOT NULL DEFAULT 'default');
CREATE INDEX IF NOT EXISTS submissions_by_bundle ON submissions(bundle_id, used_in_round);
CREATE TABLE IF NOT EXISTS aggregator_state (
  strategy TEXT PRIMARY KEY, version INTEGER NOT NULL, state TEXT NOT NULL, updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS round_inputs (
  round_id INTEGER NOT NULL REFERENCES rounds(round_id), submission_id INTEGER NOT NULL REFERENCES submissions(id),
  PRIMARY KEY (round_id, submission_id));
CREATE TABLE IF NOT EXISTS rounds (
  round_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, state TEXT NOT NULL,
  update_version INTEGER, samples_used INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
  seconds REAL NOT NULL DEFAULT 0, metrics TEXT NOT NULL DEFAULT '{}', created_ms INTEGER NOT NULL);
""" + UPDATES_SCHEMA


def unusable_database(db_path: Path, what: str, exc: sqlite3.Error) -> StorageError:
    """The :class:`StorageError` for a SQLite file that cannot be opened or read (corrupt, truncated, not a
    database, a directory …), naming the file and SQLite's reason."""
    return StorageError(f"{db_path}: the {what} is not a usable SQLite database ({exc}); the server does not "
                        "start on it: restore it from a backup, or move it aside to start with an empty one")


def open_sqlite(db_path: Path, what: str) -> sqlite3.Connection:
    """A connection to ``db_path`` in WAL mode with ``synchronous=FULL``; :class:`StorageError` naming the file
    when it is not a usable SQLite database."""
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=30)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"{db_path}: could not enable WAL journal mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
    except (sqlite3.Error, StorageError) as exc:
        if conn is not None:
            conn.close()
        if isinstance(exc, StorageError):
            raise
        raise unusable_database(db_path, what, exc) from exc
    return conn


class Registry(UpdateTables):
    """:class:`Storage` over one SQLite file (WAL, ``synchronous=FULL``), one connection behind a lock."""

    def __init__(self, db_path: Path) -> None:
        """Open or create the database at ``db_path`` and its schema."""
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._known_devices: set[str] = set()  # device_exists cache (devices are never deleted)
        self._submission_listeners: list[Callable[[SubmissionRecord], None]] = []
        self._conn = open_sqlite(self.db_path, "registry")
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise unusable_database(self.db_path, "registry", exc) from exc

    def _init_schema(self) -> None:
        with self._lock:
            set_aside_v1_updates(self._conn)
            self._conn.executescript(_SCHEMA)  # idempotent: every statement is IF NOT EXISTS
        with self._tx() as c:
            row = c.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if row[0] is None:
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif int(row[0]) < SCHEMA_VERSION:
                if int(row[0]) == 1:
                    migrate_v1_updates(c)
                c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.db_path}: schema version {row[0]} is newer than this server's {SCHEMA_VERSION}"
                )
            _add_submission_cohorts(c)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        row = self._one("SELECT MAX(version) AS v FROM schema_version")
        return int(row["v"]) if row else 0

    # -- devices ---------------------------------------------------------------------------------------
    _DEVICE_SQL = (
        "SELECT d.*, (SELECT COUNT(*) FROM samples s WHERE s.device_id = d.device_id) AS n_samples, "
        "(SELECT COUNT(*) FROM drift_events e WHERE e.device_id = d.device_id) AS n_drift, "
        "(SELECT COUNT(*) FROM rollbacks r WHERE r.device_id = d.device_id) AS n_rollbacks, "
        "o.dropped_samples AS outbox_dropped, o.pending_samples AS outbox_pending "
        "FROM devices d LEFT JOIN outbox_reports o ON o.device_id = d.device_id"
    )

    @staticmethod
    def _device(row: sqlite3.Row) -> DeviceRecord:
        return DeviceRecord(
            device_id=row["device_id"], labels=json.loads(row["labels"]), backend=row["backend"],
            registered_ms=row["registered_ms"], last_seen_ms=row["last_seen_ms"],
            acked_update_version=row["acked_update_version"], samples_stored=row["n_samples"],
            drift_events=row["n_drift"], outbox_dropped=row["outbox_dropped"] or 0,
            outbox_pending=row["outbox_pending"] or 0, rollbacks=row["n_rollbacks"],
        )

    def upsert_device(self, device_id: str, labels: dict[str, str], backend: str, now_ms: int) -> DeviceRecord:
        """See :meth:`Storage.upsert_device`."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO devices (device_id, labels, backend, registered_ms, last_seen_ms) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET labels = excluded.labels, "
                "backend = excluded.backend, last_seen_ms = excluded.last_seen_ms",
                (device_id, json.dumps(labels, sort_keys=True), backend, now_ms, now_ms),
            )
        record = self.get_device(device_id)
        if record is None:
            raise StorageError(f"device {device_id!r} vanished right after upsert")
        return record

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """See :meth:`Storage.get_device`."""
        row = self._one(self._DEVICE_SQL + " WHERE d.device_id = ?", (device_id,))
        return self._device(row) if row else None

    def touch_device(self, device_id: str, now_ms: int) -> None:
        """See :meth:`Storage.touch_device`."""
        with self._tx() as c:
            c.execute("UPDATE devices SET last_seen_ms = MAX(last_seen_ms, ?) WHERE device_id = ?",
                      (now_ms, device_id))

    def set_acked_version(self, device_id: str, version: int) -> None:
        """See :meth:`Storage.set_acked_version`."""
        with self._tx() as c:
            c.execute(
                "UPDATE devices SET acked_update_version = MAX(acked_update_version, ?) WHERE device_id = ?",
                (version, device_id),
            )

    def list_devices(self) -> list[DeviceRecord]:
        """See :meth:`Storage.list_devices`."""
        return [self._device(r) for r in self._all(self._DEVICE_SQL + " ORDER BY d.device_id")]

    # -- bundles ---------------------------------------------------------------------------------------
    @staticmethod
    def _bundle(row: sqlite3.Row) -> BundleRecord:
        files = {p: FileEntry(e["sha256"], e["size"]) for p, e in json.loads(row["files"]).items()}
        return BundleRecord(row["bundle_id"], json.loads(row["manifest"]), files, row["created_ms"],
                            bool(row["is_current"]))

    def put_bundle(self, bundle: BundleRecord, make_current: bool) -> BundleRecord:
        """See :meth:`Storage.put_bundle`."""
        files = {p: {"sha256": e.sha256, "size": e.size} for p, e in sorted(bundle.files.items())}
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO bundles (bundle_id, manifest, files, created_ms) VALUES (?, ?, ?, ?)",
                (bundle.bundle_id, json.dumps(bundle.manifest, sort_keys=True), json.dumps(files),
                 bundle.created_ms),
            )
            if make_current:
                c.execute("UPDATE bundles SET is_current = (bundle_id = ?)", (bundle.bundle_id,))
        stored = self.get_bundle(bundle.bundle_id)
        if stored is None:
            raise StorageError(f"bundle {bundle.bundle_id} vanished right after insert")
        return stored

    def get_bundle(self, bundle_id: str) -> BundleRecord | None:
        """See :meth:`Storage.get_bundle`."""
        row = self._one("SELECT * FROM bundles WHERE bundle_id = ?", (bundle_id,))
        return self._bundle(row) if row else None

    def current_bundle(self) -> BundleRecord | None:
        """See :meth:`Storage.current_bundle`."""
        row = self._one("SELECT * FROM bundles WHERE is_current = 1")
        return self._bundle(row) if row else None

    # -- samples ---------------------------------------------------------------------------------------
    _SAMPLE_COLS = ("sample_id", "device_id", "bundle_id", "input_blob", "features_blob", "entropy",
                    "prediction", "stream_position", "captured_ms", "received_ms", "used_in_round")

    def _sample(self, row: sqlite3.Row) -> SampleRecord:
        return SampleRecord(**{k: row[k] for k in self._SAMPLE_COLS})

    def insert_samples(
        self, samples: Sequence[SampleRecord], seen_ms: int | None = None, tensors: Mapping[str, bytes] | None = None
    ) -> list[bool]:
        """See :meth:`Storage.insert_samples`."""
        sql = (f"INSERT OR IGNORE INTO samples ({', '.join(self._SAMPLE_COLS)}) "
               f"VALUES ({', '.join('?' * len(self._SAMPLE_COLS))})")
        out: list[bool] = []
        with self._tx() as c:
            for s in samples:
                cur = c.execute(sql, tuple(getattr(s, k) for k in self._SAMPLE_COLS))
                out.append(cur.rowcount == 1)
                if not out[-1]:
                    _check_sample_owner(c, s)
            if seen_ms is not None:
                c.executemany("UPDATE devices SET last_seen_ms = MAX(last_seen_ms, ?) WHERE device_id = ?",
                              [(seen_ms, d) for d in sorted({s.device_id for s in samples})])
            if tensors:  # REPLACE: re-uploading a tensor also repairs a damaged row
                c.executemany("INSERT OR REPLACE INTO sample_tensors (digest, data) VALUES (?, ?)",
                              sorted(tensors.items()))
        return out

    def get_tensor(self, digest: str) -> bytes | None:
        """See :meth:`Storage.get_tensor`."""
        row = self._one("SELECT data FROM sample_tensors WHERE digest = ?", (digest,))
        return None if row is None else bytes(row["data"])

    def device_exists(self, device_id: str) -> bool:
        """See :meth:`Storage.device_exists` (registered devices are never removed: known ones are cached)."""
        if device_id in self._known_devices:
            return True
        found = self._one("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)) is not None
        if found:
            self._known_devices.add(device_id)
        return found

    def get_sample(self, sample_id: str) -> SampleRecord | None:
        """See :meth:`Storage.get_sample`."""
        row = self._one("SELECT * FROM samples WHERE sample_id = ?", (sample_id,))
        return self._sample(row) if row else None

    def unused_samples(self, bundle_id: str, limit: int | None, with_input: bool) -> list[SampleRecord]:
        """See :meth:`Storage.unused_samples`."""
        sql = "SELECT * FROM samples WHERE bundle_id = ? AND used_in_round IS NULL"
        if with_input:
            sql += " AND input_blob IS NOT NULL"
        sql += " ORDER BY rowid"
        args: list[Any] = [bundle_id]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [self._sample(r) for r in self._all(sql, args)]

    def mark_samples_used(self, sample_ids: Sequence[str], round_id: int) -> None:
        """See :meth:`Storage.mark_samples_used`."""
        with self._tx() as c:
            c.executemany("UPDATE samples SET used_in_round = ? WHERE sample_id = ?",
                          [(round_id, s) for s in sample_ids])

    def release_samples(self, round_id: int, sample_ids: Sequence[str] | None = None) -> int:
        """See :meth:`Storage.release_samples`."""
        with self._tx() as c:
            before = c.total_changes
            if sample_ids is None:
                c.execute("UPDATE samples SET used_in_round = NULL WHERE used_in_round = ?", (round_id,))
            else:
                c.executemany("UPDATE samples SET used_in_round = NULL WHERE used_in_round = ? AND sample_id = ?",
                              [(round_id, s) for s in sample_ids])
            return c.total_changes - before

    # -- drift -----------------------------------------------------------------------------------------
    def insert_drift(self, event: DriftRecord) -> int:
        """See :meth:`Storage.insert_drift`."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO drift_events (device_id, detector, signal, statistic, threshold, "
                "stream_position, detected_ms, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (event.device_id, event.detector, event.signal, event.statistic, event.threshold,
                 event.stream_position, event.detected_ms, event.received_ms),
            )
            return int(cur.lastrowid or 0)

    def list_drift(self, device_id: str | None) -> list[DriftRecord]:
        """See :meth:`Storage.list_drift`."""
        sql, args = "SELECT * FROM drift_events", ()
        if device_id is not None:
            sql, args = sql + " WHERE device_id = ?", (device_id,)
        return [DriftRecord(**dict(r)) for r in self._all(sql + " ORDER BY id", args)]

    # -- outbox reports --------------------------------------------------------------------------------
    def record_outbox(self, report: OutboxRecord) -> OutboxRecord:
        """See :meth:`Storage.record_outbox`."""
        r = report
        newer = "excluded.reported_ms >= outbox_reports.reported_ms"
        with self._tx() as c:
            c.execute(
                "INSERT INTO outbox_reports (device_id, dropped_samples, dropped_bytes, pending_samples, "
                "pending_bytes, max_bytes, eviction_policy, reported_ms, received_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                "dropped_samples = MAX(dropped_samples, excluded.dropped_samples), "
                "dropped_bytes = MAX(dropped_bytes, excluded.dropped_bytes), "
                + ", ".join(f"{k} = CASE WHEN {newer} THEN excluded.{k} ELSE outbox_reports.{k} END"
                            for k in ("pending_samples", "pending_bytes", "max_bytes", "eviction_policy",
                                      "received_ms"))
                + ", reported_ms = MAX(reported_ms, excluded.reported_ms)",
                (r.device_id, r.dropped_samples, r.dropped_bytes, r.pending_samples, r.pending_bytes, r.max_bytes,
                 r.eviction_policy, r.reported_ms, r.received_ms),
            )
        merged = self.get_outbox(r.device_id)
        if merged is None:
            raise StorageError(f"outbox report of {r.device_id!r} vanished right after upsert")
        return merged

    def get_outbox(self, device_id: str) -> OutboxRecord | None:
        """See :meth:`Storage.get_outbox`."""
        row = self._one("SELECT * FROM outbox_reports WHERE device_id = ?", (device_id,))
        return OutboxRecord(**dict(row)) if row else None

    # -- submissions -----------------------------------------------------------------------------------
    _COHORT_SQL = ("COALESCE(?, (SELECT NULLIF(json_extract(labels, '$.cohort'), '') FROM devices "
                   "WHERE device_id = ?), 'default')")

    def insert_submission(self, submission: SubmissionRecord) -> int:
        """See :meth:`Storage.insert_submission`."""
        s = submission
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO submissions (device_id, bundle_id, base_version, num_samples, blob, received_ms, cohort) "
                f"VALUES (?, ?, ?, ?, ?, ?, {self._COHORT_SQL})",
                (s.device_id, s.bundle_id, s.base_version, s.num_samples, s.blob, s.received_ms, s.cohort,
                 s.device_id),
            )
            submission_id = int(cur.lastrowid or 0)
        if self._submission_listeners:
            stored = self.get_submission(submission_id)
            for listener in list(self._submission_listeners):
                try:
                    listener(stored)  # type: ignore[arg-type]
                except Exception:  # the submission is stored; a listener's failure must not fail the upload
                    logger.exception("submission listener %r failed on submission %d", listener, submission_id)
        return submission_id

    def add_submission_listener(self, listener: Callable[[SubmissionRecord], None]) -> None:
        """See :meth:`Storage.add_submission_listener`."""
        self._submission_listeners.append(listener)

    def get_submission(self, submission_id: int) -> SubmissionRecord | None:
        """See :meth:`Storage.get_submission`."""
        row = self._one("SELECT * FROM submissions WHERE id = ?", (submission_id,))
        return SubmissionRecord(**dict(row)) if row else None

    def unused_submissions(self, bundle_id: str, cohort: str | None = None,
                           limit: int | None = None) -> list[SubmissionRecord]:
        """See :meth:`Storage.unused_submissions`."""
        sql, args = "SELECT * FROM submissions WHERE bundle_id = ? AND used_in_round IS NULL", [bundle_id]
        if cohort is not None:
            sql, args = sql + " AND cohort = ?", [*args, cohort]
        sql += " ORDER BY id"
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        return [SubmissionRecord(**dict(r)) for r in self._all(sql, args)]

    def unused_submission_groups(self) -> list[tuple[str, str, int]]:
        """See :meth:`Storage.unused_submission_groups`."""
        rows = self._all("SELECT bundle_id, cohort, COUNT(*) AS n FROM submissions WHERE used_in_round IS NULL "
                         "GROUP BY bundle_id, cohort ORDER BY bundle_id, cohort")
        return [(r["bundle_id"], r["cohort"], int(r["n"])) for r in rows]

    def mark_submissions_used(self, ids: Sequence[int], round_id: int,
                              aggregator_state: AggregatorStateRecord | None = None) -> None:
        """See :meth:`Storage.mark_submissions_used`."""
        with self._tx() as c:
            c.executemany("UPDATE submissions SET used_in_round = ? WHERE id = ?", [(round_id, i) for i in ids])
            if aggregator_state is not None:
                _save_aggregator_state(c, aggregator_state)

    def load_aggregator_state(self, strategy: str) -> AggregatorStateRecord | None:
        """See :meth:`Storage.load_aggregator_state`."""
        row = self._one("SELECT * FROM aggregator_state WHERE strategy = ?", (strategy,))
        return AggregatorStateRecord(**dict(row)) if row else None

    def claim_submissions(self, round_id: int, ids: Sequence[int],
                          aggregator_state: AggregatorStateRecord | None = None) -> None:
        """See :meth:`Storage.claim_submissions`."""
        with self._tx() as c:
            c.executemany("INSERT OR IGNORE INTO round_inputs (round_id, submission_id) VALUES (?, ?)",
                          [(round_id, i) for i in ids])
            if aggregator_state is not None:
                _save_aggregator_state(c, aggregator_state)

    def start_round(self, kind: str, created_ms: int, submission_ids: Sequence[int],
                    aggregator_state: AggregatorStateRecord | None = None) -> RoundRecord:
        """See :meth:`Storage.start_round`."""
        with self._tx() as c:
            cur = c.execute("INSERT INTO rounds (kind, state, created_ms) VALUES (?, 'running', ?)", (kind, created_ms))
            round_id = int(cur.lastrowid or 0)
            c.executemany("INSERT INTO round_inputs (round_id, submission_id) VALUES (?, ?)",
                          [(round_id, i) for i in submission_ids])
            if aggregator_state is not None:
                _save_aggregator_state(c, aggregator_state)
        return RoundRecord(round_id=round_id, kind=kind, state="running", created_ms=created_ms)

    def finish_round(self, record: RoundRecord, used_ids: Sequence[int]) -> None:
        """See :meth:`Storage.finish_round`."""
        with self._tx() as c:
            c.executemany("UPDATE submissions SET used_in_round = ? WHERE id = ?",
                          [(record.round_id, i) for i in used_ids])
            self._save_round(c, record)

    def round_inputs(self, round_id: int) -> list[int]:
        """See :meth:`Storage.round_inputs`."""
        rows = self._all("SELECT submission_id FROM round_inputs WHERE round_id = ? ORDER BY submission_id",
                         (round_id,))
        return [int(r["submission_id"]) for r in rows]

    def unfinished_rounds(self) -> list[RoundRecord]:
        """See :meth:`Storage.unfinished_rounds`."""
        return [self._round(r) for r in self._all(
            "SELECT * FROM rounds WHERE state IN ('queued', 'running') ORDER BY round_id")]

    def update_of_round(self, round_id: int) -> UpdateRecord | None:
        """See :meth:`Storage.update_of_round`."""
        rows = self._all("SELECT * FROM updates WHERE round_id = ? ORDER BY version DESC LIMIT 1", (round_id,))
        return UpdateRecord(**dict(rows[0])) if rows else None

    # -- rounds ----------------------------------------------------------------------------------------
    @staticmethod
    def _round(row: sqlite3.Row) -> RoundRecord:
        d = dict(row)
        d["metrics"] = json.loads(d["metrics"])
        return RoundRecord(**d)

    def create_round(self, kind: str, created_ms: int) -> RoundRecord:
        """See :meth:`Storage.create_round`."""
        with self._tx() as c:
            cur = c.execute("INSERT INTO rounds (kind, state, created_ms) VALUES (?, 'queued', ?)",
                            (kind, created_ms))
            round_id = int(cur.lastrowid or 0)
        return RoundRecord(round_id=round_id, kind=kind, state="queued", created_ms=created_ms)

    def save_round(self, record: RoundRecord) -> None:
        """See :meth:`Storage.save_round`."""
        with self._tx() as c:
            self._save_round(c, record)

    @staticmethod
    def _save_round(c: sqlite3.Connection, r: RoundRecord) -> None:
        c.execute(
            "UPDATE rounds SET state = ?, update_version = ?, samples_used = ?, error = ?, seconds = ?, "
            "metrics = ? WHERE round_id = ?",
            (r.state, r.update_version, r.samples_used, r.error, r.seconds, json.dumps(r.metrics, sort_keys=True),
             r.round_id),
        )

    def get_round(self, round_id: int) -> RoundRecord | None:
        """See :meth:`Storage.get_round`."""
        row = self._one("SELECT * FROM rounds WHERE round_id = ?", (round_id,))
        return self._round(row) if row else None

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._conn.close()


def _check_sample_owner(c: sqlite3.Connection, sample: SampleRecord) -> None:
    """A sample id already stored is a retry only from the device that stored it; from another device it is
    refused (:class:`SampleIdConflictError`, rolling the upload back) instead of acknowledged as a duplicate."""
    row = c.execute("SELECT device_id FROM samples WHERE sample_id = ?", (sample.sample_id,)).fetchone()
    if row is not None and row["device_id"] != sample.device_id:
        raise SampleIdConflictError(f"sample id {sample.sample_id!r} is already stored for another device; device "
                                    f"{sample.device_id!r} must use its own ids (<device>:<session>:<position>)")


def _save_aggregator_state(c: sqlite3.Connection, a: AggregatorStateRecord) -> None:
    c.execute("INSERT OR REPLACE INTO aggregator_state (strategy, version, state, updated_ms) VALUES (?, ?, ?, ?)",
              (a.strategy, a.version, a.state, a.updated_ms))


def _add_submission_cohorts(c: sqlite3.Connection) -> None:
    """Schema 3: give submissions stored before it their device's cohort (idempotent), and index by cohort."""
    cols = {r[1] for r in c.execute("PRAGMA table_info(submissions)").fetchall()}
    if "cohort" not in cols:
        c.execute(f"ALTER TABLE submissions ADD COLUMN cohort TEXT NOT NULL DEFAULT '{DEFAULT_COHORT}'")
        c.execute("UPDATE submissions SET cohort = COALESCE((SELECT NULLIF(json_extract(d.labels, '$.cohort'), '') "
                  "FROM devices d WHERE d.device_id = submissions.device_id), ?)", (DEFAULT_COHORT,))
    c.execute("CREATE INDEX IF NOT EXISTS submissions_by_cohort ON submissions(bundle_id, cohort, used_in_round)")
