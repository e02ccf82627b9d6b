"""The adaptable graph: BatchNorm with fed reference statistics, affine and an α mix with batch statistics.

Every exporter folds BatchNorm into the preceding convolution, which removes what test-time adaptation
changes. Here each ``BatchNorm2d`` is replaced, for one call, by

    μ = (1-α)·μ_ref + α·μ_batch,  σ² = (1-α)·σ²_ref + α·σ²_batch,  y = (z-μ)/√(σ²+ε)·γ + β

(Schneider et al. 2020, "Improving robustness against common corruptions by covariate shift adaptation",
Eq. 3; α = 0 is eval-mode BN, α = 1 train-mode BN), with γ, β, μ_ref, σ²_ref and α given as tensors, and
the batch statistics returned. The same function serves ONNX export (as graph inputs/outputs) and the
server's distillation, so both compute exactly what the device computes.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from runtime.checks import require_optional_int

PARAM_KINDS = ("weight", "bias", "mean", "var")


@dataclass(frozen=True)
class NormLayer:
    """One adaptable normalisation layer: its graph name, module path and channel count."""

    name: str
    module_path: str
    channels: int
    eps: float

    def param(self, kind: str) -> str:
        """Graph input name of ``kind`` (weight, bias, mean, var) for this layer."""
        return f"{self.name}.{kind}"


def norm_layers(model: nn.Module) -> list[NormLayer]:
    """The model's ``BatchNorm2d`` layers in registration order, named ``bn1``, ``bn2``, …"""
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer to adapt")
    return [
        NormLayer(f"bn{i + 1}", path, int(m.num_features), float(m.eps)) for i, (path, m) in enumerate(found)
    ]


def source_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained values of every adaptable parameter (γ, β, running mean and variance), detached."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for layer in norm_layers(model):
        bn = modules[layer.module_path]
        out[layer.param("weight")] = bn.weight.detach().clone()
        out[layer.param("bias")] = bn.bias.detach().clone()
        out[layer.param("mean")] = bn.running_mean.detach().clone()
        out[layer.param("var")] = bn.running_var.detach().clone()
    return out


def _mixed_norm(
    z: torch.Tensor, p: Mapping[str, torch.Tensor], layer: NormLayer, alpha: torch.Tensor,
    stats_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sample = z if stats_samples is None else z[:stats_samples]
    batch_mean = sample.mean(dim=(0, 2, 3))
    batch_var = (sample - batch_mean.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
    mean = (1 - alpha) * p[layer.param("mean")] + alpha * batch_mean
    var = (1 - alpha) * p[layer.param("var")] + alpha * batch_var
    scale = p[layer.param("weight")] * torch.rsqrt(var + layer.eps)
    shift = p[layer.param("bias")] - mean * scale
    return z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), batch_mean, batch_var


NormFn = Callable[
    [torch.Tensor, Mapping[str, torch.Tensor], NormLayer, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]
"""``(z, params, layer, alpha) -> (y, batch_mean, batch_var)``: one α-mixed normalisation layer."""


@contextmanager
def _patched_norms(
    model: nn.Module, params: Mapping[str, torch.Tensor], alpha: torch.Tensor,
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]], norm: NormFn = _mixed_norm,
) -> Iterator[None]:
    modules = dict(model.named_modules())
    layers = norm_layers(model)
    missing = [layer.param(k) for layer in layers for k in PARAM_KINDS if layer.param(k) not in params]
    if missing:
        raise KeyError(f"adaptable parameters missing: {missing}")
    patched = []
    for layer in layers:
        bn = modules[layer.module_path]

        def forward(self: nn.Module, z: torch.Tensor, _layer: NormLayer = layer) -> torch.Tensor:
            y, bm, bv = norm(z, params, _layer, alpha)
            if _layer.name in stats:
                raise RuntimeError(f"normalisation layer {_layer.module_path} ran twice in one forward pass")
            stats[_layer.name] = (bm, bv)
            return y

        bn.forward = types.MethodType(forward, bn)  # type: ignore[method-assign]
        patched.append(bn)
    try:
        yield
    finally:
        for bn in patched:
            del bn.forward


def functional_forward(
    model: nn.Module, x: torch.Tensor, params: Mapping[str, torch.Tensor], alpha: torch.Tensor | float,
    stats_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Run ``model`` with α-mixed normalisation; return ``(logits, features, [mean1, var1, mean2, …])``.

    ``params`` maps ``bnK.weight|bias|mean|var`` to tensors; gradients flow to any that require them.
    ``stats_samples=k`` takes the batch statistics from the first k samples only (what a lean ONNX graph
    built with ``LeanOptions(stats_samples=k)`` computes). Not thread-safe for one model object: the BN
    modules are patched for the duration of the call.
    """
    if require_optional_int("stats_samples", stats_samples, 1) is None:
        return forward_with_norm(model, x, params, alpha, _mixed_norm)
    return forward_with_norm(model, x, params, alpha, functools.partial(_mixed_norm, stats_samples=stats_samples))


def forward_with_norm(
    model: nn.Module, x: torch.Tensor, params: Mapping[str, torch.Tensor], alpha: torch.Tensor | float, norm: NormFn
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`functional_forward` with every ``BatchNorm2d`` computed by ``norm`` instead of the α-mix in torch.

    The ONNX exporter passes a marker function here (see :mod:`exporter.onnx_graph`); ``norm`` must compute the
    same values as the α-mix for the traced shapes to be right.
    """
    a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha), dtype=x.dtype)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with _patched_norms(model, params, a, stats, norm):
        features = model.forward_features(x)  # type: ignore[operator]
        logits = model.classifier(features)  # type: ignore[operator]
    missing = [layer.module_path for layer in norm_layers(model) if layer.name not in stats]
    if missing:
        raise RuntimeError(f"normalisation layers {missing} did not run in forward_features")
    ordered = [t for layer in norm_layers(model) for t in stats[layer.name]]
    return logits, features, ordered


class AdaptableGraph(nn.Module):
    """Export wrapper: ``forward(input, alpha, *params)`` → ``(logits, features, *batch_stats)``.

    Parameter order is :meth:`input_names` minus ``input`` and ``alpha``; outputs follow :meth:`output_names`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.layers = norm_layers(model)

    def param_names(self) -> list[str]:
        """Names of the parameter inputs, in order."""
        return [layer.param(k) for layer in self.layers for k in PARAM_KINDS]

    def input_names(self) -> list[str]:
        """Every graph input name, in order."""
        return ["input", "alpha", *self.param_names()]

    def output_names(self) -> list[str]:
        """Every graph output name, in order."""
        stats = [f"{layer.name}.batch_{k}" for layer in self.layers for k in ("mean", "var")]
        return ["logits", "features", *stats]

    def forward(self, x: torch.Tensor, alpha: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Adaptable forward over flat parameter tensors (see :meth:`param_names`)."""
        params = dict(zip(self.param_names(), flat, strict=True))
        logits, features, stats = functional_forward(self.model, x, params, alpha)
        return (logits, features, *stats)
