"""Foreign models (ONNX or TFLite files nobody here wrote) wrapped into signed bundles the runtime serves.

The bundle follows ``docs/CONTRACT.md`` without an ``adaptable`` block: one ``graph: "folded"`` model, the
input spec (what a caller feeds: name, shape, dtype, layout, value range), ``outputs.kind`` (logits or
probabilities), ``outputs.features`` (``"features"``: the penultimate tensor, found automatically or named,
added as a model output — see :mod:`exporter.foreign_features`; null with ``features=None``), source
statistics when labelled ``source_x`` are given, golden vectors computed by the device runtime itself,
every file's sha256 and an Ed25519 signature. The model is inspected first; a spec that does not match it is a
:class:`ForeignModelError` naming both sides.

The bundle is schema version 2, laid out as :mod:`exporter.bundle` lays out ours, so that a device pays only for
what it uses (:meth:`runtime.manifest.Manifest.files_for`): the source statistics' numbers are compressed float32
blocks (:func:`exporter.statistics.write_statistic_blocks`: the feature mean/var in ``source_features.bin``, the
class-conditional Gaussians — a 256-d covariance is 128 KB — in ``class_statistics.bin``, fetched only by a
device that asks for them); the golden vectors are one compressed block per model (:mod:`runtime.blocks`), the
inputs stored exactly in the smallest of the forms ``runtime.bundle.golden_input`` reads back (as given, uint8
on an integer grid with a denominator, or that as a lossless prediction residual); what documents the wrapping
rather than runs it (the ONNX opset, the TFLite tensors' quantization parameters, which the runtime reads from
the file itself, and the int8 kernel variance behind the golden bounds) is in ``export_report.json`` (signed
through its sha256, fetched by no device; :func:`exporter.bundle.export_details` merges it back). Schema-1
foreign bundles written before still load: the readers read both.

Batches: a model with a static batch of 1 is still served for any batch. ONNX: the wrapped copy gets a
symbolic batch dimension when the graph allows it (checked: a batch run must equal per-sample runs);
otherwise it keeps its static batch and the entry says ``"batch_resizable": false`` (the
:class:`runtime.predictor.Predictor` then runs it in chunks). TFLite: the file is copied unchanged and
the LiteRT session resizes its input, with the same check (the file is copied unchanged unless a features
output is added).

No torch here: this module needs numpy, onnx, onnxruntime, ai-edge-litert (TFLite) and cryptography.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exporter.bundle_dir import golden_file, install, out_path, prepare_out_dir
from exporter.foreign_features import AUTO, FEATURES, ForeignModelError, onnx_with_features, tflite_with_features
from exporter.signing import sign_bundle
from exporter.statistics import check_source_data, output_statistics, write_statistic_blocks
from runtime.blocks import encode_block, encode_image_u8
from runtime.bundle import golden_input, load_bundle
from runtime.checks import require_int
from runtime.manifest import INPUT_DTYPES, MANIFEST_NAME, OUTPUT_KINDS, SCHEMA_VERSION, checked_invariances
from runtime.session import Session, open_session
from runtime.signing import SIGNATURE_NAME

logger = logging.getLogger(__name__)

LAYOUTS = ("NCHW", "NHWC")
# exporter.bundle.REPORT_FILE (not imported: that module imports torch, this one must not; a test keeps them equal)
REPORT_FILE = "export_report.json"
# model-entry fields that document the wrapping (the runtime reads quantization from the file): report only
REPORT_ONLY = ("opset", "input_quantization", "output_quantization", "features_quantization")
GOLDEN_DENOMINATORS = (1.0, 255.0)  # integer grids a golden input may lie on: raw pixels, or pixels / 255
FP32_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}
INT8_ATOL_STEPS = 3.0  # int8 outputs: at least this many output quantization steps …
INT8_ATOL_FLOOR = 1e-2  # … or this, or INT8_MARGIN x the kernel variance on the golden inputs, whichever is larger
INT8_MARGIN = 1.5
PROBABILITY_SUM_TOL = 0.05
STATISTICS_CHUNK = 256
_ONNX_INT8_OPS = {"QLinearConv", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear", "ConvInteger",
                  "MatMulInteger", "DynamicQuantizeLinear"}


@dataclass(frozen=True)
class ForeignInputSpec:
    """What a caller feeds the model.

    ``shape``: batch first, ``-1`` or the model's static batch; ``dtype``: float32 | uint8 | int8 (uint8 or
    float32 into a quantized TFLite input is quantized by the runtime with the input's own parameters);
    ``layout``: NCHW | NHWC; ``value_range``: the range of the values fed (e.g. ``(0, 255)`` for raw pixels);
    ``invariances``: input transformations the model's predictions are invariant to (names from
    :data:`runtime.manifest.INVARIANCES`), declared in the manifest.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "NCHW"
    value_range: tuple[float, float] = (0.0, 1.0)
    invariances: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        shape = _checked_shape(self.shape)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))
        try:
            object.__setattr__(self, "invariances", checked_invariances(self.invariances))
        except ValueError as exc:
            raise ForeignModelError(f"input {exc}") from exc
        if self.dtype not in INPUT_DTYPES:
            raise ForeignModelError(f"input dtype {self.dtype!r} is not one of {INPUT_DTYPES}")
        if self.layout not in LAYOUTS:
            raise ForeignModelError(f"input layout {self.layout!r} is not one of {LAYOUTS}")
        if len(shape) != 4 or shape[0] == 0 or shape[0] < -1 or any(d <= 0 for d in shape[1:]):
            raise ForeignModelError(f"input shape {list(shape)} must be [batch (-1 or static), 3 positive dims]")
        lo, hi = self.value_range
        if not lo < hi:
            raise ForeignModelError(f"input value_range {list(self.value_range)} must be increasing")

    @classmethod
    def parse(cls, spec: ForeignInputSpec | Mapping[str, Any]) -> ForeignInputSpec:
        """A spec from itself or a mapping with the field names (e.g. parsed JSON from the CLI)."""
        if isinstance(spec, ForeignInputSpec):
            return spec
        unknown = set(spec) - {"name", "shape", "dtype", "layout", "value_range", "invariances"}
        if unknown:
            raise ForeignModelError(f"unknown input spec fields {sorted(unknown)}")
        return cls(**spec)

    def manifest_block(self) -> dict[str, Any]:
        """The manifest's ``input`` block (batch as -1; normalisation, if any, is the model's business)."""
        return {"name": self.name, "shape": [-1, *self.shape[1:]], "dtype": self.dtype, "layout": self.layout,
                "value_range": list(self.value_range),
                **({"invariances": list(self.invariances)} if self.invariances else {})}


