"""Loading a bundle on a device: every file's sha256, then the golden vectors, then a ready session."""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.blocks import MAGIC as BLOCK_MAGIC
from runtime.blocks import BlockError, decode_block, decode_image_u8
from runtime.errors import BundleIntegrityError, GoldenMismatchError, InputError, ManifestError
from runtime.manifest import Manifest, ModelEntry, decode_manifest, read_manifest_bytes
from runtime.packing import unpack
from runtime.session import Session, open_session
from runtime.signing import SignatureInfo, verify_bundle_signature

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle with an open session on one of its models."""

    root: Path
    bundle_id: str
    manifest: Manifest
    model: ModelEntry
    session: Session
    signer: SignatureInfo | None


def file_problem(root: Path, rel: str, expected: str) -> tuple[str, str] | None:
    """What is wrong with the manifest-listed file ``rel`` of the bundle ``root`` — ``("escapes" | "missing" |
    "unreadable" | "sha256", message)`` — or None when it is present and matches ``expected``."""
    try:
        base = root.resolve()
        path = (root / rel).resolve()
        if base not in path.parents:
            return "escapes", f"manifest file path {rel!r} escapes the bundle directory"
        if not path.is_file():
            return "missing", f"bundle file {rel!r} is missing from {root}"
        actual = file_sha256(path)
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError on Python 3.11), a permission, I/O
        return "unreadable", f"bundle file {rel!r} cannot be read: {exc}"
    if actual != expected:
        return "sha256", f"bundle file {rel!r} fails its sha256 check: expected {expected[:16]}…, got {actual[:16]}…"
    return None


def verify_files(root: Path, manifest: Manifest, required: Sequence[str] | None = None) -> None:
    """Check the files the manifest lists inside ``root`` against their sha256.

    ``required`` (default: every listed file) must be present; any other listed file may be absent (a device
    fetches only what its model needs), but if it is present it must match too.
    """
    needed = set(manifest.files if required is None else required)
    for rel, expected in sorted(manifest.files.items()):
        problem = file_problem(root, rel, expected)
        if problem is None or (problem[0] == "missing" and rel not in needed):
            continue
        raise BundleIntegrityError(problem[1])


def golden_feeds(manifest: Manifest, model: ModelEntry, x: np.ndarray) -> dict[str, np.ndarray]:
    """Graph feeds for the golden check: ``x``, plus the golden α and initial parameters for an adaptable graph."""
    feeds = {manifest.input.name: x}
    if model.graph == "adaptable":
        feeds[manifest.alpha_input] = np.asarray(manifest.golden_alpha, np.float32)
        feeds.update(manifest.initial_params)
    return feeds


def golden_input(recorded: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The golden input batch: ``input`` as stored, or ``input_u8 / input_denominator`` (float32, exact), the
    uint8 images possibly stored as their prediction residual ``input_u8_residual`` (:mod:`runtime.blocks`)."""
    if "input" in recorded:
        return recorded["input"]
    if "input_u8_residual" in recorded and "input_denominator" in recorded:
        images = decode_image_u8(recorded["input_u8_residual"])
        return images.astype(np.float32) / _denominator(recorded, name)
    if "input_u8" in recorded and "input_denominator" in recorded:
        return recorded["input_u8"].astype(np.float32) / _denominator(recorded, name)
    raise BundleIntegrityError(f"golden file {name!r} has no 'input' (or 'input_u8') array")


def _denominator(recorded: dict[str, np.ndarray], name: str) -> np.float32:
    """The golden file's ``input_denominator``: one positive finite number."""
    value = np.asarray(recorded["input_denominator"])
    scalar = float(value.reshape(())) if value.size == 1 and value.dtype.kind in "fiu" else float("nan")
    if not (np.isfinite(scalar) and scalar > 0):
        raise BundleIntegrityError(f"golden file {name!r}: input_denominator must be one positive number, got "
                                   f"{value.dtype} {value.shape}")
    return np.float32(scalar)


def read_golden(root: Path, name: str) -> dict[str, np.ndarray]:
    """The arrays of golden file ``name`` in ``root``: a compressed block (schema version 2) or an ``.npz``."""
    path = Path(root) / name
    try:
        data = path.read_bytes()
        if data[: len(BLOCK_MAGIC)] == BLOCK_MAGIC:
            return decode_block(data, name)
        with np.load(io.BytesIO(data), allow_pickle=False) as golden:
            return {k: golden[k] for k in golden.files}
    except (OSError, ValueError, zipfile.BadZipFile, BlockError) as exc:
        raise BundleIntegrityError(f"golden file {name!r} is unreadable: {exc}") from exc


def check_outputs(manifest: Manifest, model: ModelEntry, outputs: dict[str, np.ndarray]) -> None:
    """Check that ``model``'s outputs on a batch (the golden one) hold what the manifest says they do: the
    scores, ``(N, len(labels))``, the features when named, and each adaptable layer's batch statistics."""
    names = [manifest.logits_output, *([manifest.features_output] if manifest.features_output else [])]
    if model.graph == "adaptable":
        names += [n for layer in manifest.layers for n in (layer.batch_mean, layer.batch_var)]
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ManifestError(f"model {model.name!r} has no output(s) {missing} that the manifest names; its outputs "
                            f"are {sorted(outputs)}")
    scores = outputs[manifest.logits_output]
    if scores.ndim != 2 or scores.shape[1] != len(manifest.labels):
        raise ManifestError(f"model {model.name!r} output {manifest.logits_output!r} has shape {scores.shape}, but "
                            f"the manifest lists {len(manifest.labels)} labels")


