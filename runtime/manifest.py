"""The bundle manifest (schema versions 1 and 2): parsing and validation into typed, frozen objects.

Version 2 (what the exporter writes) keeps numeric blocks out of the JSON: the adaptable graph's initial
parameters, the source feature statistics and the class-conditional Gaussians live in compressed binary block
files (:mod:`runtime.blocks`) that the manifest references and lists with their sha256, and a device fetches
each only when it needs it (:meth:`Manifest.files_for`). Layers name their tensors by convention
(``<layer>.weight`` …) unless they say otherwise, and what only documents the export (parity, quantization and
compression reports) sits in a report file no device fetches. Version 1 bundles (every block inline) still read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.checks import is_finite_number
from runtime.errors import ManifestError

SCHEMA_VERSION = 2  # what the exporter writes
SCHEMA_VERSIONS = (1, 2)  # what this runtime reads
MANIFEST_NAME = "manifest.json"
GRAPH_KINDS = ("adaptable", "folded")
OUTPUT_KINDS = ("logits", "probabilities")
INPUT_DTYPES = ("float32", "uint8", "int8")
# transformations of the input a model's predictions are declared invariant to (``input.invariances``), e.g.
# because it was trained with them as augmentation; test-time methods may use them (FOA's mirrored view)
INVARIANCES = {"hflip": "mirroring an image along its width leaves its class unchanged"}


@dataclass(frozen=True)
class InputSpec:
    """The model input: name, shape with -1 for the batch, dtype, value range, layout, and the declared
    ``invariances`` (names from :data:`INVARIANCES`; none unless the exporter was told)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    value_range: tuple[float, float]
    layout: str = "NCHW"
    invariances: tuple[str, ...] = ()


@dataclass(frozen=True)
class NormLayerSpec:
    """One adaptable normalisation layer and the graph tensor names of its parameters and statistics."""

    name: str
    channels: int
    weight: str
    bias: str
    mean: str
    var: str
    batch_mean: str
    batch_var: str