def _checked_shape(shape: Any) -> tuple[int, ...]:
    """The input shape as ints; a dim that is not an integer (a bool, 2.5, NaN, a string) is refused by position."""
    if isinstance(shape, str | bytes) or not isinstance(shape, Iterable):
        raise ForeignModelError(f"input shape must be a sequence of 4 integers, got {shape!r}")
    shape = list(shape)
    dims = []
    for axis, dim in enumerate(shape):
        try:
            dims.append(require_int(f"input shape dim {axis}", dim, -1))
        except ValueError as exc:
            raise ForeignModelError(f"{exc} (shape {shape!r})") from None
    return tuple(dims)


@dataclass(frozen=True)
class _Wrapped:
    """A model file prepared for the bundle and what inspection learnt about it."""

    data: bytes
    suffix: str
    fmt: str
    precision: str
    output: str
    batch_resizable: bool
    static_batch: int | None
    extra: dict[str, Any]
    io_names: dict[str, dict[str, str]]
    features: str | None = None  # the source tensor exposed as output FEATURES, or None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_output_name(outputs: Sequence[str], output_name: str | None, where: str) -> str:
    if output_name is not None:
        if output_name not in outputs:
            raise ForeignModelError(f"{where} has no output {output_name!r}; outputs are {list(outputs)}")
        return output_name
    if len(outputs) != 1:
        raise ForeignModelError(f"{where} has outputs {list(outputs)}; name the class scores with output_name "
                                "(--output-name)")
    return outputs[0]


def _check_dims(model_shape: Sequence[int | None], spec: ForeignInputSpec, where: str) -> int | None:
    """Compare the model's input dims (None = symbolic) with the spec; return the static batch or None."""
    if len(model_shape) != len(spec.shape):
        raise ForeignModelError(f"{where} input has rank {len(model_shape)}, the spec says {list(spec.shape)}")
    for axis, (m, s) in enumerate(zip(model_shape[1:], spec.shape[1:], strict=True), start=1):
        if m is not None and m != s:
            raise ForeignModelError(f"{where} input dim {axis} is {m}, the spec says {s} (shape {list(spec.shape)})")
    batch = model_shape[0]
    if spec.shape[0] != -1 and spec.shape[0] != batch:
        raise ForeignModelError(f"{where} input batch is {batch}, the spec says {spec.shape[0]}")
    return batch


