"""Signed parameter updates: the canonical bytes an update's Ed25519 signature covers, and verification.

The server signs :func:`signed_bytes` of an :class:`UpdateHeader`: every field that decides what a device
installs — bundle, cohort, version, base version, encoding, the sha256 of the payload, the digest of the
parameters the device must hold after applying it (``params_sha256``, :func:`runtime.params.params_digest`)
and of the base it applies to (``base_sha256``) — as sorted-key JSON after a fixed domain prefix, so no
other signed object can be replayed as an update. A bit flipped in the payload changes its sha256; one
flipped in the header or signature fails verification.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from runtime.errors import SignatureError
from runtime.signing import key_id

DOMAIN = b"edgeloop.update.v1\n"


@dataclass(frozen=True)
class UpdateHeader:
    """What a signature over an update covers (``base_version``/``base_sha256`` are 0/"" for ``"f32"``)."""

    bundle_id: str
    cohort: str
    version: int
    base_version: int
    kind: str
    round_id: int
    created_ms: int
    encoding: str
    payload_sha256: str
    params_sha256: str
    base_sha256: str


def payload_digest(payload: bytes) -> str:
    """sha256 hex of an update payload."""
    return hashlib.sha256(payload).hexdigest()


def signed_bytes(header: UpdateHeader) -> bytes:
    """The canonical byte string an update signature covers."""
    fields = asdict(header)
    for name in ("version", "base_version", "round_id", "created_ms"):
        fields[name] = int(fields[name])
    return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def verify_update_signature(header: UpdateHeader, signature: bytes, trusted_keys: Sequence[bytes]) -> str:
    """Check ``signature`` over ``header`` against each trusted raw Ed25519 key; return the signer's key id.

    Raises :class:`SignatureError` when the signature is missing or verifies under none of the keys.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not trusted_keys:
        raise SignatureError("no update keys to verify against")
    if len(signature) != 64:
        raise SignatureError(f"update v{header.version} ({header.cohort}) is unsigned or its signature is "
                             f"{len(signature)} bytes, not 64")
    message = signed_bytes(header)
    for key in trusted_keys:
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
        except InvalidSignature:
            continue
        return key_id(key)
    raise SignatureError(f"update v{header.version} ({header.cohort}) does not verify under any of the "
                         f"{len(trusted_keys)} trusted update keys")
