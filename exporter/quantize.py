"""Static int8 post-training quantization of the adaptable ONNX graph with onnxruntime (QDQ, per channel).

By default only ``Conv``, ``MatMul`` and ``Gemm`` are quantized; the α-mixed BatchNorm math stays float because
it consumes the fed parameters. A folded graph also quantizes ``Relu`` and ``MaxPool``
(:data:`FOLDED_OP_TYPES`), which lets onnxruntime fuse the activation into ``QLinearConv`` and pool in uint8
NHWC between integer convolutions, and a residual ``Add`` read by a ``Relu`` (:func:`residual_op_types`). By
default the classifier head (the node producing ``logits``) is left float too, so neither ``logits`` nor
``features`` (the head's input) are rounded to 8 bits: entropy- and feature-based adaptation and drift
detection on the device read them. Activations default to QUInt8, which onnxruntime's CPU provider fuses into
``QLinearConv``; QInt8 activations were left unfused (float-emulated) and ran slower than fp32 in our
measurement.

Stem convolutions on few input channels (``Int8Config.float_convs_below_channels``) get one of two treatments:

* **float** (the convolution, its activation and a pool right after it stay float): the right choice when
  a pool follows (the MNIST SmallCNN: float conv + pool, then the quantization of 4x fewer elements; measured
  0.45 ms at batch 64 against 0.89 ms quantized) or when the output feeds float math (the adaptable graph's
  normalisation);
* **padded** (``pad_small_convs``): when the stem's activation feeds quantized operators directly (the
  CIFAR ResNet-8), the input gets zero channels up to a multiple of 4 (``Pad`` on the channel axis, zero
  filter taps: the same function) and the stem is quantized. onnxruntime's symmetric indirect convolution
  (``MlasConvSym``) wants input channels in multiples of 4; on 3 channels it falls back to an im2col GEMM
  (1.14 ms against 0.65 ms padded, ResNet-8 batch 64). A float stem there costs its NCHWc convolution plus a
  reorder to NCHW, a quantization of the full-resolution activation and a first residual ``Add`` run in NCHW
  between two transposes; the padded graph runs NHWC from the input's first transpose on.

When the graph input goes through a per-channel normalisation ``(x − m) / s`` straight into that quantized stem,
the normalisation is folded into the input's ``QuantizeLinear`` (:func:`fold_input_normalisation`): per channel
scale ``S·s_c`` and zero point ``Z − round(m_c / (S·s_c))`` give the same integers up to one rounding step, and
two float passes over the input (``Sub``, ``Div``) disappear.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from exporter.onnx_export import make_feeds, ort_session
from exporter.train import check_images
from runtime.checks import is_finite_number, require_int

logger = logging.getLogger(__name__)

QUANT_METHOD = "onnxruntime_static_qdq"
OP_TYPES = ("Conv", "MatMul", "Gemm")
FOLDED_OP_TYPES = (*OP_TYPES, "Relu", "MaxPool")
SUPPORTED_OP_TYPES = frozenset({*FOLDED_OP_TYPES, "Add", "AveragePool", "GlobalAveragePool", "Mul"})
# element-wise and pooling nodes that follow a float stem stay float with it (see _stem_plan)
_STEM_FOLLOWERS = frozenset({"Relu", "Clip", "MaxPool", "AveragePool"})
# onnxruntime's symmetric indirect QLinearConv kernel needs input channels in multiples of this (x86-64 and
# the ARM dot-product kernels alike)
CHANNEL_ALIGNMENT = 4
# onnxruntime's QDQ propagation moves the QuantizeLinear after a float pool up before it, and then pools uint8
# in NCHW with its generic kernel: measured 20x slower than the float pool on a 28x28 MNIST stem
_PROPAGATION = "QDQPropagationTransformer"
_CALIBRATIONS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_ACTIVATIONS = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}


class QuantizationError(RuntimeError):
    """Quantization failed or produced an unusable model."""


class Int8AgreementError(QuantizationError):
    """The int8 model's top-1 predictions agree with fp32 less often than required."""