def _onnx_dims(value: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _onnx_batch_free(proto: Any, input_name: str) -> Any:
    """A copy of ``proto`` whose input and outputs have a symbolic first dimension ``batch``."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in [*(v for v in copy.graph.input if v.name == input_name), *copy.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    del copy.graph.value_info[:]
    return copy


def load_onnx_model(path: Path) -> Any:
    """The ONNX ``ModelProto`` in ``path``, passed by ``onnx.checker``; :class:`ForeignModelError` naming the file
    when it is not a valid ONNX model (e.g. a TFLite file given as ONNX)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except (DecodeError, onnx.checker.ValidationError) as exc:
        raise ForeignModelError(f"{path} is not a valid ONNX model: {str(exc).strip()}") from exc
    return proto


def _inspect_onnx(
    path: Path, spec: ForeignInputSpec, golden_x: np.ndarray, output_name: str | None, features: str | None
) -> _Wrapped:
    import onnx

    proto = load_onnx_model(path)
    inits = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in inits]
    where = f"ONNX model {path.name}"
    if [v.name for v in inputs] != [spec.name]:
        raise ForeignModelError(f"{where} has inputs {[v.name for v in inputs]}; the spec names {spec.name!r}")
    elem = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
    if np.dtype(elem) != np.dtype(spec.dtype):
        raise ForeignModelError(f"{where} input {spec.name!r} is {np.dtype(elem)}, the spec says {spec.dtype}")
    batch = _check_dims(_onnx_dims(inputs[0]), spec, where)
    output = _check_output_name([o.name for o in proto.graph.output], output_name, where)
    precision = "int8" if any(n.op_type in _ONNX_INT8_OPS for n in proto.graph.node) else "fp32"
    tensor = None
    if features is not None:
        original = proto.SerializeToString()
        proto, tensor = onnx_with_features(proto, output, features, where)
        _check_scores_unchanged(original, proto.SerializeToString(), ".onnx", spec.name, golden_x, output, batch,
                                f"{where} with features {tensor!r}")
    data, resizable = proto.SerializeToString(), batch is None
    if batch is not None:
        candidate = _onnx_batch_free(proto, spec.name).SerializeToString()
        resizable = _batch_consistent(candidate, data, ".onnx", spec.name, golden_x, batch)
        data = candidate if resizable else data
    extra = {"opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)}
    names = [o.name for o in proto.graph.output]
    io_names = {"inputs": {spec.name: spec.name}, "outputs": {k: k for k in names}}
    return _Wrapped(data, ".onnx", "onnx", precision, output, resizable, None if resizable else batch, extra,
                    io_names, tensor)


def _tflite_io(path: Path) -> tuple[Any, dict[str, Any]]:
    from runtime.litert import LiteRTSession

    session = LiteRTSession(path, threads=1)
    return session, {n: session.input_info(n) for n in session.input_names}


def _check_tflite_dtype(info: Any, spec: ForeignInputSpec, where: str) -> None:
    """The spec's dtype must be the tensor's, or real values the runtime quantizes with the tensor's params."""
    if np.dtype(spec.dtype) == info.dtype:
        return
    if not info.quantized:
        raise ForeignModelError(f"{where} input {spec.name!r} is {info.dtype}, the spec says {spec.dtype}")
    limits = np.iinfo(info.dtype)
    lo, hi = ((limits.min - info.zero_point) * info.scale, (limits.max - info.zero_point) * info.scale)
    want = spec.value_range
    if spec.dtype != "float32":
        if info.scale != 1.0:
            raise ForeignModelError(f"{where}: {spec.dtype} values map to {info.dtype} only with scale 1, "
                                    f"the input has scale {info.scale}; declare float32 real values")
        want = (float(np.iinfo(spec.dtype).min), float(np.iinfo(spec.dtype).max))
    if want[0] < lo - info.scale / 2 or want[1] > hi + info.scale / 2:
        raise ForeignModelError(f"{where}: input values {list(want)} do not fit the {info.dtype} input's "
                                f"representable range [{lo:g}, {hi:g}] (scale {info.scale:g}, zero point "
                                f"{info.zero_point})")


def _quantization(info: Any) -> dict[str, Any]:
    return {"dtype": str(info.dtype), "scale": info.scale, "zero_point": info.zero_point}


def _inspect_tflite(
    path: Path, spec: ForeignInputSpec, golden_x: np.ndarray, output_name: str | None, features: str | None
) -> _Wrapped:
    session, infos = _tflite_io(path)
    where = f"TFLite model {path.name}"
    if list(infos) != [spec.name]:
        raise ForeignModelError(f"{where} has inputs {list(infos)}; the spec names {spec.name!r}")
    info = infos[spec.name]
    _check_tflite_dtype(info, spec, where)
    signature_batch = None if info.shape_signature[0] == -1 else info.shape[0]
    batch = _check_dims([signature_batch, *info.shape[1:]], spec, where)
    output = _check_output_name(session.output_names, output_name, where)
    out_info = session.output_info(output)
    quantized = info.quantized or out_info.quantized
    data = path.read_bytes()
    io_names = {"inputs": {spec.name: info.key},
                "outputs": {n: session.output_info(n).key for n in session.output_names}}
    added = None
    if features is not None:
        if FEATURES in io_names["outputs"]:
            raise ForeignModelError(f"{where} already has an output {FEATURES!r}; pass features=None (--features none)")
        added = tflite_with_features(data, out_info.key, features, where)
        _check_scores_unchanged(data, added.data, ".tflite", spec.name, golden_x, output, info.shape[0],
                                f"{where} with features {added.tensor!r}")
        data = added.data
        io_names["outputs"][FEATURES] = added.key
    resizable = _batch_consistent(data, data, ".tflite", spec.name, golden_x, info.shape[0])
    extra: dict[str, Any] = {}
    if info.quantized:
        extra["input_quantization"] = _quantization(info)
    if out_info.quantized:
        extra["output_quantization"] = _quantization(out_info)
    if added is not None:
        feature_info = _tflite_io_names_session(data, io_names).output_info(FEATURES)
        if feature_info.quantized:
            extra["features_quantization"] = _quantization(feature_info)
    static = None if resizable else (batch or info.shape[0])
    return _Wrapped(data, ".tflite", "tflite", "int8" if quantized else "fp32", output, resizable, static, extra,
                    io_names, added.tensor if added else None)


def _tflite_io_names_session(data: bytes, io_names: dict[str, dict[str, str]]) -> Any:
    from runtime.litert import LiteRTSession

    return LiteRTSession(data, threads=1, io_names=io_names)


def _check_scores_unchanged(
    original: bytes, modified: bytes, suffix: str, input_name: str, x: np.ndarray, output: str,
    static_batch: int | None, where: str,
) -> None:
    """The scores of ``modified`` must equal those of ``original`` bit for bit on ``x`` (run in chunks of
    the model's static batch, or at once)."""
    step = static_batch or len(x)
    with tempfile.TemporaryDirectory(prefix="edgeloop-foreign-") as tmp:
        before = _open(original, suffix, Path(tmp), "original")
        after = _open(modified, suffix, Path(tmp), "modified")
        for i in range(0, len(x) - step + 1, step):
            a = before.run({input_name: x[i : i + step]})[output]
            _require_finite({output: a}, where.partition(" with features")[0])
            b = after.run({input_name: x[i : i + step]})[output]
            if a.shape != b.shape or not np.array_equal(a, b):
                diff = float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else float("nan")
                raise ForeignModelError(f"{where}: adding the features output changes the scores {output!r} "
                                        f"(max difference {diff:.3g} on the golden inputs); pass features=None "
                                        "(--features none) or name another tensor")


def _require_finite(outputs: Mapping[str, np.ndarray], where: str) -> None:
    """A model whose outputs hold NaN or inf on the golden inputs cannot be verified by them: refused, named."""
    for name, value in outputs.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise ForeignModelError(f"{where}: output {name!r} holds {bad} NaN or infinite value(s) on the golden "
                                    "inputs; check the input spec (--value-range, --layout, --input-dtype): a model "
                                    "that does not compute finite scores cannot be verified on a device")


def _open(data: bytes, suffix: str, tmp: Path, name: str = "probe") -> Session:
    path = tmp / f"{name}{suffix}"
    path.write_bytes(data)
    return open_session(path, backend="auto", threads=1)


def _batch_consistent(
    data: bytes, original: bytes, suffix: str, input_name: str, golden_x: np.ndarray, static_batch: int
) -> bool:
    """Whether ``data`` run on a batch of ``max(2, len(golden_x))`` equals ``original`` run per sample."""
    x = np.concatenate([golden_x, golden_x])[: max(2, len(golden_x))] if len(golden_x) < 2 else golden_x
    if static_batch != 1:
        return False
    with tempfile.TemporaryDirectory(prefix="edgeloop-foreign-") as tmp:
        try:
            batched = _open(data, suffix, Path(tmp), "candidate").run({input_name: x})
        except Exception as exc:  # any failure of the candidate means "not resizable"
            logger.info("model does not run at batch %d (%s): keeping its static batch", len(x), exc)
            return False
        single = _open(original, suffix, Path(tmp), "original")
        rows = [single.run({input_name: x[i : i + 1]}) for i in range(len(x))]
    for name, value in batched.items():
        expected = np.concatenate([r[name] for r in rows])
        if value.shape != expected.shape or not np.allclose(value, expected, atol=1e-5, rtol=1e-4):
            logger.info("batch run of output %r differs from per-sample runs: keeping the static batch", name)
            return False
    return True


def _check_x(golden_x: np.ndarray, spec: ForeignInputSpec, what: str = "golden_x") -> np.ndarray:
    x = np.asarray(golden_x)
    if x.ndim != 4 or x.shape[1:] != spec.shape[1:] or len(x) == 0:
        want = ", ".join(map(str, spec.shape[1:]))
        raise ForeignModelError(f"{what} has shape {x.shape}, the spec wants (N, {want})")
    if np.issubdtype(np.dtype(spec.dtype), np.integer) and x.dtype != np.dtype(spec.dtype):
        raise ForeignModelError(f"{what} is {x.dtype}, the spec says {spec.dtype}")
    x = x.astype(spec.dtype)
    lo, hi = spec.value_range
    if not np.all(np.isfinite(x)) or x.min() < lo or x.max() > hi:
        raise ForeignModelError(f"{what} values [{x.min()}, {x.max()}] leave the spec's value range [{lo}, {hi}]")
    return np.ascontiguousarray(x)


def _kernel_variance(wrapped: _Wrapped, path: Path, spec: ForeignInputSpec, x: np.ndarray) -> dict[str, float]:
    """Per output, the largest difference on ``x`` between the default kernels and the other kernel families."""
    feeds = {spec.name: x}
    if wrapped.fmt == "tflite":
        from runtime.litert import LiteRTSession

        runs = [LiteRTSession(path, 1, wrapped.io_names, kernels=k).run(feeds) for k in ("default", "builtin",
                                                                                        "reference")]
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        plain = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in plain.get_outputs()]
        runs = [open_session(path, "onnx", 1).run(feeds), dict(zip(names, plain.run(names, feeds), strict=True))]
    return {k: max(float(np.abs(run[k].astype(np.float64) - runs[0][k]).max()) for run in runs[1:]) for k in runs[0]}


