"""TFLite export with litert-torch: the folded and the adaptable graph, fp32 or int8, with a parity check.

* **folded**: the eval-mode model; the converter folds BatchNorm into the convolutions. Inputs ``input``;
  outputs ``logits`` and, when the model has ``forward_features``/``classifier``, ``features``.
* **adaptable**: :class:`exporter.adaptable.AdaptableGraph`, the same interface as the ONNX export (inputs
  ``input``, ``alpha`` (a scalar, shape ``[]`` as in ONNX), ``bnK.weight|bias|mean|var``; outputs ``logits``,
  ``features``, ``bnK.batch_mean|batch_var``). Each normalisation is traced in a TFLite-specific form
  (:func:`tflite_norm`, the same values as the α-mix) that stays NHWC and runs in one XNNPACK partition: see
  there for what it changes and what each change measured. A ``BatchNorm2d → ReLU → MaxPool2d`` run in an
  ``nn.Sequential`` is traced pool-first (:func:`pooled_affine`: the per-channel scale before the pool, the
  shift and the ReLU on the pooled, 4× smaller tensor; exact for any sign of the fed γ; for a layer trained
  with every γ ≥ 0, the scale after the pool too, with that layer's ``weight`` in ``nonnegative_params``).

TFLite signature keys must be Python identifiers, so ``bn1.weight`` is exported as ``bn1_weight``; the
mapping (``io_names``) goes into the model's own metadata (read by :class:`runtime.litert.LiteRTSession`) and
into the report for the manifest. litert-torch exports static shapes only (batch 1 here): every ``RESHAPE``
whose target shape starts with the static batch gets ``-1`` there instead, so the model runs at any batch
after ``resize_tensor_input``; the parity check runs at batch 1 and at the full held-out batch to prove it.

Quantization (``int8_static``: PT2E, per-channel symmetric int8 weights, int8 activations calibrated with
histogram observers; ``int8_dynamic``: int8 weights, activations quantized at run time) runs in a child
process (``python -m exporter.tflite_export``): PT2E fails after two or more ``convert`` calls in one
process (DESIGN.md). The child gets a ``torch.export`` program file and the calibration inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.adaptable import AdaptableGraph, NormLayer, forward_with_norm, norm_layers, source_params
from exporter.onnx_export import ExportError, ExportParityError, torch_reference
from runtime.litert import IO_NAMES_METADATA, LiteRTSession

logger = logging.getLogger(__name__)

FORMS = ("folded", "adaptable")
QUANTIZATIONS = (None, "int8_static", "int8_dynamic")
FP32_ATOL = 1e-4
FP32_RTOL = 1e-3
INT8_MIN_AGREEMENT = 0.9
PARITY_ALPHAS = (0.0, 0.5)
QUANT_TIMEOUT_S = 600
CALIBRATION_MAX = 512
# litert-torch's layout pass: "GREEDY" keeps every op downstream of an NHWC conv in NHWC; its default min-cut
# partitioner counts transposes, not bytes, and moved the normalisation of every layer to NCHW (two full-size
# TRANSPOSEs per layer) because the fed parameters are NCHW graph inputs.
ADAPTABLE_PARTITIONER = "GREEDY"
_PARTITIONER_ENV = "LAYOUT_OPTIMIZE_PARTITIONER"  # read by litert_torch.config.layout_optimize_partitioner
_KEY = re.compile(r"[^0-9A-Za-z_]")


@dataclass(frozen=True)
class TFLiteParity:
    """Worst absolute difference per logical output, top-1 agreement of ``logits`` and what was compared."""

    max_abs_diff: dict[str, float]
    top1_agreement: float
    samples: int
    batch_sizes: tuple[int, ...]
    alphas: tuple[float, ...]


@dataclass(frozen=True)
class TFLiteExportReport:
    """What :func:`export_tflite` wrote and proved.

    ``io_names`` maps logical names to TFLite signature keys (``{"inputs": {...}, "outputs": {...}}``);
    ``quantization`` is the manifest's quantization block (None for fp32); ``nonnegative_params``: the
    adaptable inputs (normalisation scales ``bnK.weight``) the graph is exact for only when every value is
    ≥ 0 (see :func:`pooled_affine`), recorded in the manifest entry, where the runtime and the server enforce
    it.
    """

    path: Path
    form: str
    precision: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    io_names: dict[str, dict[str, str]]
    static_batch: int
    size_bytes: int
    parity: TFLiteParity
    quantization: dict[str, Any] | None
    nonnegative_params: tuple[str, ...] = ()

    def manifest_entry(self, name: str | None = None, file: str | None = None) -> dict[str, Any]:
        """A bundle manifest ``models`` entry for this file (``name`` defaults to the precision)."""
        entry: dict[str, Any] = {
            "name": name or self.precision, "file": file or self.path.name, "format": "tflite",
            "precision": self.precision, "graph": self.form, "io_names": self.io_names,
            "static_batch": self.static_batch, "batch_resizable": True,
            "parity": {"max_abs_diff": self.parity.max_abs_diff, "top1_agreement": self.parity.top1_agreement,
                       "samples": self.parity.samples},
        }
        if self.quantization is not None:
            entry["quantization"] = self.quantization
        if self.nonnegative_params:
            entry["nonnegative_params"] = list(self.nonnegative_params)
        return entry


def tflite_key(name: str) -> str:
    """The TFLite signature key of graph name ``name``: non-identifier characters become ``_``."""
    key = _KEY.sub("_", name)
    return key if key and not key[0].isdigit() else f"t_{key}"


class FoldedGraph(nn.Module):
    """Export wrapper of the eval-mode model: ``forward(input=x)`` → ``{"logits", "features"?}``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.has_features = callable(getattr(model, "forward_features", None)) and hasattr(model, "classifier")

    def input_names(self) -> list[str]:
        """Graph inputs."""
        return ["input"]

    def output_names(self) -> list[str]:
        """Graph outputs."""
        return ["logits", "features"] if self.has_features else ["logits"]

    def forward(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (and penultimate features) of ``feeds["input"]``."""
        x = feeds["input"]
        if not self.has_features:
            return {"logits": self.model(x)}
        features = self.model.forward_features(x)  # type: ignore[operator]
        return {"logits": self.model.classifier(features), "features": features}  # type: ignore[operator]


def _tile_channels(v: torch.Tensor, times: int) -> torch.Tensor:
    """``v`` (C,) repeated ``times`` times, (times·C,), by concatenation (delegated to XNNPACK, unlike the
    BROADCAST_TO that ``repeat`` lowers to; and not folded back into a broadcast by the converter)."""
    out = v
    while out.shape[0] < times * v.shape[0]:
        out = torch.cat([out, out])
    return out[: times * v.shape[0]]


def _norm_terms(
    z: torch.Tensor, p: Mapping[str, torch.Tensor], layer: NormLayer, alpha: torch.Tensor, centre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The centred activation ``z − c``, the per-channel (C,) scale and shift of ``y = (z − c)·scale + shift``
    and the batch statistics, as :func:`tflite_norm` documents."""
    zc = z - centre.view(1, -1, 1, 1)
    first = zc.mean(dim=2, keepdim=True).mean(dim=(0, 2, 3), keepdim=True).view(-1)
    second = (zc * zc).mean(dim=2, keepdim=True).mean(dim=(0, 2, 3), keepdim=True).view(-1)
    batch_var = torch.clamp(second - first * first, min=0.0)
    batch_mean = first + centre
    ref_mean, ref_var = p[layer.param("mean")], p[layer.param("var")]
    mean = ref_mean + alpha * (batch_mean - ref_mean)
    var = ref_var + alpha * (batch_var - ref_var)
    scale = p[layer.param("weight")] * torch.rsqrt(var + layer.eps)
    shift = p[layer.param("bias")] - (mean - centre) * scale
    return zc, scale, shift, batch_mean, batch_var


def _tiled(v: torch.Tensor, w: int) -> torch.Tensor:
    """Per-channel ``v`` (C,) as an NCHW (1, C, 1, W) broadcast operand (NHWC (1, 1, W, C) after the layout pass)."""
    c = v.shape[0]
    return _tile_channels(v, w).view(1, 1, w, c).permute(0, 3, 1, 2)


def tflite_norm(
    z: torch.Tensor, p: Mapping[str, torch.Tensor], layer: NormLayer, alpha: torch.Tensor, centre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The α-mixed normalisation of :func:`exporter.adaptable._mixed_norm`, in the form LiteRT runs fastest.

    ``centre`` is a constant (C,) near the batch mean (the layer's source running mean). Same values up to
    float rounding (the parity check proves it against the torch α-mix); four changes, each measured on the
    CIFAR ResNet-8 at batch 64, one thread, against the folded graph (1.33× before, 1.19× after):

    * **Statistics in one pass each, 4-D.** The moments ``E[z−c]`` and ``E[(z−c)²]`` with ``keepdim=True``,
      so the MEANs stay NHWC behind the convolution; σ² = max(E[(z−c)²] − E[z−c]², 0). Subtracting the
      constant ``c`` keeps that difference conditioned and costs nothing: the converter folds it into the
      convolution's bias (the ONNX graph does the same). The two-pass ``E[(z − E[z])²]`` costs one more
      full-size pass (1.25× folded instead of 1.19×, also as one SQUARED_DIFFERENCE).
    * **Each mean in two stages**, over H, then over (N, W): XNNPACK sums a MEAN sequentially in float32, and
      one sum over N·H·W terms, amplified by the cancellation in σ², missed the torch α-mix by up to 8e-4 on
      features of real MNIST (3e-4 on logits at α = 1); the first stage (contiguous W·C rows) is also faster.
    * **Per-channel parameters in 1-D**, one reshape at the end (fewer tiny ops).
    * **The affine broadcast over (W, C), not C.** XNNPACK runs ``z·s + b`` with an ``s`` of shape
      (1, 1, 1, C) one C-long row at a time; with 16 channels that doubled the cost of the affine. ``s`` and
      ``b`` are tiled to (1, 1, W, C) (as NCHW (1, C, 1, W)), which the layout pass turns into a plain
      reshape, so rows are W·C long.
    """
    zc, scale, shift, batch_mean, batch_var = _norm_terms(z, p, layer, alpha, centre)
    w = z.shape[3]
    return zc * _tiled(scale, w) + _tiled(shift, w), batch_mean, batch_var


def pooled_affine(
    z: torch.Tensor, p: Mapping[str, torch.Tensor], layer: NormLayer, alpha: torch.Tensor, centre: torch.Tensor,
    pool: nn.MaxPool2d, nonnegative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pool(relu(norm(z)))`` for a ``BatchNorm2d → ReLU → MaxPool2d`` run: :func:`tflite_norm`'s statistics,
    then ``relu(pool((z − c)·scale) + shift)``, or with ``nonnegative`` ``relu(pool(z − c)·scale + shift)``.

    The first is exact for any sign of the scale (of the fed γ): max pooling commutes with adding a
    per-channel constant, and the scale is applied *before* the pool, so a negative scale turns the pool's max
    into the min it has to be; the ReLU commutes with max. Against :func:`tflite_norm` followed by ReLU and
    the pool, the shift and the ReLU run on the pooled tensor (4× fewer elements for a 2×2 pool) and the
    convolution's full-size output goes through one full-size elementwise operator fewer (the ADD): on the
    MNIST SmallCNN at batch 64, one thread, α = 0.5, 1.35× → 1.27× folded in thread CPU time (1.41× → 1.29×
    wall clock), interleaved in one process. What is left per pooled layer beyond the folded graph is four
    full-size operators: the two moments (MEAN, MUL for the squares, MEAN) and the scale (MUL).

    ``nonnegative`` moves the scale after the pool as well, which is exact only while every fed γ of the
    layer is ≥ 0 (a non-negative per-channel scale commutes with max pooling): one full-size operator fewer,
    1.24× → 1.15× folded on the MNIST SmallCNN (batch 64 and 16, thread CPU time, interleaved). A TFLite
    graph has no branch XNNPACK runs (the ONNX graph tests min γ ≥ 0 in an ``If``), so the exporter takes
    this form only for layers whose trained γ are all ≥ 0 and records their ``weight`` in the model entry's
    ``nonnegative_params``: the runtime refuses a negative value there, the server refuses an update or a
    device submission with one and sets its own round results' negative values there to 0.
    BatchNorm scales stay far from 0 in practice (the smallest trained γ of the benchmarks' SmallCNN and
    ResNet-8 are 0.67 and 0.35), and α-BN, LAME and T3A never change them, FOA only multiplies them by
    exp(δ) and federated averages of non-negative scales are non-negative.
    """
    zc, scale, shift, batch_mean, batch_var = _norm_terms(z, p, layer, alpha, centre)
    if nonnegative:
        pooled = pool(zc)
        w = pooled.shape[3]
        return torch.relu(pooled * _tiled(scale, w) + _tiled(shift, w)), batch_mean, batch_var
    pooled = pool(zc * _tiled(scale, z.shape[3]))
    return torch.relu(pooled + _tiled(shift, pooled.shape[3])), batch_mean, batch_var


def _pool_first_runs(model: nn.Module) -> dict[str, nn.MaxPool2d]:
    """Replace the ReLU and MaxPool2d after each ``BatchNorm2d`` of an ``nn.Sequential`` by ``nn.Identity`` in
    ``model`` (edited in place); return the pool of each such BatchNorm by module path."""
    runs: dict[str, nn.MaxPool2d] = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (n0, bn), (n1, act), (n2, pool) in zip(children, children[1:], children[2:], strict=False):
            if (isinstance(bn, nn.BatchNorm2d) and type(act) is nn.ReLU and isinstance(pool, nn.MaxPool2d)
                    and not pool.return_indices):
                runs[f"{path}.{n0}" if path else n0] = pool
                setattr(module, n1, nn.Identity())
                setattr(module, n2, nn.Identity())
    return runs


class AdaptableKwargsGraph(nn.Module):
    """:class:`AdaptableGraph` with keyword inputs and dict outputs keyed by :func:`tflite_key` names.

    The normalisation layers are traced as :func:`tflite_norm`, centred on the model's running means; with
    ``pool_first`` (default), each ``BatchNorm2d → ReLU → MaxPool2d`` run of an ``nn.Sequential`` is traced as
    :func:`pooled_affine` on a copy of the model whose ReLU and pool there are identities.
    """

    def __init__(self, model: nn.Module, pool_first: bool = True) -> None:
        super().__init__()
        self.pools: dict[str, nn.MaxPool2d] = {}
        if pool_first:
            copied = copy.deepcopy(model)
            runs = _pool_first_runs(copied)
            if runs:
                model = copied
                names = {layer.module_path: layer.name for layer in norm_layers(model)}
                self.pools = {names[path]: pool for path, pool in runs.items()}
        self.adaptable = AdaptableGraph(model)  # not "graph": that name is taken in an fx.GraphModule
        sources = source_params(model)
        self.centres = {layer.name: sources[layer.param("mean")].float() for layer in self.adaptable.layers}
        # pooled layers whose trained scales are all >= 0 pool before the scale too (pooled_affine)
        self.nonnegative = {layer.name for layer in self.adaptable.layers if layer.name in self.pools
                            and bool((sources[layer.param("weight")] >= 0).all())}

    def nonnegative_params(self) -> tuple[str, ...]:
        """The inputs the graph needs ≥ 0 (the scales of the layers :func:`pooled_affine` pools first)."""
        return tuple(layer.param("weight") for layer in self.adaptable.layers if layer.name in self.nonnegative)

    def _norm(
        self, z: torch.Tensor, p: Mapping[str, torch.Tensor], layer: NormLayer, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pool = self.pools.get(layer.name)
        if pool is not None:
            return pooled_affine(z, p, layer, alpha, self.centres[layer.name], pool, layer.name in self.nonnegative)
        return tflite_norm(z, p, layer, alpha, self.centres[layer.name])

    def input_names(self) -> list[str]:
        """Graph inputs (logical names)."""
        return self.adaptable.input_names()

    def output_names(self) -> list[str]:
        """Graph outputs (logical names)."""
        return self.adaptable.output_names()

    def forward(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adaptable forward over keyword tensors."""
        params = {n: feeds[tflite_key(n)] for n in self.adaptable.param_names()}
        logits, features, stats = forward_with_norm(self.adaptable.model, feeds["input"], params, feeds["alpha"],
                                                    self._norm)
        outs = (logits, features, *stats)
        return {tflite_key(n): v for n, v in zip(self.adaptable.output_names(), outs, strict=True)}


def _wrapper(model: nn.Module, form: str) -> FoldedGraph | AdaptableKwargsGraph:
    return FoldedGraph(model) if form == "folded" else AdaptableKwargsGraph(model)


def _sample_feeds(model: nn.Module, form: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword sample inputs (by TFLite key): the batch and, for the adaptable graph, α = 0 and the params."""
    feeds = {"input": x.float()}
    if form == "adaptable":
        feeds["alpha"] = torch.tensor(0.0)
        feeds.update({tflite_key(k): v.float() for k, v in source_params(model).items()})
    return feeds


def _io_names(wrapper: FoldedGraph | AdaptableKwargsGraph) -> dict[str, dict[str, str]]:
    return {"inputs": {n: tflite_key(n) for n in wrapper.input_names()},
            "outputs": {n: tflite_key(n) for n in wrapper.output_names()}}


def finalize_flatbuffer(model: bytes, static_batch: int, metadata: Mapping[str, bytes]) -> tuple[bytes, int]:
    """Make ``model`` batch-resizable and attach ``metadata``; return the new bytes and the RESHAPEs patched.

    Every constant RESHAPE target whose first entry is ``static_batch`` (and has no ``-1``) gets ``-1``
    there, which leaves the model's results at ``static_batch`` unchanged (the inferred size is the same)
    and lets the batch follow the input. Existing metadata entries of the same names are replaced.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    root = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    patched = 0
    seen: set[int] = set()
    for sub in root.subgraphs or []:
        for op in sub.operators or []:
            code = root.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.RESHAPE:
                continue
            if op.inputs is None or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            shape_tensor = sub.tensors[op.inputs[1]]
            buffer = root.buffers[shape_tensor.buffer]
            if buffer.data is None or len(buffer.data) == 0 or shape_tensor.type != schema.TensorType.INT32:
                continue
            target = np.frombuffer(bytes(bytearray(buffer.data)), dtype=np.int32).copy()
            if shape_tensor.buffer not in seen and target.size and target[0] == static_batch and -1 not in target:
                target[0] = -1
                buffer.data = np.frombuffer(target.tobytes(), dtype=np.uint8)
                seen.add(shape_tensor.buffer)
            if isinstance(op.builtinOptions, schema.ReshapeOptionsT) and op.builtinOptions.newShape is not None:
                op.builtinOptions.newShape = target.tolist()
            patched += int(shape_tensor.buffer in seen)
    _set_metadata(root, schema, metadata)
    builder = flatbuffers.Builder(len(model) + 4096)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), patched


def _set_metadata(root: Any, schema: Any, metadata: Mapping[str, bytes]) -> None:
    entries = [m for m in (root.metadata or []) if (m.name or b"").decode() not in metadata]
    for name, data in metadata.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, dtype=np.uint8)
        root.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(root.buffers) - 1
        entries.append(entry)
    root.metadata = entries


def _partitioner_env(form: str) -> dict[str, str]:
    """Environment overrides for converting ``form``: the adaptable graph uses :data:`ADAPTABLE_PARTITIONER`."""
    return {_PARTITIONER_ENV: ADAPTABLE_PARTITIONER} if form == "adaptable" else {}


@contextmanager
def _environ(overrides: Mapping[str, str]) -> Iterator[None]:
    """Set ``overrides`` in ``os.environ`` for the duration (litert-torch reads its config from there)."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _convert_fp32(wrapper: nn.Module, feeds: dict[str, torch.Tensor], form: str = "folded") -> bytes:
    import litert_torch

    with _environ(_partitioner_env(form)):
        return bytes(litert_torch.convert(wrapper.eval(), sample_kwargs=feeds).model_content())


def _convert_quantized(
    wrapper: nn.Module, feeds: dict[str, torch.Tensor], mode: str, calibration_x: np.ndarray | None,
    form: str = "folded",
) -> bytes:
    """Run PT2E quantization and conversion in a child process; return the TFLite bytes."""
    with tempfile.TemporaryDirectory(prefix="edgeloop-tflite-q-") as tmp:
        program, data, out = Path(tmp) / "program.pt2", Path(tmp) / "calibration.npz", Path(tmp) / "model.tflite"
        with torch.no_grad():
            torch.export.save(torch.export.export(wrapper.eval(), (), feeds), str(program))
        cal = np.zeros((0, *feeds["input"].shape[1:]), np.float32) if calibration_x is None else calibration_x
        np.savez(data, calibration=np.asarray(cal[:CALIBRATION_MAX], np.float32),
                 **{f"feed/{k}": v.numpy() for k, v in feeds.items()})
        cmd = [sys.executable, "-m", "exporter.tflite_export", "--program", str(program), "--data", str(data),
               "--mode", mode, "--out", str(out)]
        path = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, **_partitioner_env(form), "PYTHONPATH": path}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=QUANT_TIMEOUT_S, env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ExportError(f"{mode} quantization timed out after {QUANT_TIMEOUT_S} s") from exc
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise ExportError(f"{mode} quantization failed in its subprocess (exit {proc.returncode}):\n{tail}")
        return out.read_bytes()


def _quantize_child(program: Path, data: Path, mode: str, out: Path) -> None:
    """The child process's work: prepare, calibrate (one sample at a time: the program's batch is static),
    convert with PT2E and write the TFLite file."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    torch.set_num_threads(1)
    arrays = np.load(data)
    feeds = {k.split("/", 1)[1]: torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith("feed/")}
    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=mode == "int8_dynamic")
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(config)
    module = quantize_pt2e.prepare_pt2e(torch.export.load(str(program)).module(), quantizer)
    calibration = arrays["calibration"]
    with torch.no_grad():
        for i in range(max(len(calibration), 1)):
            sample = torch.from_numpy(calibration[i : i + 1]) if len(calibration) else feeds["input"]
            module(**{**feeds, "input": sample})
        module = quantize_pt2e.convert_pt2e(module, fold_quantize=False)
        edge = litert_torch.convert(module, sample_kwargs=feeds,
                                    quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
    out.write_bytes(bytes(edge.model_content()))


def _torch_outputs(model: nn.Module, form: str, x: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    if form == "adaptable":
        params = {k: v.numpy() for k, v in source_params(model).items()}
        return torch_reference(model, x, params, alpha)
    wrapper = FoldedGraph(model)
    with torch.no_grad():
        return {k: v.numpy() for k, v in wrapper(input=torch.from_numpy(np.asarray(x, np.float32))).items()}


def _session_feeds(model: nn.Module, form: str, x: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    feeds = {"input": np.ascontiguousarray(x, dtype=np.float32)}
    if form == "adaptable":
        feeds["alpha"] = np.asarray(alpha, np.float32)
        feeds.update({k: v.numpy().astype(np.float32) for k, v in source_params(model).items()})
    return feeds


def check_tflite_parity(
    model: nn.Module,
    path: Path | str,
    form: str,
    x: np.ndarray,
    *,
    atol: float | None = FP32_ATOL,
    rtol: float = FP32_RTOL,
    min_agreement: float = 0.0,
    threads: int | None = 1,
) -> TFLiteParity:
    """Compare the TFLite file with torch on ``x`` at batch 1 and at batch ``len(x)`` (after resizing).

    ``atol=None`` skips the elementwise bound (quantized models): then only the top-1 agreement of
    ``logits`` must reach ``min_agreement``. Raises :class:`ExportParityError` naming output, batch and α.
    """
    session = LiteRTSession(path, threads)
    alphas = PARITY_ALPHAS if form == "adaptable" else (0.0,)
    batches = tuple(sorted({1, len(x)}))
    worst: dict[str, float] = {}
    agree: list[float] = []
    for alpha in alphas:
        for batch in batches:
            xb = x[:batch]
            got = session.run(_session_feeds(model, form, xb, alpha))
            ref = _torch_outputs(model, form, xb, alpha)
            for name, expected in ref.items():
                diff = np.abs(got[name].astype(np.float64) - expected)
                worst[name] = max(worst.get(name, 0.0), float(diff.max()))
                if atol is not None and np.any(diff > atol + rtol * np.abs(expected)):
                    raise ExportParityError(
                        f"{Path(path).name}: output {name!r} at batch {batch}, alpha={alpha} differs from torch "
                        f"by max |diff| {float(diff.max()):.3e} (atol {atol:g}, rtol {rtol:g})"
                    )
            if batch == len(x):
                agree.append(float((got["logits"].argmax(1) == ref["logits"].argmax(1)).mean()))
    agreement = float(np.mean(agree))
    if agreement < min_agreement:
        raise ExportParityError(
            f"{Path(path).name}: top-1 agreement with torch {agreement:.4f} is below {min_agreement:.4f}"
        )
    return TFLiteParity(worst, agreement, len(x), batches, tuple(float(a) for a in alphas))


def _check_args(form: str, quantization: str | None, example: torch.Tensor, calibration_x: Any) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if example.ndim != 4 or example.shape[0] != 1:
        raise ValueError(f"example must be one (1, C, H, W) sample, got shape {tuple(example.shape)}")
    if quantization == "int8_static" and (calibration_x is None or len(calibration_x) == 0):
        raise ValueError("int8_static quantization needs calibration_x (real samples)")


def export_tflite(
    model: nn.Module,
    path: Path | str,
    *,
    form: str = "folded",
    example: torch.Tensor,
    quantization: str | None = None,
    calibration_x: np.ndarray | None = None,
    parity_x: np.ndarray | None = None,
    atol: float = FP32_ATOL,
    rtol: float = FP32_RTOL,
    min_agreement: float = INT8_MIN_AGREEMENT,
) -> TFLiteExportReport:
    """Convert ``model`` to ``path`` (TFLite) in ``form`` (folded | adaptable) and check it against torch.

    ``example``: one (1, C, H, W) sample (the converted batch is static 1 and resizable); ``quantization``:
    None | "int8_static" (needs ``calibration_x``, up to 512 samples, [0, 1] NCHW) | "int8_dynamic";
    ``parity_x``: held-out inputs (default ``example``), compared at batch 1 and ``len(parity_x)``: fp32
    within ``atol + rtol·|torch|`` on every output, int8 by top-1 agreement ≥ ``min_agreement``.
    Raises :class:`ExportParityError` (out of tolerance) or :class:`ExportError` (conversion failed).
    """
    _check_args(form, quantization, example, calibration_x)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    wrapper = _wrapper(model, form)
    feeds = _sample_feeds(model, form, example.detach().cpu())
    io_names = _io_names(wrapper)
    if quantization is None:
        raw = _convert_fp32(wrapper, feeds, form)
    else:
        raw = _convert_quantized(wrapper, feeds, quantization, calibration_x, form)
    data, patched = finalize_flatbuffer(raw, 1, {IO_NAMES_METADATA: json.dumps(io_names).encode()})
    path.write_bytes(data)
    x = example.detach().cpu().numpy() if parity_x is None else np.asarray(parity_x, np.float32)
    fp32 = quantization is None
    parity = check_tflite_parity(model, path, form, x, atol=atol if fp32 else None, rtol=rtol,
                                 min_agreement=min_agreement if not fp32 else 0.0)
    logger.info("exported %s (%s, %s, %d RESHAPEs made batch-free): top-1 agreement %.4f, max |diff| %s",
                path.name, form, quantization or "fp32", patched, parity.top1_agreement,
                {k: f"{v:.2e}" for k, v in parity.max_abs_diff.items()})
    return TFLiteExportReport(
        path=path, form=form, precision="fp32" if fp32 else "int8", input_names=tuple(wrapper.input_names()),
        output_names=tuple(wrapper.output_names()), io_names=io_names, static_batch=1,
        size_bytes=len(data), parity=parity, quantization=_quant_block(quantization, calibration_x),
        nonnegative_params=wrapper.nonnegative_params() if isinstance(wrapper, AdaptableKwargsGraph) else (),
    )


def _quant_block(quantization: str | None, calibration_x: np.ndarray | None) -> dict[str, Any] | None:
    if quantization is None:
        return None
    static = quantization == "int8_static"
    return {
        "method": f"litert_torch_pt2e_{'static' if static else 'dynamic'}", "per_channel": True,
        "weights": "int8 symmetric", "activations": "int8 (histogram calibration)" if static else "float",
        "calibration": "histogram" if static else None,
        "samples": int(min(len(calibration_x), CALIBRATION_MAX)) if static and calibration_x is not None else 0,
    }


def report_dict(report: TFLiteExportReport) -> dict[str, Any]:
    """A JSON-ready dict of ``report``."""
    out = asdict(report)
    out["path"] = str(report.path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of the quantization child process (see :func:`_convert_quantized`)."""
    parser = argparse.ArgumentParser(description="PT2E int8 quantization + litert-torch conversion (child)")
    parser.add_argument("--program", type=Path, required=True, help="torch.export program (.pt2)")
    parser.add_argument("--data", type=Path, required=True, help="npz with calibration and feed/<key> arrays")
    parser.add_argument("--mode", choices=[q for q in QUANTIZATIONS if q], required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the .tflite file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _quantize_child(args.program, args.data, args.mode, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
