"""Content-addressed blob store on the local file system: ``root/ab/abcdef…`` keyed by sha256 hex.

Writes are atomic and durable (temporary file in the target directory, fsync, ``os.replace``, directory
fsync), so a reader sees either nothing or the whole blob; reads re-verify the digest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

from runtime.files import STALE_TEMPORARY_SECONDS, fsync_dir, write_atomically
from server.errors import BlobCorruptError, BlobNotFoundError, InvalidRequestError

logger = logging.getLogger(__name__)
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    """The sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Immutable blobs addressed by the sha256 of their bytes, stored under ``root``."""

    def __init__(self, root: Path) -> None:
        """Open (creating if needed) the store at ``root``; temporary files a crashed write left behind (older
        than :data:`STALE_TEMPORARY_SECONDS`, so never one a live writer still uses) are removed."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - STALE_TEMPORARY_SECONDS
        removed = 0
        for tmp in self.root.glob("*/.tmp-*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except OSError:  # gone meanwhile, or not ours to remove: never a reason not to start
                continue
        if removed:
            logger.warning("blob store %s: removed %d temporary files left by interrupted writes", self.root, removed)

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists); rejects malformed digests."""
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise InvalidRequestError(f"malformed blob digest {digest!r}: expected 64 lowercase hex digits")
        return self.root / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        """Whether a blob with this digest is stored (its content is verified only by :meth:`get`)."""
        return self.path(digest).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its sha256 hex digest; storing the same bytes again is a no-op.

        An existing file whose bytes no longer match its name is replaced.
        """
        digest = sha256_hex(data)
        target = self.path(digest)
        if target.is_file():
            try:
                intact = sha256_hex(target.read_bytes()) == digest
            except OSError as exc:
                logger.warning("blob %s unreadable (%s), rewriting it", digest, exc)
                intact = False
            if intact:
                return digest
            logger.warning("blob %s was corrupt on disk, rewriting it", digest)
        self._write_atomic(target, data)
        return digest

    def _write_atomic(self, target: Path, data: bytes) -> None:
        shard = target.parent
        created = not shard.is_dir()
        shard.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data, prefix=".tmp-")
        if created:
            fsync_dir(self.root)

    def get(self, digest: str) -> bytes:
        """The bytes of blob ``digest``; raises :class:`BlobNotFoundError` or :class:`BlobCorruptError`."""
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is not stored") from None
        actual = sha256_hex(data)
        if actual != digest:
            raise BlobCorruptError(f"blob {digest} is corrupt on disk: its bytes hash to {actual}")
        return data
