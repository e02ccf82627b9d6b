"""What the server needs from a bundle's manifest.json (schema_version 1 or 2, see docs/CONTRACT.md), validated.

The server checks a published bundle's file list and sha256s, and uses the manifest's input shape, feature
width and initial adaptable parameters to validate what devices upload. An optional ``trainable`` block names a
file of the bundle holding the model's full float weights (for devices that train with local SGD); the
federated parameter space is then the adaptable parameters and these (:attr:`BundleSpec.param_shapes`).
In schema version 2 the initial adaptable parameters are a block file (``adaptable.initial.file``,
:mod:`runtime.blocks`) read with :meth:`BundleSpec.initial_values`; their names and shapes come from the layers.

A bundle without an ``adaptable`` block (absent or null; e.g. a foreign ONNX/TFLite model wrapped by
``edgeloop export --from-onnx/--from-tflite``, :mod:`exporter.foreign`) is accepted when none of its models is an
adaptable graph and it declares no ``trainable`` block: :attr:`BundleSpec.adaptable` is then False and it has
no federated parameters, so the server serves it, stores its samples and drift events, and refuses everything
that needs parameters (:class:`~server.errors.NoAdaptableParametersError`). Its feature width comes from its
source statistics when recorded; without them features are accepted at any width when ``outputs.features``
names a tensor, refused when it is null.

Validation is the device runtime's (:func:`runtime.manifest.parse_manifest`, and
:func:`runtime.manifest.decode_trainable` for the trainable weights): the server accepts exactly the bundles a
device can load, and adds the checks of what it stores and serves (file paths, sha256 digests).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.manifest import ManifestError, decode_trainable
from runtime.manifest import parse_manifest as parse_for_device
from server.errors import InvalidBundleError, InvalidTensorError

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2  # the newest this server reads
SCHEMA_VERSIONS = (1, 2)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
FEATURES_UNDECLARED = 0  # BundleSpec.feature_dim of a bundle whose model has no features output
FEATURES_ANY_WIDTH = -1  # … of a bundle without an adaptable block whose features width is not recorded


@dataclass(frozen=True)
class BundleSpec:
    """The validated parts of a manifest: file sha256s, input shape, feature width, initial parameters."""

    files: dict[str, str]
    input_shape: tuple[int, ...]
    feature_dim: int  # FEATURES_UNDECLARED: the model has no features output; FEATURES_ANY_WIDTH: not recorded
    initial: dict[str, np.ndarray]  # schema 1: the values; schema 2: empty (see initial_file)
    trainable_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    trainable_file: str = ""
    initial_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    initial_file: str = ""
    adaptable: bool = True  # False: published without an 'adaptable' block (no federated parameters)
    # parameters a model of the bundle needs >= 0 (its manifest entry's nonnegative_params), by model name
    nonnegative: dict[str, tuple[str, ...]] = field(default_factory=dict)
    variances: tuple[str, ...] = ()  # the adaptable layers' variance parameters (Manifest.variance_params)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every federated parameter: the adaptable ones, then the trainable ones (if any)."""
        return {**self.initial_shapes, **self.trainable_shapes}

    def initial_values(self, data: bytes | None = None) -> dict[str, np.ndarray]:
        """The initial adaptable parameters: inline (schema 1) or decoded from ``data``, the bytes of
        :attr:`initial_file` (schema 2), checked against the layers' names and shapes, float32 and finite."""
        if not self.initial_file:
            return {k: np.asarray(v, dtype=np.float32) for k, v in self.initial.items()}
        if data is None:
            raise InvalidBundleError(f"the initial parameters live in {self.initial_file!r}; pass its bytes")
        from runtime.blocks import BlockError, checked_float32, decode_block

        try:
            return checked_float32(decode_block(data, self.initial_file), self.initial_shapes, self.initial_file)
        except BlockError as exc:
            raise InvalidBundleError(str(exc)) from exc

    def trainable_initial(self, data: bytes) -> dict[str, np.ndarray]:
        """The trainable weights in ``data`` (the bytes of :attr:`trainable_file`), checked against the block."""
        return parse_trainable(data, self.trainable_shapes, self.trainable_file)

    def check_input(self, array: np.ndarray, what: str) -> np.ndarray:
        """Validate one model input (batch dim 1 or absent); return it without the batch dim, float32."""
        sample_shape = self.input_shape[1:]
        _check_float32_finite(array, what)
        shape = tuple(array.shape)
        if len(shape) == len(self.input_shape) and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != len(sample_shape) or any(e >= 0 and s != e for s, e in zip(shape, sample_shape, strict=True)):
            raise InvalidTensorError(
                f"{what}: shape {tuple(array.shape)} does not match the bundle input shape "
                f"{list(self.input_shape)} (batch dim 1 or absent)"
            )
        return np.ascontiguousarray(array.reshape(shape), dtype=np.float32)

    def check_features(self, array: np.ndarray, what: str) -> np.ndarray:
        """Validate penultimate features of shape (D,) (or (1, D)); return them as (D,) float32.

        A bundle whose features width is not recorded (:data:`FEATURES_ANY_WIDTH`) takes any D >= 1; one whose
        model has no features output (:data:`FEATURES_UNDECLARED`) takes none."""
        if self.feature_dim == FEATURES_UNDECLARED:
            raise InvalidTensorError(f"{what}: the bundle's model has no features output (outputs.features is "
                                     "null); upload the input only")
        _check_float32_finite(array, what)
        shape = tuple(array.shape)
        dim = self.feature_dim if self.feature_dim > 0 else (shape[-1] if shape else 0)
        if dim <= 0 or shape not in ((dim,), (1, dim)):
            expected = f"({self.feature_dim},)" if self.feature_dim > 0 else "(D,) with D >= 1"
            raise InvalidTensorError(f"{what}: shape {shape}, expected {expected}")
        return np.ascontiguousarray(array.reshape(dim), dtype=np.float32)


