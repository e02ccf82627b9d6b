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
names a tensor, refused when it is null. A bundle that has the block is validated exactly as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.arrays import ArrayCodecError, decode_arrays
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


def _input_shape(manifest: Mapping[str, Any]) -> tuple[int, ...]:
    shape = _get(manifest, "input", "shape")
    ok = isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) for d in shape)
    if not ok or any(d == 0 or d < -1 for d in shape):
        raise InvalidBundleError(f"{MANIFEST_FILE}: input.shape {shape!r} must be a list of positive ints or -1")
    return tuple(shape)


def _initial_v2(manifest: Mapping[str, Any], files: Mapping[str, str]) -> tuple[dict[str, tuple[int, ...]], str]:
    """Schema 2: names and shapes of the adaptable parameters (from the layers) and their block file."""
    layers = _get(manifest, "adaptable", "layers")
    file = _get(manifest, "adaptable", "initial", "file")
    if not isinstance(file, str) or file not in files:
        raise InvalidBundleError(f"{MANIFEST_FILE}: adaptable.initial.file {file!r} must name a file in 'files'")
    if not isinstance(layers, list) or not layers:
        raise InvalidBundleError(f"{MANIFEST_FILE}: adaptable.layers must be a non-empty list")
    shapes: dict[str, tuple[int, ...]] = {}
    for i, layer in enumerate(layers):
        name, channels = (layer.get("name"), layer.get("channels")) if isinstance(layer, Mapping) else (None, None)
        if not isinstance(name, str) or not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
            raise InvalidBundleError(f"{MANIFEST_FILE}: adaptable.layers[{i}] needs a name and positive channels")
        for key in ("weight", "bias", "mean", "var"):
            shapes[str(layer.get(key, f"{name}.{key}"))] = (channels,)
    return shapes, file


def _initial(manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    initial = _get(manifest, "adaptable", "initial")
    if not isinstance(initial, Mapping) or not initial:
        raise InvalidBundleError(f"{MANIFEST_FILE}: adaptable.initial must be a non-empty object")
    out: dict[str, np.ndarray] = {}
    for name, values in initial.items():
        try:
            arr = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidBundleError(f"{MANIFEST_FILE}: adaptable.initial[{name!r}] is not numeric: {exc}") from exc
        if arr.ndim != 1 or not np.all(np.isfinite(arr)):
            raise InvalidBundleError(f"{MANIFEST_FILE}: adaptable.initial[{name!r}] must be a finite 1-D list")
        out[str(name)] = arr
    return out


def parse_trainable(data: bytes, shapes: Mapping[str, tuple[int, ...]], path: str) -> dict[str, np.ndarray]:
    """Decode a trainable-weights file (:mod:`runtime.arrays`) and check it holds exactly ``shapes``, finite."""
    try:
        arrays = decode_arrays(data)
    except ArrayCodecError as exc:
        raise InvalidBundleError(f"trainable file {path!r} is not an array blob: {exc}") from exc
    if set(arrays) != set(shapes):
        raise InvalidBundleError(f"trainable file {path!r} holds {sorted(arrays)[:8]}, the manifest names "
                                 f"{sorted(shapes)[:8]} ({len(arrays)} vs {len(shapes)} tensors)")
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        if arr.dtype != np.float32 or tuple(arr.shape) != tuple(shapes[name]) or not np.all(np.isfinite(arr)):
            raise InvalidBundleError(f"trainable file {path!r}: {name!r} is {arr.dtype} {tuple(arr.shape)}, the "
                                     f"manifest says float32 {tuple(shapes[name])} (finite)")
        out[name] = arr
    return out


def _trainable(manifest: Mapping[str, Any], files: Mapping[str, str],
               adaptable: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], str]:
    block = manifest.get("trainable")
    if block is None:
        return {}, ""
    if not isinstance(block, Mapping):
        raise InvalidBundleError(f"{MANIFEST_FILE}: trainable must be an object or absent")
    path, shapes = block.get("file"), block.get("shapes")
    if not isinstance(path, str) or path not in files:
        raise InvalidBundleError(f"{MANIFEST_FILE}: trainable.file {path!r} must name a file listed in 'files'")
    if not isinstance(shapes, Mapping) or not shapes:
        raise InvalidBundleError(f"{MANIFEST_FILE}: trainable.shapes must be a non-empty object of name -> shape")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if not isinstance(name, str) or not 0 < len(name.encode("utf-8")) < 256:
            raise InvalidBundleError(f"{MANIFEST_FILE}: trainable name {name!r} must be 1..255 bytes of UTF-8")
        if name in adaptable:
            raise InvalidBundleError(f"{MANIFEST_FILE}: trainable.shapes[{name!r}] repeats an adaptable name")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                  for d in shape):
            raise InvalidBundleError(f"{MANIFEST_FILE}: trainable.shapes[{name!r}] = {shape!r} must be a list of "
                                     f"positive ints")
        out[name] = tuple(shape)
    return out, path


