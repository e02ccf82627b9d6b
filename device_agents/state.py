"""The device agent's durable state, in one SQLite file: what a restart must not lose.

* **Parameters**: those the model runs and the version they are (``active_version``), the newest version the
  device accepted (``version``: a rolled-back or refused update stays accepted, so it is not fetched and applied
  again after a restart), the parameters held before the last update with their version (what a rollback
  restores) and the update whose entropy check still waits for a batch (its probation). A restarted device
  runs what it ran before — offline too — and watches for updates after the version it had.
* **Reports not yet delivered**: drift reports and rollback reports the server could not be reached for, sent
  at the next sync after a restart.
* **What the agent's components learnt from the stream**, saved at each sync and when the agent closes
  (:class:`SavedComponent`): the TTA method's state (its :meth:`~device_agents.tta.TTAMethod.snapshot`:
  α-BN's running statistics, FOA's search, T3A's supports), so that a restarted device keeps what it adapted
  to instead of starting again from the source statistics; the drift detector's state, so that it does not
  take the stream after a restart as its new reference (a drift under way would never be detected); the
  upload selector's byte budget, so that a restart does not refill it.

Arrays are stored as ``.npy`` bytes. The database runs in WAL mode with ``synchronous=FULL``; each save is one
transaction, so a crash leaves the previous state or the new one, whole. A file that is not a usable state
database raises :class:`StateError` naming it; so does a failed write (the caller's state stays in memory).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from device_agents.errors import AgentError
from device_agents.messages import RollbackInfo
from device_agents.sqlite_store import SqliteStore, from_npy, to_npy

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS params (slot TEXT NOT NULL, name TEXT NOT NULL, npy BLOB NOT NULL,
                                   PRIMARY KEY (slot, name));
CREATE TABLE IF NOT EXISTS reports (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS components (kind TEXT NOT NULL, name TEXT NOT NULL, npy BLOB NOT NULL,
                                       PRIMARY KEY (kind, name));
"""
_SLOTS = ("model", "extra", "previous_model", "previous_extra")
_META_KEY = "parameters"
_COMPONENT_KEY = "component."  # + kind: the meta row holding a component's identity (JSON)


class StateError(AgentError):
    """The agent state file cannot be opened, read or written; names the file."""


class UpdateRef(NamedTuple):
    """What identifies an update after it was applied: enough for a rollback report."""

    bundle_id: str
    cohort: str
    version: int


@dataclass(frozen=True)
class SavedParameters:
    """The parameter state of an agent (see the module docstring).

    ``model``: the parameters the model runs; ``extra``: the bundle's trainable weights the device holds for
    delta updates but does not run; ``previous``: (model, version, extra) before the last update, or None;
    ``probation``: the update whose entropy check waits for the next batch, or None.
    """

    bundle_id: str
    cohort: str | None
    version: int
    active_version: int
    model: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    previous: tuple[dict[str, np.ndarray], int, dict[str, np.ndarray]] | None = None
    probation: UpdateRef | None = None


@dataclass(frozen=True)
class SavedComponent:
    """The saved state of one component of the agent (``kind``: ``tta``, ``detector`` or ``selector``):
    ``identity`` says what the state belongs to (JSON: for the TTA method its name, the bundle and the parameter
    version it adapted, since an update resets it; for the detector its configuration and the bundle), and the
    agent restores ``state`` only into a component of the same identity."""

    kind: str
    identity: dict[str, Any]
    state: dict[str, np.ndarray]


@dataclass(frozen=True)
class SavedState:
    """What :meth:`AgentStateStore.load` found: the parameter state (None: none saved, or unreadable), the
    undelivered reports, oldest first (drift reports as ``(position, statistic, detected_ms)``), and the
    components' saved states by kind (a kind none was saved for, or whose state no longer decodes, is absent)."""

    parameters: SavedParameters | None
    drift_reports: list[tuple[int, float, int]]
    rollback_reports: list[RollbackInfo]
    components: dict[str, SavedComponent] = field(default_factory=dict)


@dataclass(frozen=True)
class Restored:
    """What an agent took over from its state store at construction (:attr:`Agent.restored`).

    ``version``/``active_version``: the restored parameter state's versions (None: it started from the bundle's
    parameters); ``tta``/``detector``/``selector``: whether that component's state was restored;
    ``drift_reports``/``rollback_reports``: undelivered reports taken over."""

    version: int | None = None
    active_version: int | None = None
    tta: bool = False
    drift_reports: int = 0
    rollback_reports: int = 0
    detector: bool = False
    selector: bool = False


