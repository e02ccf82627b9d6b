"""The durable SQLite file under each of the device's stores (the outbox, the agent state)."""

from __future__ import annotations

import io
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Self, overload

import numpy as np

from device_agents.errors import AgentError


@overload
def to_npy(array: np.ndarray) -> bytes: ...
@overload
def to_npy(array: None) -> None: ...
def to_npy(array: np.ndarray | None) -> bytes | None:
    """An array as ``.npy`` bytes, the form the stores keep arrays in (None stays None)."""
    if array is None:
        return None
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)  # (ascontiguousarray would make a 0-d array 1-d)
    return buf.getvalue()


@overload
def from_npy(blob: bytes) -> np.ndarray: ...
@overload
def from_npy(blob: None) -> None: ...
def from_npy(blob: bytes | None) -> np.ndarray | None:
    """The array of ``.npy`` bytes (None stays None); a damaged blob raises ``ValueError`` or ``OSError``."""
    return None if blob is None else np.load(io.BytesIO(blob), allow_pickle=False)


class SqliteStore:
    """One SQLite file opened for a durable store: an autocommit connection usable from any thread (writes take
    :attr:`_lock` and open their own transaction), WAL journal and ``synchronous=FULL``, so a committed write
    survives a crash; ``schema`` applied, then each ``probes`` statement run to check that the tables have the
    columns the store reads.

    A file that cannot be opened, or is not such a database (corrupt, locked, another schema), raises ``error``
    naming ``what`` and the file (``hint``: what the user can do about it).
    """

    def __init__(self, path: str | Path, schema: str, probes: Sequence[str], error: type[AgentError], what: str,
                 hint: str = "") -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise error(f"{what} {self.path} cannot be opened: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(schema)
            for probe in probes:
                self._conn.execute(probe)
        except sqlite3.Error as exc:
            self._conn.close()
            raise error(f"{what} {self.path} is not a usable {what} database (corrupt, locked or another schema): "
                        f"{exc}{hint}") from exc

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
