"""The lean adaptable ONNX graph: traced with one marker node per BatchNorm, then expanded by hand.

The torch-traced α-mix (:func:`exporter.adaptable.functional_forward`) becomes ~25 small nodes per layer,
computes the variance in a second pass over the activations and forces onnxruntime to convert every
convolution output out of its blocked NCHWc layout and back. Here the model is traced with every
``BatchNorm2d`` replaced by one ``edgeloop::AlphaNorm(z, γ, β, μ_ref, σ²_ref, α) -> (y, μ_b, σ²_b)`` marker,
and :func:`expand_alpha_norms` rewrites each marker into standard opset-17 nodes chosen for onnxruntime's
CPU kernels (same math and the same graph interface as :class:`exporter.adaptable.AdaptableGraph`):

* statistics in one pass per moment with kernels that read the blocked layout: ``GlobalAveragePool(z)`` and
  ``GlobalAveragePool(z·z)``, then a mean over the batch; σ²_b = max(E[z²] − E[z]², 0);
* the conditioning of E[z²] − E[z]² is kept by shifting z by a constant (the layer's source running mean,
  subtracted through the convolution's bias, which is free), so the moments are of z − μ_src;
* the mix and the normalisation as one ``BatchNormalization`` node fed the mixed mean and variance;
* ``BN → ReLU → MaxPool`` becomes ``MaxPool → BN → ReLU`` (4× fewer elements normalised) when every γ of the
  layer is ≥ 0, which an ``If`` on the fed γ checks at run time (a per-channel affine map with a
  non-negative scale commutes with max pooling; the other branch re-runs the convolution and computes the
  original order, so the blocked convolution output is never converted for it).

What stays, and why the graph is not as fast as the folded one (measured in ``benchmarks/adaptable_overhead.py``):
onnxruntime runs a convolution in its fast blocked layout only when its weights and bias are constant, and no
per-channel operation with run-time parameters runs in that layout. The fed normalisation therefore costs a
conversion out of the blocked layout, the normalisation, the ReLU (no longer fused into the convolution) and
a conversion back; the exact batch statistics cost one more read of z and one write and read of z². Folding
the fed scale into the convolution weights instead makes the weights run-time values: measured 1.3–2× slower
convolutions, more than the normalisation it saves. The rewrite is in :mod:`exporter.onnx_rewrite`.

The floor, and what was tried against it (onnxruntime 1.32, one thread, AVX-512 EPYC, MNIST SmallCNN and
CIFAR ResNet-8 with random weights; ratios to the folded graph in the same round, ranges over runs on a
shared 2-core machine, where memory-bound nodes suffer most from the neighbours' load):

* onnxruntime's nchwc transformer (``optimizer/nchwc_transformer.cc``) keeps a node blocked only for Conv with
  constant weights and bias, MaxPool/AveragePool/global pools, BatchNormalization with *constant* parameters
  (turned into a depthwise convolution), Relu/Sigmoid/Tanh, channel Concat, nearest Upsample, and
  Add/Sum/Mul whose inputs are all blocked with provably equal shapes (Add alone falls back to a 5-D reshape
  for unequal ones). A fed per-channel vector can enter the blocked layout only as a full-size blocked tensor,
  which costs more passes than the two conversions it would save. The statistics-free graph
  (``LeanOptions(statistics=False)``: the fed normalisation alone) is therefore the floor of any graph with
  run-time normalisation: 1.10–1.14× (SmallCNN), 1.17–1.28× (ResNet-8), at batch 64. Its ResNet-8 profile
  (kernel ms per batch of 64, folded 7.9): ReorderOutput 0.82, BatchNormalization 0.51, ReorderInput 0.42,
  Relu 0.31, residual Add 0.31. Exact statistics of the current batch add 0.30–0.40 (SmallCNN) and
  0.20–0.28 (ResNet-8): the default graph measures 1.42–1.55× and 1.42–1.48×, so the issue's 1.25× is out of
  reach with exact statistics and standard operators, by the statistics alone for SmallCNN and by the
  normalisation alone for ResNet-8 on a loaded machine.
* Not kept: E[z²] by ``GlobalLpPool(p=2)`` (one read, no z² tensor): 16.5× (onnxruntime's LpPool is a scalar
  loop); by ``ReduceSumSquare`` over (H, W): 2.2×. The moments from ``BatchNormalization(training_mode=1,
  momentum=0)`` (onnxruntime computes it, with the biased variance): the same cost as the two global pools.
  E[z] and E[z²] from ``LayerNormalization``'s per-(sample, channel) Mean and InvStdDev outputs over
  (N, C, H·W) rows (one read of z from memory, but a full write of its unused Y): ResNet-8 1.63× against 1.47×.
  A run-time depthwise 1×1 ``Conv`` in place of ``BatchNormalization`` (onnxruntime fuses the ReLU, and a
  residual ``Add`` as its sum input): within 1 % of BN → Add → ReLU, and it adds convolutions with run-time
  weights for the int8 pass. Statistics of a strided spatial subsample that stays blocked (``MaxPool`` kernel
  1, stride 2 or 4): SmallCNN 1.29 / 1.22×, ResNet-8 1.34 / 1.28×, but biased by aliasing with the feature
  maps' structure: per-channel variances off by 2 % (MNIST layer 1, stride 2) to 17 % (ResNet-8 after its
  stride-2 convolutions; 38 % at stride 4), and the device's α-BN lost 0.4–0.9 points on the MNIST
  severity-5 streams. The sign guard's ``If`` costs 1–4 % at batch 64 (an unguarded pool-first is wrong for
  γ < 0). Session options for the adaptable session alone: ``enable_mem_pattern`` 1–2 % faster for
  9–19 MiB more peak memory (:mod:`runtime.session` keeps it off); the nchwc transformer off: 1.9–2.0×.
* Kept: a ``GreaterOrEqual`` for the sign test (one node fewer per layer). Tried and reverted: one
  ``ReduceMean`` over (N, 1, 1) per moment instead of ``Flatten`` + a ``ReduceMean`` over axis 0 — 2 % faster
  at batch 1, but onnxruntime's reduction over the strided batch axis is its slow case: batch 64 1.04×
  (SmallCNN), 1.01× (ResNet-8) and 1.13× (the 8×8 digits CNN of ``benchmarks/bench_inference.py``) the
  flat form's time, interleaved in one process.
* Opt-in, ``LeanOptions(stats_samples=16)``: statistics of the first 16 samples, the rest of the batch as a
  second stream without statistics (:func:`exporter.onnx_rewrite.split_batch_statistics`; unbiased, unlike
  a spatial subsample). In one quiet run (ratio to folded; default lean / first 16 / statistics-free):
  SmallCNN batch 64 1.52 / 1.26 / 1.13×, batch 16 1.54 / 1.66 / 1.17×; ResNet-8 batch 64 1.47 / 1.35 /
  1.26×, batch 16 1.48 / 1.50 / 1.27× (other runs: 1.23–1.29 and 1.30–1.38 at batch 64). A batch of at most
  16 computes what the default graph computes, 2–8 % slower (the empty second stream's nodes still run;
  running that stream under an ``If`` on the batch size takes its convolutions out of the blocked layout
  unless their weights are copied into the branch, and measured no faster). The device's α-BN with it on the
  TTA benchmark's streams (256 images per corruption, batch 64, top-1 points against exact statistics):
  MNIST +0.2 / −1.5 (severity 5, shuffled / class-sorted), +0.1 / −0.9 (severity 3); CIFAR-10 −0.7 / +0.0,
  −0.9 / −0.4 (``--stream-accuracy``). Not the default: it changes what ``bnK.batch_*`` are, the TFLite
  graph computes exact statistics, and it reaches 1.25× for neither model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from exporter.adaptable import AdaptableGraph, NormLayer, forward_with_norm, source_params
from exporter.onnx_rewrite import (
    MARKER_DOMAIN,
    MARKER_OP,
    STATS_SAMPLES_KEY,
    GraphBuildError,
    LeanOptions,
    expand_alpha_norms,
    split_batch_statistics,
)

__all__ = [
    "MARKER_DOMAIN",
    "MARKER_OP",
    "OPSET",
    "STATS_SAMPLES_KEY",
    "GraphBuildError",
    "LeanOptions",
    "build_lean_adaptable",
    "expand_alpha_norms",
    "split_batch_statistics",
    "stats_samples_of",
    "trace_marked",
]

logger = logging.getLogger(__name__)

OPSET = 17  # exporter.onnx_export re-exports this


# -- tracing with markers -------------------------------------------------------------------------------------
class _AlphaNormMarker(torch.autograd.Function):
    """Computes the α-mix (for the traced shapes) and exports as one ``edgeloop::AlphaNorm`` node."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
        var: torch.Tensor, alpha: torch.Tensor, eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_mean = z.mean(dim=(0, 2, 3))
        batch_var = (z - batch_mean.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
        mix_mean = (1 - alpha) * mean + alpha * batch_mean
        mix_var = (1 - alpha) * var + alpha * batch_var
        scale = weight * torch.rsqrt(mix_var + eps)
        y = (z - mix_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        return y, batch_mean, batch_var

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, z, weight, bias, mean, var, alpha, eps: float
    ):
        """One custom-domain node with three outputs, typed like its inputs."""
        y, bm, bv = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", z, weight, bias, mean, var, alpha, eps_f=eps, outputs=3)
        y.setType(z.type())
        bm.setType(mean.type())
        bv.setType(var.type())
        return y, bm, bv


def _marker_norm(
    z: torch.Tensor, p: Mapping[str, torch.Tensor], layer: NormLayer, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = [p[layer.param(k)] for k in ("weight", "bias", "mean", "var")]
    return _AlphaNormMarker.apply(z, *args, alpha, layer.eps)  # type: ignore[no-any-return]


class _MarkedGraph(AdaptableGraph):
    """:class:`AdaptableGraph` whose normalisation layers trace as markers (same inputs, outputs and names)."""

    def forward(self, x: torch.Tensor, alpha: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Adaptable forward with marker normalisation."""
        params = dict(zip(self.param_names(), flat, strict=True))
        logits, features, stats = forward_with_norm(self.model, x, params, alpha, _marker_norm)
        return (logits, features, *stats)


def trace_marked(model: nn.Module, path: Path, example: torch.Tensor) -> AdaptableGraph:
    """Export ``model`` with marker normalisation to ``path`` (legacy exporter, opset 17, dynamic batch)."""
    graph = _MarkedGraph(model)
    params = [p.float() for p in source_params(model).values()]
    args = (example.float(), torch.tensor(0.0), *params)
    dynamic = {name: {0: "batch"} for name in ("input", "logits", "features")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy.*")
        torch.onnx.export(
            graph, args, str(path), dynamo=False, opset_version=OPSET, input_names=graph.input_names(),
            output_names=graph.output_names(), dynamic_axes=dynamic, do_constant_folding=True,
            custom_opsets={MARKER_DOMAIN: 1},
        )
    return graph


def stats_samples_of(proto: onnx.ModelProto) -> int | None:
    """The k of a graph whose batch statistics come from its first k samples (:data:`STATS_SAMPLES_KEY`), else None."""
    value = next((p.value for p in proto.metadata_props if p.key == STATS_SAMPLES_KEY), None)
    return None if value is None else int(value)


def build_lean_adaptable(
    model: nn.Module, path: Path | str, example: torch.Tensor, options: LeanOptions | None = None
) -> AdaptableGraph:
    """Trace ``model`` with markers and write the expanded lean adaptable graph to ``path``."""
    path = Path(path)
    graph = trace_marked(model, path, example)
    proto = onnx.load(str(path))
    source = source_params(model)
    means = {layer.name: source[layer.param("mean")].numpy() for layer in graph.layers}
    expand_alpha_norms(proto, means, options)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    logger.debug("lean adaptable graph %s: %d layers, %d nodes", path.name, len(graph.layers), len(proto.graph.node))
    return graph