def _check_float32_finite(array: np.ndarray, what: str) -> None:
    if array.dtype != np.float32:
        raise InvalidTensorError(f"{what}: dtype {array.dtype}, expected float32")
    if not np.all(np.isfinite(array)):
        raise InvalidTensorError(f"{what}: contains NaN or infinite values")


def _get(obj: Any, *keys: str) -> Any:
    cur = obj
    for i, key in enumerate(keys):
        if not isinstance(cur, Mapping) or key not in cur:
            raise InvalidBundleError(f"{MANIFEST_FILE}: missing field {'.'.join(keys[: i + 1])!r}")
        cur = cur[key]
    return cur


def check_bundle_path(path: str) -> str:
    """Reject absolute, empty, backslashed or ``..`` paths; return the path unchanged."""
    parts = path.split("/")
    if not path or "\\" in path or "\0" in path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidBundleError(f"invalid bundle file path {path!r}: must be a relative POSIX path")
    return path


def _files(manifest: Mapping[str, Any]) -> dict[str, str]:
    files = _get(manifest, "files")
    if not isinstance(files, Mapping) or not files:
        raise InvalidBundleError(f"{MANIFEST_FILE}: 'files' must be a non-empty object of path -> sha256")
    out: dict[str, str] = {}
    for path, digest in files.items():
        check_bundle_path(str(path))
        if path == MANIFEST_FILE:
            raise InvalidBundleError(f"{MANIFEST_FILE}: 'files' must not list {MANIFEST_FILE} itself")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise InvalidBundleError(f"{MANIFEST_FILE}: files[{path!r}] = {digest!r} is not a sha256 hex digest")
        out[str(path)] = digest
    return out


def parse_trainable(data: bytes, shapes: Mapping[str, tuple[int, ...]], path: str) -> dict[str, np.ndarray]:
    """Decode a trainable-weights file and check it holds exactly ``shapes``, finite float32 (the device's
    check, :func:`runtime.manifest.decode_trainable`; its error as :class:`InvalidBundleError`)."""
    try:
        return decode_trainable(data, shapes, path)
    except ManifestError as exc:
        raise InvalidBundleError(str(exc)) from exc


