"""The server's update-signing key: configured (``ServerConfig.update_signing_key``) or generated once.

Without a configured key the server creates ``<data_dir>/update_signing.pem`` (mode 0600, plus ``.pub``) on
first start and keeps using it, so devices that pinned its public key at registration keep trusting it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exporter.signing import generate_key, load_private_key, public_key_raw
from runtime.signing import key_id
from runtime.update_signing import UpdateHeader, signed_bytes

logger = logging.getLogger(__name__)
DEFAULT_KEY_NAME = "update_signing.pem"


@dataclass(frozen=True)
class UpdateSigner:
    """Signs update headers with one Ed25519 key."""

    key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key devices verify with."""
        return public_key_raw(self.key)

    @property
    def key_id(self) -> str:
        """Short id of the public key."""
        return key_id(self.public_key)

    def sign(self, header: UpdateHeader) -> bytes:
        """The 64-byte signature over :func:`runtime.update_signing.signed_bytes` of ``header``."""
        return self.key.sign(signed_bytes(header))


def load_or_create_signer(configured: Path | None, data_dir: Path) -> UpdateSigner:
    """The configured key, else ``data_dir/update_signing.pem`` (generated on first use)."""
    if configured is not None:
        return UpdateSigner(load_private_key(configured))
    path = Path(data_dir) / DEFAULT_KEY_NAME
    if path.is_file():
        return UpdateSigner(load_private_key(path))
    signer = UpdateSigner(generate_key(path))
    logger.info("generated update-signing key %s (id %s)", path, signer.key_id)
    return signer