class AgentStateStore(SqliteStore):
    """An agent's durable state in the SQLite file ``path`` (created when missing). Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, _SCHEMA, [f"SELECT {columns} FROM {table} LIMIT 0" for table, columns in (
            ("meta", "key, value"), ("params", "slot, name, npy"), ("reports", "seq, kind, body"),
            ("components", "kind, name, npy"))],
            StateError, "agent state", "; move it away to start from the bundle's parameters")

    # -- reading --------------------------------------------------------------------------------------------
    def load(self) -> SavedState:
        """The saved state. A parameter state that no longer decodes is logged and left out (the agent starts
        from the bundle's parameters); so is each report, and each component's state, that no longer decodes."""
        try:
            with self._lock:
                meta = self._conn.execute("SELECT value FROM meta WHERE key = ?", (_META_KEY,)).fetchone()
                rows = self._conn.execute("SELECT slot, name, npy FROM params").fetchall()
                reports = self._conn.execute("SELECT seq, kind, body FROM reports ORDER BY seq").fetchall()
                component_meta = self._conn.execute("SELECT key, value FROM meta WHERE key LIKE ?",
                                                    (_COMPONENT_KEY + "%",)).fetchall()
                component_rows = self._conn.execute("SELECT kind, name, npy FROM components").fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"agent state {self.path} cannot be read: {exc}") from exc
        parameters = None
        if meta is not None:
            try:
                parameters = _decode_parameters(json.loads(meta[0]), rows)
            except (ValueError, TypeError, KeyError, OSError) as exc:  # np.load raises ValueError/OSError
                logger.warning("agent state %s: the saved parameters do not decode (%s); starting from the "
                               "bundle's parameters", self.path, exc)
        drift: list[tuple[int, float, int]] = []
        rollbacks: list[RollbackInfo] = []
        for seq, kind, body in reports:
            try:
                fields = json.loads(body)
                if kind == "drift":
                    drift.append((int(fields["position"]), float(fields["statistic"]), int(fields["detected_ms"])))
                elif kind == "rollback":
                    rollbacks.append(RollbackInfo(**fields))
                else:
                    raise ValueError(f"unknown report kind {kind!r}")
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning("agent state %s: dropping undelivered report %d that does not decode: %s", self.path,
                               seq, exc)
        components: dict[str, SavedComponent] = {}
        for key, value in component_meta:
            kind = key[len(_COMPONENT_KEY):]
            try:
                identity = json.loads(value)
                if not isinstance(identity, dict):
                    raise TypeError(f"its identity is a JSON {type(identity).__name__}, not an object")
                state = {str(name): from_npy(blob) for k, name, blob in component_rows if k == kind}
                components[kind] = SavedComponent(kind, identity, state)
            except (ValueError, TypeError, KeyError, OSError) as exc:
                logger.warning("agent state %s: the saved %s state does not decode (%s); it starts afresh", self.path,
                               kind, exc)
        return SavedState(parameters, drift, rollbacks, components)

    # -- writing --------------------------------------------------------------------------------------------
    def save_parameters(self, saved: SavedParameters) -> None:
        """Replace the saved parameter state with ``saved``, in one transaction."""
        meta = {"bundle_id": saved.bundle_id, "cohort": saved.cohort, "version": int(saved.version),
                "active_version": int(saved.active_version),
                "previous_version": None if saved.previous is None else int(saved.previous[1]),
                "probation": None if saved.probation is None else list(saved.probation)}
        slots: list[tuple[str, Mapping[str, np.ndarray]]] = [("model", saved.model), ("extra", saved.extra)]
        if saved.previous is not None:
            slots += [("previous_model", saved.previous[0]), ("previous_extra", saved.previous[2])]
        rows = [(slot, name, to_npy(np.asarray(value))) for slot, params in slots for name, value in params.items()]
        self._write("save the parameters", [
            ("DELETE FROM params", ()), *(("INSERT INTO params (slot, name, npy) VALUES (?, ?, ?)", r) for r in rows),
            ("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_META_KEY, json.dumps(meta))),
        ])

    def clear_parameters(self) -> None:
        """Forget the saved parameter state (the reports stay)."""
        self._write("clear the parameters", [("DELETE FROM params", ()),
                                             ("DELETE FROM meta WHERE key = ?", (_META_KEY,))])

    def save_components(self, saved: Sequence[SavedComponent]) -> None:
        """Replace the saved state of each component in ``saved`` (the others stay), in one transaction."""
        statements: list[tuple[str, Sequence[Any]]] = []
        for component in saved:
            statements += [
                ("DELETE FROM components WHERE kind = ?", (component.kind,)),
                *(("INSERT INTO components (kind, name, npy) VALUES (?, ?, ?)",
                   (component.kind, str(name), to_npy(np.asarray(value)))) for name, value in component.state.items()),
                ("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                 (_COMPONENT_KEY + component.kind, json.dumps(component.identity, sort_keys=True))),
            ]
        self._write(f"save the {', '.join(c.kind for c in saved)} state", statements)

    def save_reports(self, drift: Sequence[tuple[int, float, int]], rollbacks: Sequence[RollbackInfo]) -> None:
        """Replace the undelivered reports with ``drift`` and ``rollbacks`` (oldest first), in one transaction."""
        bodies = [("drift", json.dumps({"position": int(p), "statistic": float(s), "detected_ms": int(t)}))
                  for p, s, t in drift]
        bodies += [("rollback", json.dumps(asdict(info))) for info in rollbacks]
        self._write("save the undelivered reports", [
            ("DELETE FROM reports", ()), *(("INSERT INTO reports (kind, body) VALUES (?, ?)", b) for b in bodies),
        ])

    def _write(self, what: str, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        try:
            with self._lock, self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    self._conn.execute(sql, tuple(args))
        except sqlite3.Error as exc:  # disk full, locked beyond the timeout, I/O error, closed: nothing written
            raise StateError(f"agent state {self.path}: could not {what} ({exc}); the previous state is kept") from exc


def _decode_parameters(meta: Mapping[str, Any], rows: Sequence[tuple[str, str, bytes]]) -> SavedParameters:
    slots: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in _SLOTS}
    for slot, name, blob in rows:
        if slot not in slots:
            raise ValueError(f"unknown parameter slot {slot!r}")
        slots[slot][name] = from_npy(blob)
    previous_version = meta["previous_version"]
    probation = meta["probation"]
    cohort = meta["cohort"]
    return SavedParameters(
        bundle_id=str(meta["bundle_id"]), cohort=None if cohort is None else str(cohort),
        version=int(meta["version"]), active_version=int(meta["active_version"]),
        model=slots["model"], extra=slots["extra"],
        previous=(None if previous_version is None
                  else (slots["previous_model"], int(previous_version), slots["previous_extra"])),
        probation=None if probation is None else UpdateRef(str(probation[0]), str(probation[1]), int(probation[2])),
    )