def _tolerance(wrapped: _Wrapped, measured: dict[str, float] | None) -> dict[str, Any]:
    """Golden tolerance: fp32 fixed; int8 from the kernel variance ``measured`` on the golden inputs themselves
    (:func:`_kernel_variance`, per output).

    int8 results depend on the kernels (measured on the MLPerf Tiny ResNet-8 int8: XNNPACK vs LiteRT's
    built-in kernels up to 42 output steps, 0.16 in probability), so the bound is the larger of a floor,
    a few output quantization steps and :data:`INT8_MARGIN` × the variance measured on exactly these inputs.
    The features output, quantized more coarsely than the scores (one step of the ResNet-8 int8 flatten
    tensor is 0.13), gets its own bound (``outputs.features``) so that it does not loosen the scores'.
    """
    if wrapped.precision == "fp32" or measured is None:
        return dict(FP32_TOLERANCE)
    scores = max(v for k, v in measured.items() if k != FEATURES)
    atol = _int8_atol(scores, wrapped.extra.get("output_quantization", {}).get("scale", 0.0))
    logger.info("kernel variance on the golden inputs %.3g -> golden atol %.3g", scores, atol)
    if FEATURES not in measured:
        return {"atol": atol, "rtol": 1e-3}
    features = _int8_atol(measured[FEATURES], wrapped.extra.get("features_quantization", {}).get("scale", 0.0))
    return {"atol": atol, "rtol": 1e-3, "outputs": {FEATURES: {"atol": features, "rtol": 1e-3}}}


