"""SQLite tables for parameter updates (versioned per cohort) and rollback reports, mixed into
:class:`server.storage.Registry`, plus the migration of schema 1's globally numbered ``updates`` table."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from server.records import DEFAULT_COHORT, RollbackRecord, UpdateRecord

UPDATES_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
  cohort TEXT NOT NULL, version INTEGER NOT NULL, bundle_id TEXT NOT NULL REFERENCES bundles(bundle_id),
  kind TEXT NOT NULL, round_id INTEGER, blob TEXT NOT NULL, sha256 TEXT NOT NULL, created_ms INTEGER NOT NULL,
  held_blob TEXT NOT NULL, held_sha256 TEXT NOT NULL, encoding TEXT NOT NULL, base_version INTEGER NOT NULL,
  base_sha256 TEXT NOT NULL, payload_blob TEXT NOT NULL, PRIMARY KEY (cohort, version));
CREATE INDEX IF NOT EXISTS updates_by_cohort ON updates(cohort, bundle_id, version);
CREATE TABLE IF NOT EXISTS rollbacks (
  id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL REFERENCES devices(device_id),
  bundle_id TEXT NOT NULL, cohort TEXT NOT NULL, version INTEGER NOT NULL, restored_version INTEGER NOT NULL,
  reason TEXT NOT NULL, entropy_before REAL NOT NULL, entropy_after REAL NOT NULL, agreement_before REAL NOT NULL,
  agreement_after REAL NOT NULL, rolled_back_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rollbacks_by_device ON rollbacks(device_id);
CREATE TABLE IF NOT EXISTS sent_params (
  device_id TEXT NOT NULL, bundle_id TEXT NOT NULL, cohort TEXT NOT NULL, version INTEGER NOT NULL,
  sha256 TEXT NOT NULL, sent_ms INTEGER NOT NULL, PRIMARY KEY (device_id, bundle_id, cohort));
"""  # sent_params: added within schema 3 (a table older servers ignore)
_UPDATE_COLUMNS = ("cohort", "version", "bundle_id", "kind", "round_id", "blob", "sha256", "created_ms", "held_blob",
                   "held_sha256", "encoding", "base_version", "base_sha256", "payload_blob")


def set_aside_v1_updates(conn: sqlite3.Connection) -> None:
    """Rename a schema-1 ``updates`` table (no cohort column) out of the way before the schema is created."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(updates)").fetchall()}
    if cols and "cohort" not in cols:
        conn.execute("DROP INDEX IF EXISTS updates_by_bundle")
        conn.execute("ALTER TABLE updates RENAME TO updates_v1")


def migrate_v1_updates(c: sqlite3.Connection) -> None:
    """Copy schema-1 updates into the default cohort (sent in full, as before) and drop the old table."""
    if c.execute("SELECT name FROM sqlite_master WHERE name = 'updates_v1'").fetchone() is None:
        return
    c.execute(
        "INSERT INTO updates SELECT ?, version, bundle_id, kind, round_id, blob, sha256, created_ms, blob, sha256, "
        "'f32', 0, '', '' FROM updates_v1", (DEFAULT_COHORT,))
    c.execute("DROP TABLE updates_v1")


class UpdateTables:
    """The update and rollback half of :class:`~server.storage.Registry` (see :class:`server.records.Storage`)."""

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        raise NotImplementedError

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        raise NotImplementedError

    def insert_update(self, record: UpdateRecord) -> UpdateRecord:
        """See :meth:`Storage.insert_update`."""
        with self._tx() as c:
            version = int(c.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM updates WHERE cohort = ?",
                                    (record.cohort,)).fetchone()[0])
            stored = UpdateRecord(**{**record.__dict__, "version": version})
            c.execute(f"INSERT INTO updates ({', '.join(_UPDATE_COLUMNS)}) VALUES ({', '.join('?' * 14)})",
                      tuple(getattr(stored, k) for k in _UPDATE_COLUMNS))
        return stored

    def _updates(self, rows: Iterator[sqlite3.Row] | list[sqlite3.Row]) -> list[UpdateRecord]:
        return [UpdateRecord(**dict(r)) for r in rows]

    def updates_since(self, bundle_id: str, since_version: int, cohort: str = DEFAULT_COHORT) -> list[UpdateRecord]:
        """See :meth:`Storage.updates_since`."""
        return self._updates(self._all(
            "SELECT * FROM updates WHERE cohort = ? AND bundle_id = ? AND version > ? ORDER BY version",
            (cohort, bundle_id, since_version)))

    def latest_update(self, bundle_id: str, cohort: str = DEFAULT_COHORT) -> UpdateRecord | None:
        """See :meth:`Storage.latest_update`."""
        rows = self._all("SELECT * FROM updates WHERE cohort = ? AND bundle_id = ? ORDER BY version DESC LIMIT 1",
                         (cohort, bundle_id))
        return self._updates(rows)[0] if rows else None

    def latest_version(self, cohort: str | None = None) -> int:
        """See :meth:`Storage.latest_version`."""
        if cohort is None:
            row = self._one("SELECT COALESCE(MAX(version), 0) AS v FROM updates")
        else:
            row = self._one("SELECT COALESCE(MAX(version), 0) AS v FROM updates WHERE cohort = ?", (cohort,))
        return int(row["v"]) if row else 0

    def record_sent(self, device_id: str, bundle_id: str, cohort: str, version: int, sha256: str,
                    sent_ms: int) -> None:
        """See :meth:`Storage.record_sent`."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO sent_params (device_id, bundle_id, cohort, version, sha256, sent_ms) "
                      "VALUES (?, ?, ?, ?, ?, ?)", (device_id, bundle_id, cohort, version, sha256, sent_ms))

    def sent_digest(self, device_id: str, bundle_id: str, cohort: str) -> str | None:
        """See :meth:`Storage.sent_digest`."""
        row = self._one("SELECT sha256 FROM sent_params WHERE device_id = ? AND bundle_id = ? AND cohort = ?",
                        (device_id, bundle_id, cohort))
        return str(row["sha256"]) if row else None

    def insert_rollback(self, record: RollbackRecord) -> int:
        """See :meth:`Storage.insert_rollback`."""
        values = {k: v for k, v in record.__dict__.items() if k != "id"}
        with self._tx() as c:
            cur = c.execute(f"INSERT INTO rollbacks ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                            tuple(values.values()))
            return int(cur.lastrowid or 0)

    def list_rollbacks(self, device_id: str | None = None) -> list[RollbackRecord]:
        """See :meth:`Storage.list_rollbacks`."""
        if device_id is None:
            rows = self._all("SELECT * FROM rollbacks ORDER BY id")
        else:
            rows = self._all("SELECT * FROM rollbacks WHERE device_id = ? ORDER BY id", (device_id,))
        return [RollbackRecord(**dict(r)) for r in rows]
