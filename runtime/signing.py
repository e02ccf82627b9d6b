"""Ed25519 bundle signatures: ``manifest.sig`` signs the exact bytes of ``manifest.json``.

The manifest lists the sha256 of every other file, so one signature covers the whole bundle. A device that
is given trusted public keys accepts only bundles signed by one of them; without trusted keys the embedded
public key still proves the bundle is intact, but not who made it (logged).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import SignatureError

log = logging.getLogger(__name__)

SIGNATURE_NAME = "manifest.sig"
ALGORITHM = "ed25519"


def key_id(public_key_raw: bytes) -> str:
    """Short, stable id of a raw 32-byte Ed25519 public key (first 16 hex digits of its sha256)."""
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


@dataclass(frozen=True)
class SignatureInfo:
    """Who signed a bundle and whether that key is one the caller trusts."""

    key_id: str
    public_key: bytes
    trusted: bool


def _b64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"{SIGNATURE_NAME}: field {field!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{SIGNATURE_NAME}: field {field!r} is not valid base64") from exc


def parse_signature(data: bytes) -> tuple[bytes, bytes]:
    """Return ``(public_key_raw, signature)`` from the bytes of ``manifest.sig``."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"{SIGNATURE_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{SIGNATURE_NAME}: algorithm must be {ALGORITHM!r}")
    public, signature = _b64(doc.get("public_key"), "public_key"), _b64(doc.get("signature"), "signature")
    if len(public) != 32 or len(signature) != 64:
        raise SignatureError(f"{SIGNATURE_NAME}: Ed25519 keys are 32 bytes and signatures 64 bytes")
    return public, signature


def verify_signature(
    manifest_bytes: bytes, signature_bytes: bytes, trusted_keys: Sequence[bytes] | None = None
) -> SignatureInfo:
    """Verify ``manifest.sig`` over ``manifest.json``; with ``trusted_keys`` the signer must be one of them."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public, signature = parse_signature(signature_bytes)
    kid = key_id(public)
    if trusted_keys is not None and public not in set(trusted_keys):
        raise SignatureError(f"bundle is signed by key {kid}, which is not among the {len(trusted_keys)} trusted keys")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, manifest_bytes)
    except InvalidSignature as exc:
        raise SignatureError(f"manifest.json does not match its Ed25519 signature (key {kid})") from exc
    if trusted_keys is None:
        log.info("bundle signature valid (key %s); no trusted keys configured, so the signer is not authenticated", kid)
    return SignatureInfo(kid, public, trusted_keys is not None)


def verify_bundle_signature(root: Path, manifest_bytes: bytes, trusted_keys: Sequence[bytes] | None) -> SignatureInfo:
    """Verify ``root/manifest.sig`` against the manifest bytes already read."""
    path = Path(root) / SIGNATURE_NAME
    if not path.is_file():
        raise SignatureError(f"bundle is unsigned: {path} is missing")
    return verify_signature(manifest_bytes, path.read_bytes(), trusted_keys)


def load_public_key(path: Path) -> bytes:
    """Read a trusted public key: a PEM file or a file holding the 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = Path(path).read_bytes()
    if len(data) == 32:
        return data
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