def _int8_atol(measured: float, step: float) -> float:
    return max(INT8_ATOL_FLOOR, INT8_ATOL_STEPS * step, INT8_MARGIN * measured)


def _check_scores(scores: np.ndarray, kind: str, labels: Sequence[str], output: str) -> None:
    if scores.ndim != 2 or scores.shape[1] != len(labels):
        raise ForeignModelError(f"output {output!r} has shape {scores.shape}, expected (N, {len(labels)}) for "
                                f"{len(labels)} labels")
    if kind == "probabilities":
        sums = scores.sum(axis=1)
        if scores.min() < -1e-6 or np.abs(sums - 1.0).max() > PROBABILITY_SUM_TOL:
            raise ForeignModelError(f"output {output!r} is not probabilities: values [{scores.min():.3g}, "
                                    f"{scores.max():.3g}], row sums [{sums.min():.3g}, {sums.max():.3g}]; "
                                    "declare output_kind='logits'")


def _wrap(
    source_path: Path, out_dir: Path, inspect: Any, *, labels: Sequence[str], input_spec: Any, output_kind: str,
    golden_x: np.ndarray, signing_key: Ed25519PrivateKey | None, name: str | None, output_name: str | None,
    overwrite: bool, features: str | None, source_x: np.ndarray | None, source_y: np.ndarray | None,
) -> Path:
    out_dir = out_path(out_dir)
    spec = ForeignInputSpec.parse(input_spec)
    if source_x is not None and features is None:
        raise ForeignModelError("source statistics (source_x) describe the features: pass features='auto' or a name")
    if source_y is not None and source_x is None:
        raise ForeignModelError("source_y was given without source_x")
    if output_kind not in OUTPUT_KINDS:
        raise ForeignModelError(f"output_kind {output_kind!r} is not one of {OUTPUT_KINDS}")
    if not labels or len(set(labels)) != len(labels) or not all(isinstance(v, str) for v in labels):
        raise ForeignModelError(f"labels must be unique strings, got {list(labels)!r}")
    if not source_path.is_file():
        raise FileNotFoundError(f"foreign model not found: {source_path}")
    x = _check_x(golden_x, spec)
    source = _check_x(source_x, spec, "source_x") if source_x is not None else None
    if source is not None:
        try:
            source_y = check_source_data(source, source_y, len(labels))
        except ValueError as exc:
            raise ForeignModelError(str(exc)) from exc
    wrapped = inspect(source_path, spec, x, output_name, features)
    if wrapped.static_batch is not None:
        if len(x) < wrapped.static_batch:
            raise ForeignModelError(f"the model's static batch is {wrapped.static_batch}: give that many golden_x")
        x = x[: wrapped.static_batch]  # the golden check runs the whole golden batch at once
    prepare_out_dir(out_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        manifest = _write_files(tmp, source_path, wrapped, spec, x, labels, output_kind, name or out_dir.name,
                                (source, source_y))
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, separators=(",", ":")) + "\n", encoding="utf-8")
        if signing_key is None:
            logger.warning("no signing key given: %s is signed with a throwaway key", out_dir)
        sign_bundle(tmp, signing_key or Ed25519PrivateKey.generate())
        load_bundle(tmp, backend="auto", threads=1)  # the bundle must prove itself before it is installed
        install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrapped %s into %s (%s %s, batch resizable: %s, features: %s)", source_path.name, out_dir,
                wrapped.fmt, wrapped.precision, wrapped.batch_resizable, wrapped.features)
    return out_dir


