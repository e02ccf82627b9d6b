"""Crash-safe file writes shared by the device and the server (no torch, standard library only)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

STALE_TEMPORARY_SECONDS = 3600.0
"""A temporary file or directory nothing has changed in for this long is left over from a process that died
mid-write (SIGKILL, power loss; a write or a download takes seconds), never one a live writer, possibly another
process, still uses: the server's blob store and the device's bundle downloads remove such leftovers."""


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, prefix: str | None = None) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the whole new one, never an empty or
    partial one: a temporary file beside it (mode 0600, named ``prefix`` + random, default ``.<name>.tmp-``),
    written and fsynced, renamed over ``path``, then the directory fsynced. A failed write removes the
    temporary file and raises; ``path`` is untouched then. The new file keeps mode 0600 (tokens, keys)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix or f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