@dataclass(frozen=True)
class ModelEntry:
    """One model file of the bundle."""

    name: str
    file: str
    format: str
    precision: str
    graph: str
    io_names: dict[str, dict[str, str]] | None = None
    packed: dict[str, Any] | None = None
    session_options: dict[str, Any] | None = None
    nonnegative_params: tuple[str, ...] = ()  # adaptable inputs this graph is exact for only when >= 0

    @property
    def disabled_optimizers(self) -> tuple[str, ...]:
        """onnxruntime graph optimizers the exporter measured as harmful for this model (``session_options``)."""
        return tuple((self.session_options or {}).get("disabled_optimizers", ()))

    @property
    def backend(self) -> str:
        """The runtime backend that runs this model's format."""
        return {"onnx": "onnx", "tflite": "tflite"}.get(self.format, self.format)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` keeps the parsed JSON for fields the runtime does not interpret; ``root`` is
    the bundle directory it was read from (None for a manifest parsed from JSON alone), where the block files of
    a version-2 manifest are read from (lazily, checked against their sha256)."""

    name: str
    input: InputSpec
    labels: tuple[str, ...]
    logits_output: str
    features_output: str | None
    output_kind: str
    alpha_input: str
    layers: tuple[NormLayerSpec, ...]
    models: tuple[ModelEntry, ...]
    default_model: str
    files: dict[str, str]
    golden_file: str
    golden_files: dict[str, str]
    golden_alpha: float
    golden_tolerance: dict[str, tuple[float, float]]
    raw: dict[str, Any]
    golden_output_tolerance: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    trainable: TrainableSpec | None = None
    schema_version: int = SCHEMA_VERSION
    initial_inline: dict[str, np.ndarray] | None = None
    initial_file: str | None = None
    features_file: str | None = None
    class_statistics_file: str | None = None
    root: Path | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def block(self, file: str, what: str) -> dict[str, np.ndarray]:
        """The arrays of the block file ``file`` of the bundle at :attr:`root` (checked against its sha256,
        decoded once); :class:`ManifestError` naming ``what`` when it is absent, altered or unreadable."""
        if file in self._cache:
            return self._cache[file]
        from runtime.blocks import BlockError, decode_block

        if file not in self.files:
            raise ManifestError(f"{what} file {file!r} has no sha256 in manifest.files")
        if self.root is None:
            raise ManifestError(f"{what} lives in {file!r}, but this manifest was parsed without its bundle directory")
        path = Path(self.root) / file
        if not path.is_file():
            raise ManifestError(f"{what} file {file!r} is not in {self.root}: a device fetches it only when it needs "
                                f"it (Manifest.files_for)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files[file]:
            raise ManifestError(f"{what} file {file!r} fails its sha256 check")
        try:
            arrays = decode_block(data, file)
        except BlockError as exc:
            raise ManifestError(f"{what} file {file!r} is unreadable: {exc}") from exc
        self._cache[file] = arrays
        return arrays

    @property
    def initial_params(self) -> dict[str, np.ndarray]:
        """The adaptable graph's initial parameters (name → float32 (channels,)): inline in a version-1 manifest,
        from the ``adaptable.initial`` block file in version 2 (present with an adaptable model); {} without an
        adaptable block."""
        if self.initial_file is None:
            return self.initial_inline or {}
        key = "initial_params"
        if key not in self._cache:
            arrays = self.block(self.initial_file, "adaptable.initial")
            self._cache[key] = _checked_initial(arrays, self.layers, self.initial_file)
        return self._cache[key]

    def trainable_params(self, root: Path) -> dict[str, np.ndarray]:
        """The full float weights of the bundle at ``root`` (its ``trainable`` block's file), checked against
        the block's names and shapes; :class:`ManifestError` when the bundle has none or they do not match."""
        if self.trainable is None:
            raise ManifestError("bundle has no trainable block (export it with trainable weights)")
        path = Path(root) / self.trainable.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"trainable file {self.trainable.file!r} is unreadable: {exc}") from exc
        return decode_trainable(data, self.trainable.shapes, self.trainable.file)

    def model(self, name: str | None, backend: str = "auto") -> ModelEntry:
        """The model entry called ``name``; without a name the default model, or — when ``backend`` names a
        format the default model is not in — the first model of that backend (adaptable preferred)."""
        if name is None and backend not in ("auto", self.model(self.default_model).backend):
            ranked = sorted((m for m in self.models if m.backend == backend), key=lambda m: m.graph != "adaptable")
            if not ranked:
                raise ManifestError(f"bundle has no {backend} model; available: {[m.name for m in self.models]}")
            return ranked[0]
        wanted = name or self.default_model
        for entry in self.models:
            if entry.name == wanted:
                return entry
        raise ManifestError(f"model {wanted!r} not in bundle; available: {[m.name for m in self.models]}")

    def files_for(self, model: str, class_statistics: bool = False) -> list[str]:
        """The files a device needs to run ``model``: its shipped file, its golden vectors, the source feature
        statistics (version 2: their block file), the adaptable parameters' block file when ``model`` is an
        adaptable graph, and the trainable weights when the bundle has them (updates carry them, so a device
        holds them to apply and verify delta updates even when it only adapts normalisation).

        The class-conditional Gaussians (means and shared covariance: kilobytes, used only by the Mahalanobis
        drift detector and T3A's source prototypes) come with ``class_statistics`` — or always in a version-1
        bundle, where the file also held nothing else a device could do without."""
        entry = self.model(model)
        files = [entry.packed["file"] if entry.packed else entry.file, self.golden_file_of(entry.name)]
        if self.features_file is not None:
            files.append(self.features_file)
        if entry.graph == "adaptable" and self.initial_file is not None:
            files.append(self.initial_file)
        if self.class_statistics_file is not None and (class_statistics or self.schema_version == 1):
            files.append(self.class_statistics_file)
        files += [self.trainable.file] if self.trainable is not None else []
        return list(dict.fromkeys(files))

    def tolerance_of(self, model: str, output: str) -> tuple[float, float]:
        """``(atol, rtol)`` of ``output`` of ``model``'s golden check: the output's own bound
        (``golden.models[model].outputs[output]``) or the model's."""
        return self.golden_output_tolerance.get(model, {}).get(output, self.golden_tolerance[model])

    def golden_file_of(self, model: str) -> str:
        """The golden-vector file of ``model``: its own (``golden.models[model].file``) or the shared one."""
        return self.golden_files.get(model, self.golden_file)

    @property
    def is_adaptable(self) -> bool:
        """Whether the bundle has an adaptable block (a foreign model wrapped as is has none)."""
        return bool(self.layers)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every adaptable parameter input (from the layer specs: no block file needed)."""
        return {name: (layer.channels,) for layer in self.layers
                for name in (layer.weight, layer.bias, layer.mean, layer.var)}

    @property
    def variance_params(self) -> tuple[str, ...]:
        """The adaptable layers' variance parameters (``<layer>.var``, the running variance the graph normalises
        with): never negative (:data:`runtime.params.VARIANCE_REASON`); empty for a bundle that is not
        adaptable."""
        return tuple(layer.var for layer in self.layers)

    def class_gaussians(self, root: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Class-conditional feature means (K, D), shared covariance (D, D) and class counts (K,), from the
        statistics file of the bundle at ``root`` (default :attr:`root`); None when the bundle records none.
        A version-2 device has the file only when it fetched it (``files_for(model, class_statistics=True)``)."""
        ref = self.raw.get("source_statistics", {}).get("class_conditional")
        if not ref:
            return None
        file = ref.get("file")
        if file not in self.files:
            raise ManifestError(f"class-conditional statistics {file!r} has no sha256 in manifest.files")
        base = Path(root) if root is not None else self.root
        if self.schema_version == 1:
            if base is None:
                raise ManifestError("class_gaussians needs the bundle directory")
            with np.load(base / file, allow_pickle=False) as data:
                means, counts = data["means"].astype(np.float32), data["counts"]
                upper = data["shared_covariance_upper"].astype(np.float32)
        else:
            manifest = self if base is None or base == self.root else _rooted(self, base)
            arrays = manifest.block(file, "source_statistics.class_conditional")
            try:
                means, counts, upper = arrays["means"], arrays["counts"], arrays["shared_covariance_upper"]
            except KeyError as exc:
                raise ManifestError(f"{file}: missing array {exc}") from exc
            if means.dtype != np.float32 or upper.dtype != np.float32 or means.ndim != 2:
                raise ManifestError(f"{file}: means and covariance must be float32, means (K, D)")
        dim = means.shape[1]
        if upper.shape != (dim * (dim + 1) // 2,):
            raise ManifestError(f"{file}: covariance has {upper.size} values, expected {dim * (dim + 1) // 2}")
        cov = np.zeros((dim, dim), np.float32)
        cov[np.triu_indices(dim)] = upper
        return means, cov + np.triu(cov, 1).T, counts

    def source_feature_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Source penultimate-feature mean and variance, when recorded (version 2: from their block file)."""
        feats = self.raw.get("source_statistics", {}).get("features")
        if not feats:
            return None
        if self.features_file is None:
            return np.asarray(feats["mean"], np.float32), np.asarray(feats["var"], np.float32)
        arrays = self.block(self.features_file, "source_statistics.features")
        mean, var = arrays.get("mean"), arrays.get("var")
        dim = feats.get("dim")
        if mean is None or var is None or mean.shape != (dim,) or var.shape != (dim,) or mean.dtype != np.float32:
            raise ManifestError(f"{self.features_file}: expected float32 'mean' and 'var' of shape ({dim},)")
        return mean, var

    @property
    def feature_dim(self) -> int | None:
        """Width of the penultimate features the source statistics describe, when recorded."""
        feats = self.raw.get("source_statistics", {}).get("features")
        if not feats:
            return None
        return int(feats["dim"]) if "dim" in feats else len(feats["mean"])

    def source_layer_stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Source running mean and variance of each adaptable layer: ``source_statistics.layers`` of a version-1
        manifest, else the initial parameters' ``mean``/``var`` (the same numbers: version 2 stores them once)."""
        recorded = self.raw.get("source_statistics", {}).get("layers") or {}
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        initial = self.initial_params if self.layers and not recorded else {}
        for layer in self.layers:
            if layer.name in recorded:
                entry = recorded[layer.name]
                out[layer.name] = (np.asarray(entry["mean"], np.float32), np.asarray(entry["var"], np.float32))
            elif initial:
                out[layer.name] = (initial[layer.mean], initial[layer.var])
        return out


def _rooted(manifest: Manifest, root: Path) -> Manifest:
    """The same manifest reading its block files from ``root``."""
    from dataclasses import replace

    return replace(manifest, root=Path(root), _cache={})


def _checked_initial(arrays: dict[str, np.ndarray], layers: tuple[NormLayerSpec, ...], file: str
                     ) -> dict[str, np.ndarray]:
    """The initial parameters of ``layers`` from a block, each finite float32 (channels,); nothing else."""
    from runtime.blocks import BlockError, checked_float32

    expected = {name: (layer.channels,) for layer in layers
                for name in (layer.weight, layer.bias, layer.mean, layer.var)}
    try:
        return checked_float32(arrays, expected, f"adaptable.initial ({file})")
    except BlockError as exc:
        raise ManifestError(str(exc)) from exc


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ManifestError(f"manifest field {where}.{key} is missing")
    value = obj[key]
    if not isinstance(value, kind):
        raise ManifestError(f"manifest field {where}.{key} has type {type(value).__name__}, expected {kind}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, where: str) -> float:
    """``value`` as a finite float (a JSON number, not a bool); :class:`ManifestError` naming ``where`` else."""
    if not is_finite_number(value):
        raise ManifestError(f"manifest field {where} must be a finite number, got {value!r}")
    return float(value)


def _input_spec(raw: dict[str, Any]) -> InputSpec:
    spec = _get(raw, "input", dict, "manifest")
    dims = _get(spec, "shape", list, "input")
    if len(dims) < 2 or dims[0] != -1 or not all(_is_int(d) and d > 0 for d in dims[1:]):
        raise ManifestError(f"manifest field input.shape {dims!r} must be [-1, positive integer dims…]")
    shape = tuple(int(d) for d in dims)
    value_range = spec.get("value_range", [0.0, 1.0])
    if not isinstance(value_range, list) or len(value_range) != 2:
        raise ManifestError(f"manifest field input.value_range must be [low, high], got {value_range!r}")
    lo, hi = (_number(v, "input.value_range") for v in value_range)
    if not lo < hi:
        raise ManifestError(f"manifest field input.value_range {value_range!r} must be increasing")
    dtype = _get(spec, "dtype", str, "input")
    if dtype not in INPUT_DTYPES:
        raise ManifestError(f"manifest field input.dtype is {dtype!r}; expected one of {INPUT_DTYPES}")
    layout = str(spec.get("layout", "NCHW"))
    if layout not in ("NCHW", "NHWC"):
        raise ManifestError(f"manifest field input.layout is {layout!r}; expected NCHW or NHWC")
    invariances = spec.get("invariances", [])
    if not isinstance(invariances, list):
        raise ManifestError(f"manifest field input.invariances must be a list, got {invariances!r}")
    try:
        declared = checked_invariances(invariances)
    except ValueError as exc:
        raise ManifestError(f"manifest field input.invariances: {exc}") from exc
    return InputSpec(_get(spec, "name", str, "input"), shape, dtype, (lo, hi), layout, declared)


def checked_invariances(values: Iterable[Any]) -> tuple[str, ...]:
    """``values`` as declared input invariances: known names (:data:`INVARIANCES`), each once, in the given
    order; anything else is a ``ValueError`` naming it."""
    if isinstance(values, str):
        raise ValueError(f"invariances must be a list of names, got the string {values!r}")
    out: list[str] = []
    for value in values:
        if not isinstance(value, str) or value not in INVARIANCES:
            raise ValueError(f"unknown invariance {value!r}; known: {sorted(INVARIANCES)}")
        if value in out:
            raise ValueError(f"invariance {value!r} is declared twice")
        out.append(value)
    return tuple(out)


TENSOR_KEYS = ("weight", "bias", "mean", "var", "batch_mean", "batch_var")


def _layers(adaptable: dict[str, Any], version: int) -> tuple[NormLayerSpec, ...]:
    """The adaptable layers; in version 2 a tensor name left out is ``<layer name>.<key>``."""
    layers = []
    for i, layer in enumerate(_get(adaptable, "layers", list, "adaptable")):
        where = f"adaptable.layers[{i}]"
        name = _get(layer, "name", str, where)
        if version >= 2:
            names = {k: layer.get(k, f"{name}.{k}") for k in TENSOR_KEYS}
            if not all(isinstance(v, str) and v for v in names.values()):
                raise ManifestError(f"manifest field {where} names its tensors with non-strings: {names}")
        else:
            names = {k: _get(layer, k, str, where) for k in TENSOR_KEYS}
        channels = _get(layer, "channels", int, where)
        if channels <= 0:
            raise ManifestError(f"manifest field {where}.channels must be positive, got {channels}")
        layers.append(NormLayerSpec(name=name, channels=int(channels), **names))
    if not layers:
        raise ManifestError("manifest field adaptable.layers must be a non-empty list (a bundle without adaptable "
                            "layers has no adaptable block: null or absent)")
    _refuse_repeats([layer.name for layer in layers], "adaptable.layers names a layer")
    _refuse_repeats([getattr(layer, k) for layer in layers for k in TENSOR_KEYS], "adaptable.layers names a tensor")
    return tuple(layers)


def _refuse_repeats(names: list[str], what: str) -> None:
    """:class:`ManifestError` naming the first name that occurs twice in ``names`` (``what``: who names it)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ManifestError(f"manifest field {what} {name!r} twice")
        seen.add(name)


def _initial_file(adaptable: dict[str, Any], files: dict[str, str]) -> str:
    """Version 2: the block file named by ``adaptable.initial.file``, listed in ``files``."""
    ref = _get(adaptable, "initial", dict, "adaptable")
    file = _get(ref, "file", str, "adaptable.initial")
    if file not in files:
        raise ManifestError(f"adaptable.initial file {file!r} has no sha256 in manifest.files")
    return file


def _initial(adaptable: dict[str, Any], layers: tuple[NormLayerSpec, ...]) -> dict[str, np.ndarray]:
    """Version 1: the initial parameters inline as JSON numbers."""
    initial = _get(adaptable, "initial", dict, "adaptable")
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        for name in (layer.weight, layer.bias, layer.mean, layer.var):
            values = np.asarray(_get(initial, name, list, "adaptable.initial"), dtype=np.float32)
            if values.shape != (layer.channels,) or not np.all(np.isfinite(values)):
                raise ManifestError(f"adaptable.initial.{name} must be {layer.channels} finite numbers")
            out[name] = values
    return out


SESSION_OPTIONS = frozenset({"disabled_optimizers"})


def _session_options(opts: Any, where: str) -> dict[str, Any] | None:
    """A model entry's ``session_options``: only known keys; ``disabled_optimizers`` a list of names."""
    if opts is None:
        return None
    if not isinstance(opts, dict) or set(opts) - SESSION_OPTIONS:
        raise ManifestError(f"manifest field {where}.session_options must be an object with keys among "
                            f"{sorted(SESSION_OPTIONS)}, got {opts!r}")
    names = opts.get("disabled_optimizers", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ManifestError(f"manifest field {where}.session_options.disabled_optimizers must be a list of names")
    return {"disabled_optimizers": list(names)}


def _io_names(io_names: Any, where: str) -> dict[str, dict[str, str]] | None:
    """A model entry's ``io_names``: None, or ``{"inputs": {logical: name}, "outputs": {...}}`` of strings."""
    if io_names is None:
        return None
    if not isinstance(io_names, dict) or set(io_names) - {"inputs", "outputs"} or not all(
            isinstance(side, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in side.items())
            for side in io_names.values()):
        raise ManifestError(f"manifest field {where}.io_names must be an object with 'inputs' and 'outputs' "
                            f"mapping logical names to tensor names, got {io_names!r}")
    return io_names


def _models(raw: dict[str, Any]) -> tuple[ModelEntry, ...]:
    entries = []
    for i, m in enumerate(_get(raw, "models", list, "manifest")):
        where = f"models[{i}]"
        if not isinstance(m, dict):
            raise ManifestError(f"manifest field {where} must be an object, got {type(m).__name__}")
        keys = ("name", "file", "format", "precision", "graph")
        io_names, packed = _io_names(m.get("io_names"), where), m.get("packed")
        if packed is not None and not (isinstance(packed, dict) and isinstance(packed.get("file"), str)):
            raise ManifestError(f"manifest field {where}.packed must be an object with a 'file'")
        nonnegative = m.get("nonnegative_params", [])
        if not (isinstance(nonnegative, list) and all(isinstance(n, str) for n in nonnegative)):
            raise ManifestError(f"manifest field {where}.nonnegative_params must be a list of parameter names")
        entries.append(ModelEntry(**{k: _get(m, k, str, where) for k in keys}, io_names=io_names, packed=packed,
                                  session_options=_session_options(m.get("session_options"), where),
                                  nonnegative_params=tuple(nonnegative)))
    if not entries:
        raise ManifestError("manifest lists no models")
    _refuse_repeats([entry.name for entry in entries], "models names a model")
    return tuple(entries)


def _output_tolerances(model: str, tolerance: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """``golden.models[model].outputs``: per-output ``{atol, rtol}`` overriding the model's (optional)."""
    outputs = tolerance.get("outputs", {})
    if not isinstance(outputs, dict) or not all(isinstance(t, dict) for t in outputs.values()):
        raise ManifestError(f"manifest field golden.models.{model}.outputs must map output names to {{atol, rtol}}")
    return {out: _tolerance(t, f"golden.models.{model}.outputs.{out}") for out, t in outputs.items()}


def _tolerance(tolerance: Any, where: str) -> tuple[float, float]:
    """``(atol, rtol)`` of a golden tolerance object: finite numbers >= 0 (absent: 0)."""
    if not isinstance(tolerance, dict):
        raise ManifestError(f"manifest field {where} must be an object with atol and rtol, got {tolerance!r}")
    out = tuple(_number(tolerance.get(key, 0.0), f"{where}.{key}") for key in ("atol", "rtol"))
    if min(out) < 0:
        raise ManifestError(f"manifest field {where}: atol and rtol must be >= 0, got {out}")
    return out[0], out[1]


@dataclass(frozen=True)
class TrainableSpec:
    """A bundle's optional ``trainable`` block: the file (runtime/arrays.py encoding) holding the model's full
    float weights for devices that train locally, the architecture that names them, and name → shape."""

    file: str
    architecture: str
    shapes: dict[str, tuple[int, ...]]


def decode_trainable(data: bytes, shapes: Mapping[str, tuple[int, ...]], file: str) -> dict[str, np.ndarray]:
    """The trainable weights in ``data`` (a :mod:`runtime.arrays` blob, the bytes of the ``trainable`` block's
    ``file``): exactly the names of ``shapes``, each finite float32 of its shape; :class:`ManifestError`
    otherwise (the device when it loads a bundle, the server when one is published)."""
    from runtime.arrays import ArrayCodecError, decode_arrays
    from runtime.blocks import BlockError, checked_float32

    try:
        return checked_float32(decode_arrays(data), shapes, f"trainable file {file!r}")
    except ArrayCodecError as exc:
        raise ManifestError(f"trainable file {file!r} is unreadable: {exc}") from exc
    except BlockError as exc:
        raise ManifestError(str(exc)) from exc


def _trainable(raw: dict[str, Any], files: dict[str, str], adaptable: dict[str, Any]) -> TrainableSpec | None:
    block = raw.get("trainable")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ManifestError("manifest field manifest.trainable must be an object or absent")
    path = _get(block, "file", str, "trainable")
    if path not in files:
        raise ManifestError(f"trainable file {path!r} has no sha256 in manifest.files")
    shapes = _get(block, "shapes", dict, "trainable")
    if not shapes:
        raise ManifestError("manifest field trainable.shapes must name at least one tensor")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if not 0 < len(str(name).encode("utf-8")) < 256:  # what a parameter update can carry (runtime.update_codec)
            raise ManifestError(f"trainable name {name!r} must be 1..255 bytes of UTF-8")
        if name in adaptable:
            raise ManifestError(f"trainable.shapes.{name} repeats an adaptable parameter name")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                  for d in shape):
            raise ManifestError(f"trainable.shapes.{name} must be a list of positive ints, got {shape!r}")
        out[str(name)] = tuple(shape)
    architecture = block.get("architecture", "")
    if not isinstance(architecture, str):
        raise ManifestError("manifest field trainable.architecture must be a string")
    return TrainableSpec(path, architecture, out)


def _statistics_files(raw: dict[str, Any], files: dict[str, str], version: int) -> tuple[str | None, str | None]:
    """The block files of ``source_statistics``: feature mean/var (version 2) and the class-conditional
    Gaussians (both versions), each listed in ``files``."""
    stats = raw.get("source_statistics")
    if stats is None:
        return None, None
    if not isinstance(stats, dict):
        raise ManifestError("manifest field manifest.source_statistics must be an object or absent")
    features_file = None
    features = stats.get("features")
    if features is not None:
        if not isinstance(features, dict):
            raise ManifestError("manifest field source_statistics.features must be an object")
        if version >= 2:
            features_file = _get(features, "file", str, "source_statistics.features")
            dim = _get(features, "dim", int, "source_statistics.features")
            if features_file not in files or dim <= 0:
                raise ManifestError(f"source_statistics.features: file {features_file!r} must be listed in "
                                    f"manifest.files and dim ({dim}) positive")
        elif not isinstance(features.get("mean"), list) or not isinstance(features.get("var"), list):
            raise ManifestError("manifest field source_statistics.features must hold 'mean' and 'var' lists")
    gauss = stats.get("class_conditional")
    class_file = None
    if gauss:
        class_file = _get(gauss, "file", str, "source_statistics.class_conditional")
        if class_file not in files:
            raise ManifestError(f"class-conditional statistics {class_file!r} has no sha256 in manifest.files")
    return features_file, class_file


def parse_manifest(raw: dict[str, Any], root: Path | None = None) -> Manifest:
    """Validate parsed manifest JSON and build a :class:`Manifest`; raise :class:`ManifestError` naming the field.
    ``root``: the bundle directory, where the block files of a version-2 manifest are read from."""
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in SCHEMA_VERSIONS or isinstance(version, bool):
        raise ManifestError(f"manifest schema_version is {version!r}; this runtime reads versions "
                            f"{', '.join(map(str, SCHEMA_VERSIONS))} (a newer bundle needs a newer runtime)")
    adaptable = raw.get("adaptable")
    if adaptable is not None and not isinstance(adaptable, dict):
        raise ManifestError("manifest field manifest.adaptable must be an object or absent")
    outputs = _get(raw, "outputs", dict, "manifest")
    golden = _get(raw, "golden", dict, "manifest")
    layers = _layers(adaptable, version) if adaptable is not None else ()
    features = outputs.get("features")
    if features is not None and not isinstance(features, str):
        raise ManifestError("manifest field outputs.features must be a string or null")
    kind = outputs.get("kind", "logits")
    if kind not in OUTPUT_KINDS:
        raise ManifestError(f"manifest field outputs.kind is {kind!r}; expected one of {OUTPUT_KINDS}")
    tolerance = {name: _tolerance(t, f"golden.models.{name}") for name, t in _get(golden, "models", dict,
                                                                               "golden").items()}
    per_output = {name: _output_tolerances(name, t) for name, t in golden["models"].items()}
    models = _models(raw)
    files = {str(k): str(v) for k, v in _get(raw, "files", dict, "manifest").items()}
    v1 = version == 1
    initial_inline = _initial(adaptable, layers) if adaptable is not None and v1 else None
    initial_file = _initial_file(adaptable, files) if adaptable is not None and not v1 else None
    features_file, class_file = _statistics_files(raw, files, version)
    param_names = {n: None for layer in layers for n in (layer.weight, layer.bias, layer.mean, layer.var)}
    for entry in models:
        unknown = sorted(set(entry.nonnegative_params) - {layer.weight for layer in layers})
        if unknown:
            raise ManifestError(f"manifest field models[{entry.name}].nonnegative_params names {unknown}, which "
                                "are not normalisation scales of the adaptable layers")
    manifest = Manifest(
        name=str(raw.get("name", "")),
        input=_input_spec(raw),
        labels=tuple(str(x) for x in _get(raw, "labels", list, "manifest")),
        logits_output=_get(outputs, "logits", str, "outputs"),
        features_output=features,
        output_kind=kind,
        alpha_input=_get(adaptable, "alpha_input", str, "adaptable") if adaptable is not None else "",
        layers=layers,
        models=models,
        default_model=str(raw.get("default_model", models[0].name)),
        files=files,
        golden_file=str(golden.get("file", "")),
        golden_files={n: str(t["file"]) for n, t in golden["models"].items() if isinstance(t.get("file"), str)},
        golden_alpha=_number(golden.get("alpha", 0.0), "golden.alpha"),
        golden_tolerance=tolerance,
        raw=raw,
        golden_output_tolerance={k: v for k, v in per_output.items() if v},
        trainable=_trainable(raw, files, param_names),
        schema_version=version,
        initial_inline=initial_inline,
        initial_file=initial_file,
        features_file=features_file,
        class_statistics_file=class_file,
        root=Path(root) if root is not None else None,
    )
    manifest.model(None)
    for entry in models:
        shipped = entry.packed["file"] if entry.packed else entry.file
        if shipped not in files:
            raise ManifestError(f"model file {shipped!r} has no sha256 in manifest.files")
        if entry.graph not in GRAPH_KINDS:
            raise ManifestError(f"model {entry.name!r} has graph {entry.graph!r}; expected one of {GRAPH_KINDS}")
        if entry.graph == "adaptable" and not layers:
            raise ManifestError(f"model {entry.name!r} is adaptable but the manifest has no adaptable block")
    for entry in models:
        golden_file = manifest.golden_file_of(entry.name)
        if golden_file not in files:
            raise ManifestError(f"golden file {golden_file!r} of model {entry.name!r} has no sha256 in manifest.files")
    return manifest


def read_manifest_bytes(bundle_dir: Path) -> bytes:
    """The raw bytes of ``bundle_dir/manifest.json`` (what its signature covers), unparsed."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"bundle has no {MANIFEST_NAME}: {path}")
    return path.read_bytes()


def decode_manifest(data: bytes, bundle_dir: Path) -> Manifest:
    """Parse and validate manifest bytes read from ``bundle_dir`` (:func:`read_manifest_bytes`)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ManifestError(f"{Path(bundle_dir) / MANIFEST_NAME} is not valid JSON: {exc}") from exc
    return parse_manifest(raw, root=Path(bundle_dir))


def read_manifest(bundle_dir: Path) -> tuple[Manifest, bytes]:
    """Read and validate ``bundle_dir/manifest.json``; return it and its raw bytes."""
    data = read_manifest_bytes(bundle_dir)
    return decode_manifest(data, bundle_dir), data