def verify_golden(root: Path, manifest: Manifest, model: ModelEntry, session: Session) -> None:
    """Run the golden inputs and compare every recorded output of ``model`` within its tolerance."""
    name = manifest.golden_file_of(model.name)
    recorded = read_golden(root, name)
    try:
        x = golden_input(recorded, name)
    except BlockError as exc:
        raise BundleIntegrityError(f"golden file {name!r}: {exc}") from exc
    if x.ndim != len(manifest.input.shape) or x.shape[1:] != manifest.input.shape[1:] or len(x) == 0:
        raise BundleIntegrityError(f"golden file {name!r}: golden input has shape {x.shape}, the manifest's input "
                                   f"is {list(manifest.input.shape)} (N >= 1)")
    if model.name not in manifest.golden_tolerance:
        raise ManifestError(f"golden.models has no tolerance for model {model.name!r}")
    try:
        outputs = session.run(golden_feeds(manifest, model, x.astype(manifest.input.dtype)))
    except InputError as exc:
        raise ManifestError(f"model {model.name!r} does not take the inputs its manifest describes: {exc}") from exc
    check_outputs(manifest, model, outputs)
    prefix = f"{model.name}/"
    checked = 0
    for key, expected in recorded.items():
        if not key.startswith(prefix):
            continue
        out = key[len(prefix) :]
        if out not in outputs:
            raise GoldenMismatchError(f"model {model.name!r} has no output {out!r} recorded in golden vectors")
        if expected.shape != outputs[out].shape or expected.dtype.kind != "f":
            raise GoldenMismatchError(f"model {model.name!r} output {out!r} has shape {outputs[out].shape}, its "
                                      f"golden vector is {expected.dtype} {expected.shape}")
        diff = np.abs(outputs[out].astype(np.float64) - expected)
        atol, rtol = manifest.tolerance_of(model.name, out)
        bound = atol + rtol * np.abs(expected)
        if not np.all(diff <= bound):
            raise GoldenMismatchError(
                f"model {model.name!r} output {out!r} differs from its golden vector by up to "
                f"{float(diff.max()):.3g} (atol {atol}, rtol {rtol})"
            )
        checked += 1
    if checked == 0:
        raise GoldenMismatchError(f"golden vectors hold no outputs for model {model.name!r}")


def unpack_model(root: Path, entry: ModelEntry) -> bytes:
    """Decode a model (ONNX or TFLite) shipped in the packed N:M encoding. The decoder proves the result against
    the sha256 in the pack's header (covered by the pack's own sha256 in the manifest); a manifest that also
    records ``sha256_unpacked`` (schema version 1) is checked against it too."""
    packed = entry.packed or {}
    if packed.get("encoding") != "nm":
        raise ManifestError(f"model {entry.name!r}: only the N:M packed encoding can be decoded, got {packed}")
    data = unpack((root / packed["file"]).read_bytes())
    actual = hashlib.sha256(data).hexdigest()
    if "sha256_unpacked" in packed and actual != packed.get("sha256_unpacked"):
        raise BundleIntegrityError(
            f"model {entry.name!r}: {packed['file']} decodes to sha256 {actual[:16]}…, "
            f"manifest says {str(packed.get('sha256_unpacked'))[:16]}…"
        )
    return data


def load_bundle(
    path: Path,
    model: str | None = None,
    backend: str = "auto",
    threads: int | None = None,
    verify: bool = True,
    trusted_keys: Sequence[bytes] | None = None,
) -> Bundle:
    """Open a bundle directory: check its Ed25519 signature, the manifest, every sha256 and the golden
    outputs, then open a session.

    ``trusted_keys`` (raw 32-byte Ed25519 public keys) restricts who may have signed it; without them the
    signature still proves integrity. ``verify=False`` skips every check (for tools that inspect broken
    bundles). Raises a :class:`runtime.errors.BundleError` subclass naming what failed.
    """
    root = Path(path)
    if not root.is_dir():
        raise ManifestError(f"bundle directory not found: {root}")
    raw = read_manifest_bytes(root)
    # the signature first: with trusted_keys, nothing a stranger wrote is parsed
    signer = verify_bundle_signature(root, raw, trusted_keys) if verify else None
    manifest = decode_manifest(raw, root)
    entry = manifest.model(model, backend)
    if backend not in ("auto", entry.backend):
        raise ManifestError(f"model {entry.name!r} is a {entry.format} model; backend {backend!r} cannot run it")
    if verify:
        verify_files(root, manifest, manifest.files_for(entry.name))
    source = unpack_model(root, entry) if entry.packed is not None else root / entry.file
    session = open_session(source, backend=entry.backend, threads=threads, io_names=entry.io_names,
                           disabled_optimizers=entry.disabled_optimizers)
    if verify:
        verify_golden(root, manifest, entry, session)
    bundle_id = hashlib.sha256(raw).hexdigest()
    log.info("loaded bundle %s (%s, model %s, %s)", bundle_id[:12], manifest.name, entry.name, entry.backend)
    return Bundle(root=root, bundle_id=bundle_id, manifest=manifest, model=entry, session=session, signer=signer)
