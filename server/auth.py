"""Device enrollment and credentials: a shared enrollment secret buys a per-device token; an admin token.

Only the sha256 of each device token is stored (``auth.sqlite3`` in the data directory, WAL), behind the
small :class:`TokenStore` protocol that a PostgreSQL backend could implement. Tokens are 256-bit random
strings, so a plain hash is enough (no password-style stretching); secrets are compared in constant time.
Enrolling a device again issues a new token and revokes its previous one: whoever holds the enrollment
secret may (re)enroll any device id, so the secret is as sensitive as the admin token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from server.errors import AuthenticationError, EnrollmentDisabledError, PermissionDeniedError
from server.state import check_id, now_ms
from server.storage import open_sqlite, unusable_database

logger = logging.getLogger(__name__)
TOKEN_PREFIX = "eld_"
_TOKEN_BYTES = 32


def token_digest(token: str) -> str:
    """The sha256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore(Protocol):
    """Where device token digests live: one current digest per device."""

    def put(self, device_id: str, digest: str, issued_ms: int) -> None:
        """Make ``digest`` the device's only valid token digest (revoking any earlier one), durably."""
        ...

    def all_tokens(self) -> dict[str, str]:
        """Every stored digest → device id."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...


class SqliteTokenStore:
    """:class:`TokenStore` over one SQLite file (WAL, ``synchronous=FULL``)."""

    def __init__(self, db_path: Path) -> None:
        """Open or create the store at ``db_path``."""
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = open_sqlite(self.db_path, "device token store")
        try:
            self._conn.execute("CREATE TABLE IF NOT EXISTS device_tokens (device_id TEXT PRIMARY KEY, "
                               "token_sha256 TEXT NOT NULL UNIQUE, issued_ms INTEGER NOT NULL)")
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise unusable_database(self.db_path, "device token store", exc) from exc

    def put(self, device_id: str, digest: str, issued_ms: int) -> None:
        """See :meth:`TokenStore.put`."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO device_tokens (device_id, token_sha256, issued_ms) VALUES (?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET token_sha256 = excluded.token_sha256, "
                "issued_ms = excluded.issued_ms", (device_id, digest, issued_ms))

    def all_tokens(self) -> dict[str, str]:
        """See :meth:`TokenStore.all_tokens`."""
        with self._lock:
            rows = self._conn.execute("SELECT token_sha256, device_id FROM device_tokens").fetchall()
        return {str(d): str(dev) for d, dev in rows}

    def close(self) -> None:
        """See :meth:`TokenStore.close`."""
        with self._lock:
            self._conn.close()


class Authenticator:
    """Issues device tokens for the enrollment secret and tells which device (or admin) a token is.

    ``enrollment_secret`` None means enrollment is off (development mode without tokens).
    """

    def __init__(self, store: TokenStore, enrollment_secret: str | None, admin_token: str | None,
                 clock: Callable[[], int] = now_ms) -> None:
        """Serve tokens from ``store``; its digests are cached in memory (this process is the only writer)."""
        self._store = store
        self._secret = enrollment_secret
        self._admin = admin_token
        self._clock = clock
        self._lock = threading.Lock()
        self._devices = store.all_tokens()  # digest -> device id
        self._current = {dev: digest for digest, dev in self._devices.items()}

    def enroll(self, device_id: str, enrollment_secret: str) -> str:
        """Check the shared secret and return a new token for ``device_id`` (its earlier token is revoked)."""
        check_id(device_id, "device_id")
        if self._secret is None:
            raise EnrollmentDisabledError("this server has no enrollment secret: device calls need no token")
        if not hmac.compare_digest(enrollment_secret.encode(), self._secret.encode()):
            raise AuthenticationError(f"wrong enrollment secret for device {device_id!r}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
        digest = token_digest(token)
        with self._lock:
            self._store.put(device_id, digest, self._clock())
            old = self._current.pop(device_id, None)
            if old is not None:
                self._devices.pop(old, None)
            self._devices[digest] = device_id
            self._current[device_id] = digest
        logger.info("device %s enrolled%s", device_id, " again (previous token revoked)" if old else "")
        return token

    def device_for(self, token: str) -> str | None:
        """The device a valid token belongs to, or None."""
        with self._lock:
            return self._devices.get(token_digest(token))

    def is_admin(self, token: str) -> bool:
        """Whether ``token`` is the admin credential."""
        return self._admin is not None and hmac.compare_digest(token.encode(), self._admin.encode())

    def require_device(self, token: str | None) -> str:
        """The device a call's token belongs to; :class:`AuthenticationError` or :class:`PermissionDeniedError`."""
        if not token:
            raise AuthenticationError("missing 'authorization: Bearer <device token>' metadata; call Enroll first")
        device = self.device_for(token)
        if device is not None:
            return device
        if self.is_admin(token):
            raise PermissionDeniedError("the admin credential cannot make device calls")
        raise AuthenticationError("invalid or revoked device token; call Enroll again")

    def require_admin(self, token: str | None) -> None:
        """Accept only the admin credential; a device token is PERMISSION_DENIED, anything else UNAUTHENTICATED."""
        if not token:
            raise AuthenticationError("missing 'authorization: Bearer <admin token>' metadata")
        if self.is_admin(token):
            return
        if self.device_for(token) is not None:
            raise PermissionDeniedError("a device token cannot call the admin service")
        raise AuthenticationError("invalid admin token")

    def close(self) -> None:
        """Close the token store."""
        self._store.close()