def golden_input_arrays(x: np.ndarray) -> dict[str, np.ndarray]:
    """The golden inputs ``x`` as the arrays of a golden block: the smallest encoded of ``input`` (as given),
    ``input_u8``/``input_denominator`` (values on the k/d grid, d in :data:`GOLDEN_DENOMINATORS`, 0 <= k <= 255)
    and that as ``input_u8_residual`` (:func:`runtime.blocks.encode_image_u8`). Every candidate is decoded with
    :func:`runtime.bundle.golden_input` and the spec's dtype before it is kept: the device feeds exactly ``x``."""
    candidates: list[dict[str, np.ndarray]] = [{"input": x}]
    if x.dtype.kind in "uf":
        for denominator in GOLDEN_DENOMINATORS:
            k = np.rint(x.astype(np.float64) * denominator) if x.dtype.kind == "f" else x
            if k.min() < 0 or k.max() > 255:
                continue
            q, d = k.astype(np.uint8), np.asarray(denominator, np.float32)
            candidates.append({"input_u8": q, "input_denominator": d})
            if q.ndim == 4:
                candidates.append({"input_u8_residual": encode_image_u8(q), "input_denominator": d})
    exact = [c for c in candidates if _restores(c, x)]
    return min(exact, key=lambda c: len(encode_block(c)))