def parse_manifest(raw: bytes) -> tuple[dict[str, Any], BundleSpec]:
    """Parse manifest.json bytes; return the JSON object and its :class:`BundleSpec`.

    Raises :class:`InvalidBundleError` naming the missing or malformed field.
    """
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidBundleError(f"{MANIFEST_FILE} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise InvalidBundleError(f"{MANIFEST_FILE} must hold a JSON object, got {type(manifest).__name__}")
    return manifest, bundle_spec(manifest)


def bundle_spec(manifest: Mapping[str, Any]) -> BundleSpec:
    """Validate an already-parsed manifest and extract its :class:`BundleSpec`.

    The manifest is validated by the device runtime's own parser (:func:`runtime.manifest.parse_manifest`), so
    the server accepts exactly the bundles a device can load; its :class:`~runtime.manifest.ManifestError`
    becomes :class:`InvalidBundleError`. On top of that the server checks what it serves: file paths and
    sha256 digests, and that a bundle without an ``adaptable`` block has no ``trainable`` block either."""
    version = _get(manifest, "schema_version")
    if version not in SCHEMA_VERSIONS or isinstance(version, bool):
        raise InvalidBundleError(f"{MANIFEST_FILE}: schema_version {version!r} is not supported "
                                 f"(this server reads {', '.join(map(str, SCHEMA_VERSIONS))})")
    files = _files(manifest)
    if manifest.get("adaptable") is None and manifest.get("trainable") is not None:
        raise InvalidBundleError(f"{MANIFEST_FILE}: a 'trainable' block needs an 'adaptable' block (the federated "
                                 "parameters start from the adaptable ones); this manifest has none")
    try:
        parsed = parse_for_device(dict(manifest))
    except ManifestError as exc:
        raise InvalidBundleError(f"{MANIFEST_FILE}: {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:  # a field of the wrong kind deep inside
        raise InvalidBundleError(f"{MANIFEST_FILE}: malformed ({type(exc).__name__}: {exc})") from exc
    input_shape = tuple(parsed.input.shape)
    if not parsed.is_adaptable:
        return BundleSpec(files=files, input_shape=input_shape, feature_dim=_feature_dim(manifest, version),
                          initial={}, adaptable=False)
    shapes = parsed.param_shapes()
    trainable = parsed.trainable
    return BundleSpec(
        files=files, input_shape=input_shape, feature_dim=_recorded_feature_dim(manifest, version),
        initial=dict(parsed.initial_inline or {}), initial_shapes=shapes, initial_file=parsed.initial_file or "",
        trainable_shapes=dict(trainable.shapes) if trainable else {},
        trainable_file=trainable.file if trainable else "",
        nonnegative={m.name: m.nonnegative_params for m in parsed.models if m.nonnegative_params},
        variances=parsed.variance_params,
    )


def _feature_dim(manifest: Mapping[str, Any], version: int) -> int:
    """The features width of a bundle without an adaptable block: from its source statistics when it has them
    (checked as for any bundle), else :data:`FEATURES_ANY_WIDTH` when ``outputs.features`` names a tensor and
    :data:`FEATURES_UNDECLARED` when it is null."""
    stats = manifest.get("source_statistics")
    features = stats.get("features") if isinstance(stats, Mapping) else None
    if features is None:
        outputs = manifest.get("outputs")
        named = outputs.get("features") if isinstance(outputs, Mapping) else None
        if named is not None and not isinstance(named, str):
            raise InvalidBundleError(f"{MANIFEST_FILE}: outputs.features must be a tensor name or null")
        return FEATURES_ANY_WIDTH if named else FEATURES_UNDECLARED
    return _recorded_feature_dim(manifest, version)


def _recorded_feature_dim(manifest: Mapping[str, Any], version: int) -> int:
    """The features width the source statistics record: the length of ``features.mean`` (schema 1) or
    ``features.dim`` (schema 2), validated."""
    if version == 1:
        mean = _get(manifest, "source_statistics", "features", "mean")
        if not isinstance(mean, list) or not mean:
            raise InvalidBundleError(f"{MANIFEST_FILE}: source_statistics.features.mean must be a non-empty list")
        return len(mean)
    dim = _get(manifest, "source_statistics", "features", "dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise InvalidBundleError(f"{MANIFEST_FILE}: source_statistics.features.dim must be a positive int")
    return dim
