"""Ed25519 signing keys and bundle signing (the verifying half is :mod:`runtime.signing`)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtime.signing import ALGORITHM, SIGNATURE_NAME, key_id


def generate_key(path: Path) -> Ed25519PrivateKey:
    """Create a new private key and write it as PEM (mode 0600) to ``path``, plus ``path.pub`` (PEM)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"refusing to overwrite signing key {path}")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path(path).write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key


def public_path(private_path: Path) -> Path:
    """Where :func:`generate_key` writes the public key of ``private_path``."""
    return Path(str(private_path) + ".pub")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; the error names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"signing key not found: {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def public_key_raw(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of ``key``'s public key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signature_document(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The bytes of ``manifest.sig`` for ``manifest_bytes``."""
    public = public_key_raw(key)
    doc = {
        "algorithm": ALGORITHM,
        "key_id": key_id(public),
        "public_key": base64.b64encode(public).decode("ascii"),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def sign_bundle(bundle_dir: Path, key: Ed25519PrivateKey) -> str:
    """(Re-)sign ``bundle_dir/manifest.json``; write ``manifest.sig``; return the key id."""
    bundle_dir = Path(bundle_dir)
    manifest = (bundle_dir / "manifest.json").read_bytes()
    (bundle_dir / SIGNATURE_NAME).write_bytes(signature_document(manifest, key))
    return key_id(public_key_raw(key))