def _restores(arrays: dict[str, np.ndarray], x: np.ndarray) -> bool:
    restored = golden_input(arrays, "golden").astype(x.dtype)
    return restored.shape == x.shape and bool(np.array_equal(restored, x))


def _write_files(
    tmp: Path, source: Path, wrapped: _Wrapped, spec: ForeignInputSpec, x: np.ndarray, labels: Sequence[str],
    output_kind: str, name: str, statistics_data: tuple[np.ndarray | None, np.ndarray | None],
) -> dict[str, Any]:
    """Write the model file, its golden block, the statistics blocks and the export report into ``tmp``; return
    the manifest (schema version 2)."""
    model_file = tmp / f"model_{wrapped.precision}{wrapped.suffix}"
    model_file.write_bytes(wrapped.data)
    session = open_session(model_file, backend="auto", threads=1, io_names=wrapped.io_names)
    outputs = session.run({spec.name: x})
    _require_finite(outputs, f"{wrapped.fmt.upper() if wrapped.fmt == 'onnx' else 'TFLite'} model {source.name}")
    _check_scores(outputs[wrapped.output], output_kind, labels, wrapped.output)
    if wrapped.features is not None:
        _check_features(outputs[FEATURES], len(x), wrapped.features)
    model = wrapped.precision
    golden = {**golden_input_arrays(x), **{f"{model}/{k}": np.asarray(v) for k, v in outputs.items()}}
    (tmp / golden_file(model)).write_bytes(encode_block(golden))
    measured = None if wrapped.precision == "fp32" else _kernel_variance(wrapped, model_file, spec, x)
    entry = {
        "name": model, "file": model_file.name, "format": wrapped.fmt, "precision": wrapped.precision,
        "graph": "folded", "io_names": wrapped.io_names,
        "batch_resizable": wrapped.batch_resizable, "static_batch": wrapped.static_batch,
        **{k: v for k, v in wrapped.extra.items() if k not in REPORT_ONLY},
    }
    report_entry: dict[str, Any] = {k: v for k, v in wrapped.extra.items() if k in REPORT_ONLY}
    if measured is not None:
        report_entry["golden_kernel_variance"] = measured
    (tmp / REPORT_FILE).write_text(json.dumps({"models": {model: report_entry}}, separators=(",", ":")) + "\n",
                                   encoding="utf-8")
    source_x, source_y = statistics_data
    blocks: dict[str, Any] = {}
    if source_x is not None:
        probs, features = _source_pass(session, wrapped, spec, source_x, output_kind)
        blocks["source_statistics"] = write_statistic_blocks(tmp, output_statistics(probs, features, source_y))
    source_sha = _sha256(source.read_bytes())
    foreign: dict[str, Any] = {"source_file": source.name, "source_sha256": source_sha, "format": wrapped.fmt}
    if wrapped.features is not None:
        foreign["added_outputs"] = {FEATURES: wrapped.features}
        foreign["scores_bit_identical_to_source"] = True  # checked on the golden inputs before writing
    skip = (MANIFEST_NAME, SIGNATURE_NAME)
    return {
        "schema_version": SCHEMA_VERSION, "name": name, "arch": "foreign", "created_unix_ms": int(time.time() * 1000),
        "source_checkpoint_sha256": source_sha, "input": spec.manifest_block(), "labels": list(labels),
        "outputs": {"logits": wrapped.output, "features": FEATURES if wrapped.features else None,
                    "kind": output_kind},
        "models": [entry], "default_model": model, **blocks, "report": {"file": REPORT_FILE},
        "files": {p.name: _sha256(p.read_bytes()) for p in sorted(tmp.iterdir()) if p.name not in skip},
        "golden": {"alpha": 0.0, "models": {model: {"file": golden_file(model), **_tolerance(wrapped, measured)}}},
        "foreign": foreign,
    }