@dataclass(frozen=True)
class Int8Config:
    """Options of :func:`quantize_int8`.

    ``calibration``: minmax | entropy | percentile; ``activation_type``: quint8 | qint8 (weights are always
    QInt8); ``max_samples`` caps the calibration samples (the first ones are used; entropy and percentile
    use a multiple of ``batch_size`` of them, as onnxruntime's histogram collectors need equal batches);
    ``min_agreement`` is the required int8-vs-fp32 top-1 agreement; ``keep_head_float`` leaves the
    logits-producing node in float; ``float_convs_below_channels`` leaves convolutions with fewer input
    channels in float, with the activation and pooling nodes right after them (onnxruntime's ``QLinearConv``
    on a 1–3-channel stem measured 8× slower than the float convolution), unless ``pad_small_convs`` pads
    such a convolution's input to a multiple of 4 channels and quantizes it (only where its activation feeds
    quantized operators without a pool in between: see the module docstring); ``op_types`` are the operator
    types quantized (:data:`OP_TYPES`, or :data:`FOLDED_OP_TYPES` for a folded graph).
    """

    calibration: str = "minmax"
    activation_type: str = "quint8"
    per_channel: bool = True
    reduce_range: bool = False
    max_samples: int = 512
    batch_size: int = 64
    min_agreement: float = 0.9
    preprocess: bool = True
    keep_head_float: bool = True
    float_convs_below_channels: int = 0
    op_types: tuple[str, ...] = OP_TYPES
    pad_small_convs: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.op_types, str):
            raise ValueError(f"op_types must be a sequence of operator types, not the string {self.op_types!r}")
        object.__setattr__(self, "op_types", tuple(self.op_types))
        unknown = sorted(set(self.op_types) - SUPPORTED_OP_TYPES)
        if unknown or not self.op_types:
            raise ValueError(f"op_types must be a non-empty subset of {sorted(SUPPORTED_OP_TYPES)}, got {unknown}")
        for name, minimum in (("max_samples", 1), ("batch_size", 1), ("float_convs_below_channels", 0)):
            object.__setattr__(self, name, require_int(name, getattr(self, name), minimum))
        if self.calibration not in _CALIBRATIONS:
            raise ValueError(f"calibration must be one of {sorted(_CALIBRATIONS)}, got {self.calibration!r}")
        if self.activation_type not in _ACTIVATIONS:
            raise ValueError(f"activation_type must be one of {sorted(_ACTIVATIONS)}, got {self.activation_type!r}")
        agreement = self.min_agreement
        if not is_finite_number(agreement) or not 0.0 <= agreement <= 1.0:
            raise ValueError(f"min_agreement must lie in [0, 1], got {self.min_agreement}")


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_int8` did: calibration method, sample count, agreement with fp32, pre-processing."""

    calibration: str
    samples: int
    per_channel: bool
    activation_type: str
    top1_agreement: float
    eval_samples: int
    preprocessed: bool
    float_convs_below_channels: int = 0
    op_types: tuple[str, ...] = OP_TYPES
    disabled_optimizers: tuple[str, ...] = ()
    padded_convs: tuple[tuple[str, int, int], ...] = ()
    folded_input_normalisation: bool = False

    def manifest_block(self) -> dict[str, Any]:
        """The ``quantization`` block of a bundle manifest's model entry (CONTRACT.md); ``padded_input_channels``
        (node name → [channels, padded channels]) only when a small convolution was padded and quantized;
        ``input_normalisation`` only when it was folded into the input quantization."""
        block: dict[str, Any] = {
            "method": QUANT_METHOD,
            "per_channel": self.per_channel,
            "calibration": self.calibration,
            "samples": self.samples,
            "float_convs_below_channels": self.float_convs_below_channels,
            "op_types": list(self.op_types),
        }
        if self.padded_convs:
            block["padded_input_channels"] = {name: [c, padded] for name, c, padded in self.padded_convs}
        if self.folded_input_normalisation:
            block["input_normalisation"] = "folded into the input QuantizeLinear (per-channel scale, zero point)"
        return block

    def session_options(self) -> dict[str, Any] | None:
        """The model entry's ``session_options`` (onnxruntime settings the runtime applies), if any."""
        return {"disabled_optimizers": list(self.disabled_optimizers)} if self.disabled_optimizers else None


def graph_feeds(x: np.ndarray, params: Mapping[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """Feeds for an adaptable graph (``params`` given) or a folded one (no parameters: only ``input``)."""
    if not params:
        return {"input": np.ascontiguousarray(x, dtype=np.float32)}
    return make_feeds(x, params, alpha)


class CalibrationReader(CalibrationDataReader):
    """Feeds real samples in batches, with the source parameters and α = 0, to onnxruntime's calibrator."""

    def __init__(self, x: np.ndarray, params: Mapping[str, np.ndarray], batch_size: int = 64) -> None:
        """``x``: (N, C, H, W) float32 samples in [0, 1]; ``params``: every ``bnK.*`` graph input."""
        self.batch_size = require_int("batch_size", batch_size, 1)
        self.x = check_images(x, "calibration samples")
        self.params = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
        self._start = 0

    def __len__(self) -> int:
        """Number of samples (not batches)."""
        return len(self.x)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed dict, or None when every sample was fed."""
        if self._start >= len(self.x):
            return None
        batch = self.x[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        return graph_feeds(batch, self.params, 0.0)

    def rewind(self) -> None:
        """Start again from the first sample."""
        self._start = 0


def _preprocess(src: Path, dst: Path) -> bool:
    """Run ``quant_pre_process``; on failure log a warning and copy the model unchanged."""
    try:
        quant_pre_process(str(src), str(dst))
        onnx.checker.check_model(str(dst))
        return True
    except Exception as exc:  # any failure of the optional pre-processing step
        logger.warning("quant_pre_process failed on %s (%s); quantizing without pre-processing", src.name, exc)
        dst.write_bytes(src.read_bytes())
        return False


def _small_convs(graph: onnx.GraphProto, config: Int8Config) -> list[onnx.NodeProto]:
    """Convolutions with constant weights on fewer than ``config.float_convs_below_channels`` input channels."""
    inits = {i.name: i for i in graph.initializer}
    return [node for node in graph.node if node.op_type == "Conv" and len(node.input) > 1
            and node.input[1] in inits and inits[node.input[1]].dims[1] < config.float_convs_below_channels]


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name → the nodes that read it, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _follower_chain(graph: onnx.GraphProto, conv: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """The activation/pool nodes that follow ``conv`` one after another (each the only consumer of the previous
    output), and the consumers of the chain's last output."""
    consumers = _readers(graph)
    chain: list[onnx.NodeProto] = []
    out = conv.output[0]
    while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type in _STEM_FOLLOWERS:
        chain.append(consumers[out][0])
        out = chain[-1].output[0]
    return chain, consumers.get(out, [])


def _paddable(graph: onnx.GraphProto, conv: onnx.NodeProto, config: Int8Config) -> bool:
    """Whether a small convolution is better padded and quantized than left float: group 1, followed by an
    activation chain without a pool whose nodes are all quantized (a folded graph's ``Relu``), so its output
    stays quantized for the next operators. Convolutions that feed float math directly (the adaptable graph's
    normalisation) or a pool stay float."""
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    chain, consumers = _follower_chain(graph, conv)
    output_names = {o.name for o in graph.output}
    return (config.pad_small_convs and group == 1 and bool(chain) and bool(consumers)
            and chain[-1].output[0] not in output_names
            and all(n.op_type in config.op_types and not n.op_type.endswith("Pool") for n in chain))


def pad_input_channels(model: onnx.ModelProto, conv_names: set[str], multiple: int = CHANNEL_ALIGNMENT
                       ) -> list[tuple[str, int, int]]:
    """Pad the input of each named convolution with zero channels up to ``multiple`` and give its filter zero
    taps for them (the same function): a ``Pad`` on the channel axis in front of it. Edits ``model`` in place;
    returns (node name, channels, padded channels) per padded convolution."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    padded = []
    for index in reversed(range(len(graph.node))):  # from the back: inserting keeps earlier indices valid
        node = graph.node[index]
        if node.name not in conv_names:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        channels = weight.shape[1]
        target = -(-channels // multiple) * multiple
        if target == channels:
            continue
        wider = np.zeros((weight.shape[0], target, *weight.shape[2:]), dtype=weight.dtype)
        wider[:, :channels] = weight
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(wider, node.input[1]))
        rank = weight.ndim
        pads = np.zeros(2 * rank, dtype=np.int64)
        pads[rank + 1] = target - channels  # the end of axis 1
        pads_name, out = f"{node.name}_channel_pads", f"{node.input[0]}_channel_padded"
        graph.initializer.append(numpy_helper.from_array(pads, pads_name))
        graph.node.insert(index, helper.make_node("Pad", [node.input[0], pads_name], [out],
                                                  name=f"{node.name}_ChannelPad"))
        node.input[0] = out
        padded.append((node.name, int(channels), int(target)))
    return padded[::-1]


def _channel_constant(inits: Mapping[str, onnx.TensorProto], name: str, channels: int) -> np.ndarray | None:
    """The (C,) values of a constant that broadcasts along axis 1 of an NCHW tensor (shape (1, C, 1, 1) or
    (C, 1, 1)), or None."""
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name]).astype(np.float64)
    if value.shape not in ((1, channels, 1, 1), (channels, 1, 1)):
        return None
    return value.reshape(-1)


def fold_input_normalisation(model: onnx.ModelProto) -> bool:
    """Fold ``input → Sub(m) → Div(s) → [channel Pad] → QuantizeLinear(S, Z)`` into ``input → [channel Pad] →
    QuantizeLinear(S·s_c, Z − round(m_c / (S·s_c)), axis 1)``; edits ``model`` in place, returns whether it did.

    The pad channels (zeros appended on axis 1, as :func:`pad_input_channels` adds them) keep ``(S, Z)``, so
    they still read as zero. Nothing changes unless each step is the only reader of the previous one, the
    constants are per channel, the quantization is per tensor uint8 with one ``DequantizeLinear`` reader, and the
    zero points fit in uint8 (the shared one may move up a few steps for that)."""
    graph = model.graph
    if len(graph.input) < 1:
        return False
    inits = {i.name: i for i in graph.initializer}
    readers = _readers(graph)

    def only_reader(name: str, op: str) -> onnx.NodeProto | None:
        nodes = readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op and nodes[0].input[0] == name else None

    source = graph.input[0]
    dims = source.type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].dim_value:
        return False
    channels = dims[1].dim_value
    sub = only_reader(source.name, "Sub")
    div = sub and only_reader(sub.output[0], "Div")
    if sub is None or div is None:
        return False
    mean, std = _channel_constant(inits, sub.input[1], channels), _channel_constant(inits, div.input[1], channels)
    if mean is None or std is None or np.any(std <= 0):
        return False
    nxt = readers.get(div.output[0], [])
    pad = nxt[0] if len(nxt) == 1 and nxt[0].op_type == "Pad" else None
    total = channels
    if pad is not None:
        pads = numpy_helper.to_array(inits[pad.input[1]]) if len(pad.input) > 1 and pad.input[1] in inits else None
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if (pads is None or pads.size != 8 or mode != b"constant" or (len(pad.input) > 2 and pad.input[2])
                or np.any(np.delete(pads, 5) != 0)):
            return False
        total += int(pads[5])
    quant = only_reader((pad or div).output[0], "QuantizeLinear")
    if quant is None or len(quant.input) < 3 or quant.input[1] not in inits or quant.input[2] not in inits:
        return False
    scale, zero = numpy_helper.to_array(inits[quant.input[1]]), numpy_helper.to_array(inits[quant.input[2]])
    if scale.size != 1 or zero.size != 1 or zero.dtype != np.uint8:
        return False
    dequant = only_reader(quant.output[0], "DequantizeLinear")
    if dequant is None or len(dequant.input) < 3 or dequant.input[1:3] != quant.input[1:3]:
        return False
    s, z = float(scale.reshape(())), int(zero.reshape(()))
    scales = np.full(total, s, dtype=np.float32)
    offsets = np.zeros(total, dtype=np.int64)
    scales[:channels] = s * std
    offsets[:channels] = np.round(mean / (s * std))
    # the shared zero point moves up when a channel's would fall below 0 (the top of the range loses as many
    # steps: calibrated maxima saturate by at most that much)
    z_new = max(z, int(offsets.max()))
    zeros = z_new - offsets
    if z_new > 255 - 8 or np.any(zeros > 255) or not np.all(np.isfinite(scales)):
        return False
    scale_name, zero_name = f"{quant.name}_channel_scale", f"{quant.name}_channel_zero_point"
    graph.initializer.extend([numpy_helper.from_array(scales, scale_name),
                              numpy_helper.from_array(zeros.astype(np.uint8), zero_name)])
    if z_new != z:
        shared = f"{dequant.name}_zero_point"
        graph.initializer.append(numpy_helper.from_array(np.array(z_new, dtype=np.uint8), shared))
        dequant.input[2] = shared
    (pad or quant).input[0] = source.name
    quant.input[1], quant.input[2] = scale_name, zero_name
    del quant.attribute[:]
    quant.attribute.append(helper.make_attribute("axis", 1))
    graph.node.remove(div)
    graph.node.remove(sub)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name in (sub.input[1], div.input[1]) and i.name not in used]:
        graph.initializer.remove(init)
    return True


def _stem_plan(model_path: Path, config: Int8Config) -> tuple[list[str], list[str], bool]:
    """Which small convolutions to pad and quantize and which to leave float (see the module docstring).

    Returns the convolutions to pad, the nodes left float (the logits head when kept float, each float small
    convolution and the activation/pool chain right after it), and whether such a chain holds a pool (then
    onnxruntime's QDQ propagation must be off: see ``_PROPAGATION``)."""
    graph = onnx.load(str(model_path)).graph
    pad, stem, pooled = [], [], False
    for conv in _small_convs(graph, config):
        if _paddable(graph, conv, config):
            pad.append(conv.name)
            continue
        chain, _ = _follower_chain(graph, conv)
        stem += [conv.name, *(n.name for n in chain)]
        pooled |= any(n.op_type.endswith("Pool") for n in chain)
    head = [node.name for node in graph.node if config.keep_head_float and "logits" in node.output]
    return pad, head + [node.name for node in graph.node if node.name in set(stem)], pooled


def residual_op_types(model_path: Path, op_types: tuple[str, ...]) -> tuple[str, ...]:
    """``op_types`` plus ``Add`` when ReLU is quantized (a folded graph) and the graph joins two computed tensors
    with an ``Add`` read only by a ``Relu`` (a residual block's end).

    onnxruntime already runs such an ``Add`` as ``QLinearAdd`` when the operators around it are quantized; the
    last one of a ResNet, read by the float global average pool, stayed float between two ``DequantizeLinear``
    and two transposes (ResNet-8 batch 64: 1.2% of the int8 time). Quantized, its ReLU folds into the
    ``QLinearAdd`` and the average pool reads one ``DequantizeLinear``; the features (the pool's mean over
    8-bit values) are not rounded to 8 bits themselves."""
    if "Relu" not in op_types or "Add" in op_types:
        return op_types
    graph = onnx.load(str(model_path)).graph
    produced = {out for node in graph.node for out in node.output}
    readers = _readers(graph)
    joins = [node for node in graph.node if node.op_type == "Add" and len(node.input) == 2
             and all(name in produced for name in node.input)
             and [n.op_type for n in readers.get(node.output[0], [])] == ["Relu"]]
    return (*op_types, "Add") if joins else op_types


def _quantize(src: Path, dst: Path, reader: CalibrationReader, config: Int8Config, exclude: list[str]) -> None:
    quantize_static(
        str(src),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(config.op_types),
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=_ACTIVATIONS[config.activation_type],
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude or None,
        calibrate_method=_CALIBRATIONS[config.calibration],
    )


def top1_agreement(
    fp32_path: Path | str, int8_path: Path | str, x: np.ndarray, params: Mapping[str, np.ndarray], alpha: float = 0.0
) -> float:
    """Fraction of samples of ``x`` whose int8 and fp32 top-1 predictions agree (batches of 256)."""
    sessions = [ort_session(fp32_path), ort_session(int8_path)]
    agree = 0
    for i in range(0, len(x), 256):
        feeds = graph_feeds(x[i : i + 256], params, alpha)
        ref, got = (s.run(["logits"], feeds)[0].argmax(1) for s in sessions)
        agree += int((ref == got).sum())
    return agree / len(x)


def _verify_agreement(
    fp32_path: Path, int8_path: Path, x: np.ndarray, params: Mapping[str, np.ndarray], minimum: float
) -> float:
    agreement = top1_agreement(fp32_path, int8_path, x, params)
    if agreement < minimum:
        raise Int8AgreementError(
            f"{int8_path.name}: int8/fp32 top-1 agreement {agreement:.4f} on {len(x)} samples is below {minimum}"
        )
    return agreement


def _same_samples(eval_x: np.ndarray, calib: np.ndarray) -> np.ndarray:
    """``eval_x`` checked like the calibration samples and against their sample shape."""
    checked = check_images(eval_x, "eval_x")
    if checked.shape[1:] != calib.shape[1:]:
        raise ValueError(f"eval_x has sample shape {checked.shape[1:]}, calibration_x has {calib.shape[1:]}")
    return checked


def quantize_int8(
    fp32_path: Path | str,
    int8_path: Path | str,
    calibration_x: np.ndarray,
    params: Mapping[str, np.ndarray],
    config: Int8Config | None = None,
    eval_x: np.ndarray | None = None,
) -> QuantizationReport:
    """Quantize the adaptable graph at ``fp32_path`` into ``int8_path`` and verify it.

    Calibrates on (at most ``config.max_samples`` of) ``calibration_x`` fed with ``params`` and α = 0, then
    checks top-1 agreement with fp32 on the calibration samples plus ``eval_x``; raises
    :class:`Int8AgreementError` below ``config.min_agreement``.
    """
    config = config or Int8Config()
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    calib = check_images(calibration_x, "calibration_x")[: config.max_samples]
    if config.calibration != "minmax" and len(calib) > config.batch_size:
        # onnxruntime's histogram collectors stack every batch of a tensor: batches must be the same size
        calib = calib[: len(calib) // config.batch_size * config.batch_size]
    held_out = None if eval_x is None else _same_samples(eval_x, calib)
    reader = CalibrationReader(calib, params, config.batch_size)
    with tempfile.TemporaryDirectory(prefix="edgeloop-quant-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        preprocessed = config.preprocess and _preprocess(fp32_path, pre)
        src = pre if preprocessed else fp32_path
        chatter = io.StringIO()  # the histogram calibrators print progress to stdout
        pad, exclude, pooled = _stem_plan(src, config)
        padded: list[tuple[str, int, int]] = []
        if pad:
            model = onnx.load(str(src))
            padded = pad_input_channels(model, set(pad))
            src = Path(tmp) / "padded.onnx"
            onnx.save(model, str(src))
        op_types = residual_op_types(src, config.op_types)
        with contextlib.redirect_stdout(chatter):
            _quantize(src, int8_path, reader, replace(config, op_types=op_types), exclude)
        logger.debug("quantize_static output: %s", chatter.getvalue().strip())
    folded = False
    if padded:
        quantized = onnx.load(str(int8_path))
        folded = fold_input_normalisation(quantized)
        if folded:
            onnx.save(quantized, str(int8_path))
    onnx.checker.check_model(str(int8_path))
    check = calib if held_out is None else np.concatenate([calib, held_out])
    agreement = _verify_agreement(fp32_path, int8_path, check, params, config.min_agreement)
    logger.info("quantized %s: %s calibration on %d samples, agreement %.4f", int8_path.name,
                config.calibration, len(calib), agreement)
    return QuantizationReport(
        config.calibration, len(calib), config.per_channel, config.activation_type, agreement, len(check),
        preprocessed, config.float_convs_below_channels, op_types, (_PROPAGATION,) if pooled else (),
        tuple(padded), folded,
    )