def parse_manifest(raw: bytes) -> tuple[dict[str, Any], BundleSpec]:
    """Parse manifest.json bytes; return the JSON object and its :class:`BundleSpec`.

    Raises :class:`InvalidBundleError` naming the missing or malformed field.
    """
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidBundleError(f"{MANIFEST_FILE} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise InvalidBundleError(f"{MANIFEST_FILE} must hold a JSON object, got {type(manifest).__name__}")
    return manifest, bundle_spec(manifest)


def bundle_spec(manifest: Mapping[str, Any]) -> BundleSpec:
    """Validate an already-parsed manifest and extract its :class:`BundleSpec`."""
    version = _get(manifest, "schema_version")
    if version not in SCHEMA_VERSIONS or isinstance(version, bool):
        raise InvalidBundleError(f"{MANIFEST_FILE}: schema_version {version!r} is not supported "
                                 f"(this server reads {', '.join(map(str, SCHEMA_VERSIONS))})")
    files = _files(manifest)
    if manifest.get("adaptable") is None:
        return _spec_without_parameters(manifest, files, version)
    feature_dim = _recorded_feature_dim(manifest, version)
    if version == 1:
        initial = _initial(manifest)
        shapes, initial_file = {k: tuple(v.shape) for k, v in initial.items()}, ""
    else:
        initial = {}
        shapes, initial_file = _initial_v2(manifest, files)
    trainable_shapes, trainable_file = _trainable(manifest, files, shapes)
    return BundleSpec(
        files=files, input_shape=_input_shape(manifest), feature_dim=feature_dim,
        initial=initial, trainable_shapes=trainable_shapes, trainable_file=trainable_file,
        initial_shapes=shapes, initial_file=initial_file, nonnegative=_nonnegative(manifest, shapes),
    )


def _nonnegative(manifest: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """Model name → the adaptable parameters its graph needs >= 0 (``models[i].nonnegative_params``)."""
    out: dict[str, tuple[str, ...]] = {}
    for i, model in enumerate(_get(manifest, "models")):
        names = model.get("nonnegative_params", []) if isinstance(model, Mapping) else []
        if not (isinstance(names, list) and all(isinstance(n, str) and n in shapes for n in names)):
            raise InvalidBundleError(f"{MANIFEST_FILE}: models[{i}].nonnegative_params must list adaptable "
                                     f"parameter names, got {names!r}")
        if names:
            out[str(model.get("name"))] = tuple(names)
    return out


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


def _spec_without_parameters(manifest: Mapping[str, Any], files: Mapping[str, str], version: int) -> BundleSpec:
    """The spec of a bundle without an ``adaptable`` block (a wrapped foreign model): served as published, no
    federated parameters. Its models must not be adaptable graphs, and a ``trainable`` block (parameters
    federated on top of the adaptable ones) is refused."""
    if manifest.get("trainable") is not None:
        raise InvalidBundleError(f"{MANIFEST_FILE}: a 'trainable' block needs an 'adaptable' block (the federated "
                                 "parameters start from the adaptable ones); this manifest has none")
    models = _get(manifest, "models")
    if not isinstance(models, list) or not models or not all(isinstance(m, Mapping) for m in models):
        raise InvalidBundleError(f"{MANIFEST_FILE}: models must be a non-empty list of objects")
    for i, model in enumerate(models):
        if model.get("graph") == "adaptable":
            raise InvalidBundleError(f"{MANIFEST_FILE}: models[{i}] ({model.get('name')!r}) is an adaptable graph, "
                                     "but the manifest has no 'adaptable' block")
    return BundleSpec(files=dict(files), input_shape=_input_shape(manifest),
                      feature_dim=_feature_dim(manifest, version), initial={}, adaptable=False)
