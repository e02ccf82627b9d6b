"""The bundle manifest (schema version 1): parsing and validation into typed, frozen objects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
GRAPH_KINDS = ("adaptable", "folded")
OUTPUT_KINDS = ("logits", "probabilities")
INPUT_DTYPES = ("float32", "uint8", "int8")


@dataclass(frozen=True)
class InputSpec:
    """The model input: name, shape with -1 for the batch, dtype and value range."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    value_range: tuple[float, float]
    layout: str = "NCHW"


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
    """A validated manifest. ``raw`` keeps the parsed JSON for fields the runtime does not interpret."""

    name: str
    input: InputSpec
    labels: tuple[str, ...]
    logits_output: str
    features_output: str | None
    output_kind: str
    alpha_input: str
    layers: tuple[NormLayerSpec, ...]
    initial_params: dict[str, np.ndarray]
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

    def trainable_params(self, root: Path) -> dict[str, np.ndarray]:
        """The full float weights of the bundle at ``root`` (its ``trainable`` block's file), checked against
        the block's names and shapes; :class:`ManifestError` when the bundle has none or they do not match."""
        if self.trainable is None:
            raise ManifestError("bundle has no trainable block (export it with trainable weights)")
        from runtime.arrays import ArrayCodecError, decode_arrays

        path = Path(root) / self.trainable.file
        try:
            arrays = decode_arrays(path.read_bytes())
        except (OSError, ArrayCodecError) as exc:
            raise ManifestError(f"trainable file {self.trainable.file!r} is unreadable: {exc}") from exc
        shapes = self.trainable.shapes
        if set(arrays) != set(shapes):
            raise ManifestError(f"trainable file {self.trainable.file!r} holds {len(arrays)} tensors, the manifest "
                                f"names {len(shapes)}: differing {sorted(set(arrays) ^ set(shapes))[:8]}")
        for name, arr in arrays.items():
            if arr.dtype != np.float32 or tuple(arr.shape) != shapes[name] or not np.all(np.isfinite(arr)):
                raise ManifestError(f"trainable {name!r} is {arr.dtype} {tuple(arr.shape)}, expected finite float32 "
                                    f"{shapes[name]}")
        return arrays

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

    def files_for(self, model: str) -> list[str]:
        """The files a device needs to run ``model``: its shipped file, its golden vectors, the statistics, and
        the trainable weights when the bundle has them (updates carry them, so a device holds them to apply
        and verify delta updates even when it only adapts normalisation)."""
        entry = self.model(model)
        files = [entry.packed["file"] if entry.packed else entry.file, self.golden_file_of(entry.name)]
        stats = self.raw.get("source_statistics", {}).get("class_conditional") or {}
        files += [stats["file"]] if isinstance(stats.get("file"), str) else []
        return files + ([self.trainable.file] if self.trainable is not None else [])

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
        """Shape of every adaptable parameter input."""
        return {k: tuple(v.shape) for k, v in self.initial_params.items()}

    def class_gaussians(self, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Class-conditional feature means (K, D), shared covariance (D, D) and class counts (K,), from the
        statistics file of the bundle at ``root``; None when the bundle records none."""
        ref = self.raw.get("source_statistics", {}).get("class_conditional")
        if not ref:
            return None
        if ref.get("file") not in self.files:
            raise ManifestError(f"class-conditional statistics {ref.get('file')!r} has no sha256 in manifest.files")
        with np.load(Path(root) / ref["file"], allow_pickle=False) as data:
            means, counts = data["means"].astype(np.float32), data["counts"]
            upper = data["shared_covariance_upper"].astype(np.float32)
        dim = means.shape[1]
        if upper.shape != (dim * (dim + 1) // 2,):
            raise ManifestError(f"{ref['file']}: covariance has {upper.size} values, expected {dim * (dim + 1) // 2}")
        cov = np.zeros((dim, dim), np.float32)
        cov[np.triu_indices(dim)] = upper
        return means, cov + np.triu(cov, 1).T, counts

    def source_feature_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Source penultimate-feature mean and variance, when recorded."""
        feats = self.raw.get("source_statistics", {}).get("features")
        if not feats:
            return None
        return np.asarray(feats["mean"], np.float32), np.asarray(feats["var"], np.float32)


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ManifestError(f"manifest field {where}.{key} is missing")
    value = obj[key]
    if not isinstance(value, kind):
        raise ManifestError(f"manifest field {where}.{key} has type {type(value).__name__}, expected {kind}")
    return value


def _input_spec(raw: dict[str, Any]) -> InputSpec:
    spec = _get(raw, "input", dict, "manifest")
    shape = tuple(int(d) for d in _get(spec, "shape", list, "input"))
    if len(shape) < 2 or shape[0] != -1 or any(d <= 0 for d in shape[1:]):
        raise ManifestError(f"manifest field input.shape {list(shape)} must be [-1, positive dims…]")
    lo, hi = (float(v) for v in spec.get("value_range", [0.0, 1.0]))
    dtype = _get(spec, "dtype", str, "input")
    if dtype not in INPUT_DTYPES:
        raise ManifestError(f"manifest field input.dtype is {dtype!r}; expected one of {INPUT_DTYPES}")
    layout = str(spec.get("layout", "NCHW"))
    if layout not in ("NCHW", "NHWC"):
        raise ManifestError(f"manifest field input.layout is {layout!r}; expected NCHW or NHWC")
    return InputSpec(_get(spec, "name", str, "input"), shape, dtype, (lo, hi), layout)


def _layers(adaptable: dict[str, Any]) -> tuple[NormLayerSpec, ...]:
    layers = []
    for i, layer in enumerate(_get(adaptable, "layers", list, "adaptable")):
        where = f"adaptable.layers[{i}]"
        fields = {k: _get(layer, k, str, where) for k in ("name", "weight", "bias", "mean", "var")}
        stats = {k: _get(layer, k, str, where) for k in ("batch_mean", "batch_var")}
        layers.append(NormLayerSpec(channels=int(_get(layer, "channels", int, where)), **fields, **stats))
    return tuple(layers)


def _initial(adaptable: dict[str, Any], layers: tuple[NormLayerSpec, ...]) -> dict[str, np.ndarray]:
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


def _models(raw: dict[str, Any]) -> tuple[ModelEntry, ...]:
    entries = []
    for i, m in enumerate(_get(raw, "models", list, "manifest")):
        where = f"models[{i}]"
        keys = ("name", "file", "format", "precision", "graph")
        io_names, packed = m.get("io_names"), m.get("packed")
        if io_names is not None and not isinstance(io_names, dict):
            raise ManifestError(f"manifest field {where}.io_names must be an object")
        if packed is not None and not (isinstance(packed, dict) and isinstance(packed.get("file"), str)):
            raise ManifestError(f"manifest field {where}.packed must be an object with a 'file'")
        entries.append(ModelEntry(**{k: _get(m, k, str, where) for k in keys}, io_names=io_names, packed=packed,
                                  session_options=_session_options(m.get("session_options"), where)))
    if not entries:
        raise ManifestError("manifest lists no models")
    return tuple(entries)


def _output_tolerances(model: str, tolerance: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """``golden.models[model].outputs``: per-output ``{atol, rtol}`` overriding the model's (optional)."""
    outputs = tolerance.get("outputs", {})
    if not isinstance(outputs, dict) or not all(isinstance(t, dict) for t in outputs.values()):
        raise ManifestError(f"manifest field golden.models.{model}.outputs must map output names to {{atol, rtol}}")
    return {out: (float(t.get("atol", 0.0)), float(t.get("rtol", 0.0))) for out, t in outputs.items()}


@dataclass(frozen=True)
class TrainableSpec:
    """A bundle's optional ``trainable`` block: the file (runtime/arrays.py encoding) holding the model's full
    float weights for devices that train locally, the architecture that names them, and name → shape."""

    file: str
    architecture: str
    shapes: dict[str, tuple[int, ...]]


def _trainable(raw: dict[str, Any], files: dict[str, str], adaptable: dict[str, np.ndarray]) -> TrainableSpec | None:
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


def parse_manifest(raw: dict[str, Any]) -> Manifest:
    """Validate parsed manifest JSON and build a :class:`Manifest`; raise :class:`ManifestError` naming the field."""
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ManifestError(f"manifest schema_version is {version!r}; this runtime reads {SCHEMA_VERSION}")
    adaptable = raw.get("adaptable")
    if adaptable is not None and not isinstance(adaptable, dict):
        raise ManifestError("manifest field manifest.adaptable must be an object or absent")
    outputs = _get(raw, "outputs", dict, "manifest")
    golden = _get(raw, "golden", dict, "manifest")
    layers = _layers(adaptable) if adaptable else ()
    features = outputs.get("features")
    if features is not None and not isinstance(features, str):
        raise ManifestError("manifest field outputs.features must be a string or null")
    kind = outputs.get("kind", "logits")
    if kind not in OUTPUT_KINDS:
        raise ManifestError(f"manifest field outputs.kind is {kind!r}; expected one of {OUTPUT_KINDS}")
    tolerance = {
        name: (float(t.get("atol", 0.0)), float(t.get("rtol", 0.0)))
        for name, t in _get(golden, "models", dict, "golden").items()
    }
    per_output = {name: _output_tolerances(name, t) for name, t in golden["models"].items()}
    models = _models(raw)
    files = {str(k): str(v) for k, v in _get(raw, "files", dict, "manifest").items()}
    initial_params = _initial(adaptable, layers) if adaptable else {}
    manifest = Manifest(
        name=str(raw.get("name", "")),
        input=_input_spec(raw),
        labels=tuple(str(x) for x in _get(raw, "labels", list, "manifest")),
        logits_output=_get(outputs, "logits", str, "outputs"),
        features_output=features,
        output_kind=kind,
        alpha_input=_get(adaptable, "alpha_input", str, "adaptable") if adaptable else "",
        layers=layers,
        initial_params=initial_params,
        models=models,
        default_model=str(raw.get("default_model", models[0].name)),
        files=files,
        golden_file=str(golden.get("file", "")),
        golden_files={n: str(t["file"]) for n, t in golden["models"].items() if isinstance(t.get("file"), str)},
        golden_alpha=float(golden.get("alpha", 0.0)),
        golden_tolerance=tolerance,
        raw=raw,
        golden_output_tolerance={k: v for k, v in per_output.items() if v},
        trainable=_trainable(raw, files, initial_params),
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


def read_manifest(bundle_dir: Path) -> tuple[Manifest, bytes]:
    """Read and validate ``bundle_dir/manifest.json``; return it and its raw bytes."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"bundle has no {MANIFEST_NAME}: {path}")
    data = path.read_bytes()
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    return parse_manifest(raw), data