def _check_features(features: np.ndarray, n: int, tensor: str) -> None:
    if features.ndim != 2 or len(features) != n:
        raise ForeignModelError(f"features tensor {tensor!r} has shape {features.shape} for a batch of {n}; it "
                                "must be (N, D): name a flattened tensor")


def _source_pass(
    session: Session, wrapped: _Wrapped, spec: ForeignInputSpec, x: np.ndarray, output_kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and features of ``x``, in chunks (of the static batch, the last one padded)."""
    from runtime.predictor import probabilities

    step = wrapped.static_batch or STATISTICS_CHUNK
    scores, features = [], []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        if wrapped.static_batch is not None and len(chunk) < step:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
        out = session.run({spec.name: chunk})
        scores.append(np.asarray(out[wrapped.output], np.float32)[: len(x) - i])
        features.append(np.asarray(out[FEATURES], np.float32)[: len(x) - i])
    return probabilities(np.concatenate(scores), output_kind), np.concatenate(features)


def wrap_onnx(
    path: Path | str, out_dir: Path | str, *, labels: Sequence[str],
    input_spec: ForeignInputSpec | Mapping[str, Any], output_kind: str, golden_x: np.ndarray,
    signing_key: Ed25519PrivateKey | None = None, name: str | None = None, output_name: str | None = None,
    overwrite: bool = False, features: str | None = AUTO, source_x: np.ndarray | None = None,
    source_y: np.ndarray | None = None,
) -> Path:
    """Wrap the ONNX file ``path`` into a signed bundle at ``out_dir``; return ``out_dir``.

    ``input_spec`` must match the model's single graph input (name, dtype, non-batch dims; batch -1 or the
    static one); ``output_name`` picks the score output when there are several; ``golden_x`` (a few
    samples, in the spec's dtype and value range) become the golden vectors. A static batch of 1 is made
    symbolic in the wrapped copy when a batch run equals per-sample runs. ``features``: ``"auto"`` exposes
    the input of the last Gemm/MatMul before the scores as output ``features``, a tensor name that tensor,
    None no features (see :mod:`exporter.foreign_features`); the scores must stay bit-identical.
    ``source_x``/``source_y`` (labelled training samples, as ``golden_x``) give the source statistics:
    feature mean/var, entropy, accuracy and class-conditional Gaussians (``source_features.bin``,
    ``class_statistics.bin``).
    Raises :class:`ForeignModelError`.
    """
    return _wrap(Path(path), Path(out_dir), _inspect_onnx, labels=labels, input_spec=input_spec,
                 output_kind=output_kind, golden_x=golden_x, signing_key=signing_key, name=name,
                 output_name=output_name, overwrite=overwrite, features=features, source_x=source_x,
                 source_y=source_y)


def wrap_tflite(
    path: Path | str, out_dir: Path | str, *, labels: Sequence[str],
    input_spec: ForeignInputSpec | Mapping[str, Any], output_kind: str, golden_x: np.ndarray,
    signing_key: Ed25519PrivateKey | None = None, name: str | None = None, output_name: str | None = None,
    overwrite: bool = False, features: str | None = AUTO, source_x: np.ndarray | None = None,
    source_y: np.ndarray | None = None,
) -> Path:
    """Wrap the TFLite file ``path`` into a signed bundle at ``out_dir``; return ``out_dir``.

    As :func:`wrap_onnx`; names are signature keys, or tensor names when the model has no signature. A
    quantized input may be declared as real values (float32, or uint8 when its scale is 1) that the runtime
    quantizes with the input's parameters; quantized outputs (features included) are dequantized. The file
    is copied unchanged unless features are added: then the flatbuffer gains that output (and a signature
    output ``features`` when it has a signature); the manifest's ``foreign`` block records it.
    """
    return _wrap(Path(path), Path(out_dir), _inspect_tflite, labels=labels, input_spec=input_spec,
                 output_kind=output_kind, golden_x=golden_x, signing_key=signing_key, name=name,
                 output_name=output_name, overwrite=overwrite, features=features, source_x=source_x,
                 source_y=source_y)
