"""Low-rank factorization of ``nn.Linear`` and ``nn.Conv2d`` by truncated SVD.

A weight viewed as a matrix ``W`` (``(out, in)``; convolutions as ``(C_out, C_in·kh·kw)``) is replaced by its
best rank-r approximation (Eckart & Young 1936) ``W ≈ U_r Σ_r V_rᵀ = (U_r Σ_r^½)(Σ_r^½ V_rᵀ)``, split evenly so
both factors have the same scale (as in Denton et al. 2014, "Exploiting Linear Structure Within Convolutional
Networks for Efficient Evaluation"):

* ``Linear(in, out)`` → ``Sequential(Linear(in, r, bias=False), Linear(r, out))``;
* ``Conv2d(C_in, C_out, k)`` → ``Sequential(Conv2d(C_in, r, k, stride, padding, dilation, bias=False),
  Conv2d(r, C_out, 1))`` (the "spatial then 1×1" scheme of Zhang et al. 2016, "Accelerating Very Deep
  Convolutional Networks for Classification and Detection", without its nonlinear refinement).

Ranks are chosen per layer by an energy threshold (the smallest r with ``Σ_{i≤r} σ_i² / Σ σ_i² ≥ energy``) or
by a global budget: the factorized layers together keep at most ``budget`` × their original weight count,
ranks grown greedily by the largest gain in retained (per-layer normalized) energy per added parameter. A
layer whose factorization would not reduce its parameters stays as it is and is recorded under ``skipped``.
BatchNorm layers are not touched, so :func:`exporter.adaptable.norm_layers` is unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.compress.base import (
    CompressionError,
    CompressionPass,
    UnsupportedLayerError,
    finite_fraction,
    parent_and_name,
    register_pass,
    select_layers,
    validate_exclude,
)
from runtime.checks import require_int


@dataclass(frozen=True)
class LowRankConfig:
    """Options of :class:`LowRank`: exactly one of ``energy`` (per-layer threshold in (0, 1]) and ``budget``
    (fraction in (0, 1] of the targeted layers' weight count); neither given means ``energy=0.95``.
    ``rank_multiple`` rounds every rank up to a multiple (use M when an N:M pass follows, so the second
    factor's input width stays divisible by M); ``exclude`` lists module-path globs left dense."""

    energy: float | None = None
    budget: float | None = None
    rank_multiple: int = 1
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.energy is not None and self.budget is not None:
            raise ValueError(f"give either energy or budget, not both (energy={self.energy}, budget={self.budget})")
        if self.energy is None and self.budget is None:
            object.__setattr__(self, "energy", 0.95)
        if self.energy is not None:
            object.__setattr__(self, "energy", finite_fraction(self.energy, "energy"))
        if self.budget is not None:
            object.__setattr__(self, "budget", finite_fraction(self.budget, "budget"))
        object.__setattr__(self, "rank_multiple", require_int("rank_multiple", self.rank_multiple, 1))
        object.__setattr__(self, "exclude", validate_exclude(self.exclude))

    @classmethod
    def from_string(cls, text: str, **options: Any) -> LowRankConfig:
        """Build from ``"energy=0.95"`` or ``"budget=0.5"`` (the CLI's ``--low-rank`` value)."""
        match = re.fullmatch(r"\s*(energy|budget)\s*=\s*([0-9.eE+-]+)\s*", text)
        try:
            value = float(match.group(2)) if match is not None else None
        except ValueError:
            value = None
        if match is None or value is None:
            raise ValueError(f"low-rank spec must look like 'energy=0.95' or 'budget=0.5', got {text!r}")
        return cls(**{match.group(1): value}, **options)


@dataclass
class _Layer:
    """SVD of one target layer and the rank chosen for it (``rank == full`` means: keep it dense)."""

    path: str
    module: nn.Module
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    rank: int = 0

    def __post_init__(self) -> None:
        e = (self.s.double() ** 2).numpy()
        total = float(e.sum())
        self.cumulative = np.cumsum(e) / total if total > 0 else np.ones_like(e)

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.vh.shape[1]

    @property
    def full(self) -> int:
        return int(self.s.numel())

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def params(self, rank: int) -> int:
        """Weight count at ``rank`` (dense when factorizing would not be smaller)."""
        factored = rank * (self.shape[0] + self.shape[1])
        return factored if rank < self.full and factored < self.dense_params else self.dense_params

    def factored(self, rank: int) -> bool:
        return self.params(rank) < self.dense_params

    def energy(self, rank: int) -> float:
        """Fraction of ``Σσ²`` kept at ``rank`` (1 when the layer stays dense)."""
        return float(self.cumulative[rank - 1]) if self.factored(rank) else 1.0


def _matrix(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().double()
    return w.reshape(w.shape[0], -1)


def _round_up(rank: int, multiple: int, full: int) -> int:
    return min(max(multiple, math.ceil(rank / multiple) * multiple), full)


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r with ``Σ_{i≤r} σ_i² ≥ energy · Σ σ_i²`` (1 for an all-zero spectrum)."""
    e = s.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 1
    cumulative = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor([energy - 1e-12], dtype=torch.float64))[0]) + 1


def _greedy_budget(layers: list[_Layer], budget: float, multiple: int) -> None:
    """Grow ranks (steps of ``multiple``) by the largest energy gain per added parameter within the budget."""
    allowed = budget * sum(layer.dense_params for layer in layers)
    for layer in layers:
        layer.rank = min(multiple, layer.full)
    used = sum(layer.params(layer.rank) for layer in layers)
    if used > allowed:
        raise ValueError(f"low-rank budget {budget} allows {allowed:.0f} weights, but rank {multiple} everywhere "
                         f"already needs {used}; raise the budget or exclude layers")
    while True:
        best: tuple[float, _Layer, int] | None = None
        for layer in layers:
            if not layer.factored(layer.rank):
                continue
            nxt = min(layer.rank + multiple, layer.full)
            cost = layer.params(nxt) - layer.params(layer.rank)
            gain = layer.energy(nxt) - layer.energy(layer.rank)
            if used + cost > allowed:
                continue
            score = math.inf if cost <= 0 else gain / cost
            if best is None or score > best[0]:
                best = (score, layer, nxt)
        if best is None:
            return
        _, layer, nxt = best
        used += layer.params(nxt) - layer.params(layer.rank)
        layer.rank = nxt


def _refuse_tied(
    model: nn.Module, pass_name: str, targets: dict[str, nn.Module], aliases: dict[str, tuple[str, ...]]
) -> None:
    """Raise :class:`UnsupportedLayerError` for a target whose weight or bias is the same ``nn.Parameter`` as
    another module's (tied weights): factorizing replaces the parameter, which would untie them."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rpartition(".")[0])
    for path, module in targets.items():
        own = {path, *aliases.get(path, ())}
        for name, param in module.named_parameters(recurse=False):
            others = [p or "<root>" for p in dict.fromkeys(owners[id(param)]) if p not in own]
            if others:
                raise UnsupportedLayerError(
                    pass_name, path, type(module).__name__,
                    f"its {name} is tied to {', '.join(map(repr, others))} (the same nn.Parameter), and "
                    "factorizing would untie them; exclude every layer sharing it", others)


def _factors(layer: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` factor matrices ``(r, in)`` and ``(out, r)`` with ``√Σ`` on both sides."""
    r = layer.rank
    root = layer.s[:r].sqrt()
    return root[:, None] * layer.vh[:r], layer.u[:, :r] * root[None, :]


def _factorized(layer: _Layer) -> nn.Sequential:
    m = layer.module
    first_w, second_w = _factors(layer)
    r = layer.rank
    if isinstance(m, nn.Linear):
        first: nn.Module = nn.Linear(m.in_features, r, bias=False)
        second: nn.Module = nn.Linear(r, m.out_features, bias=m.bias is not None)
    else:
        first = nn.Conv2d(m.in_channels, r, m.kernel_size, stride=m.stride, padding=m.padding,
                          dilation=m.dilation, bias=False, padding_mode=m.padding_mode)
        second = nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None)
    kind = {"device": m.weight.device, "dtype": m.weight.dtype}
    first, second = first.to(**kind), second.to(**kind)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(first.weight.shape))
        second.weight.copy_(second_w.reshape(second.weight.shape))
        if m.bias is not None:
            second.bias.copy_(m.bias)
    return nn.Sequential(first, second).train(m.training)


@register_pass
class LowRank(CompressionPass):
    """SVD low-rank factorization pass (see the module docstring). Config: :class:`LowRankConfig`."""

    name = "low_rank"
    order = 0
    config_type = LowRankConfig

    def __init__(self, config: LowRankConfig | None = None) -> None:
        super().__init__(config or LowRankConfig())
        self.config: LowRankConfig
        self.layers: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.dense_kept = 0

    def _analyse(self, model: nn.Module) -> list[_Layer]:
        selection = select_layers(model, self.name, (nn.Linear, nn.Conv2d), self.config.exclude)
        grouped = [(p, m) for p, m in selection.targets.items() if isinstance(m, nn.Conv2d) and m.groups != 1]
        if grouped:
            path, module = grouped[0]
            raise UnsupportedLayerError(self.name, path, "Conv2d", f"grouped convolution (groups={module.groups})",
                                        [p for p, _ in grouped[1:]])
        _refuse_tied(model, self.name, selection.targets, selection.aliases)
        self.excluded = selection.excluded
        self.aliases = selection.aliases
        layers = []
        for path, module in selection.targets.items():
            u, s, vh = torch.linalg.svd(_matrix(module), full_matrices=False)
            layers.append(_Layer(path, module, u, s, vh))
        return layers

    def _choose_ranks(self, layers: list[_Layer]) -> None:
        multiple = self.config.rank_multiple
        if self.config.budget is not None:
            _greedy_budget(layers, self.config.budget, multiple)
            return
        for layer in layers:
            layer.rank = _round_up(energy_rank(layer.s, float(self.config.energy)), multiple, layer.full)

    def _prepare(self, model: nn.Module) -> nn.Module:
        layers = self._analyse(model)
        self._choose_ranks(layers)
        for layer in layers:
            kind = type(layer.module).__name__
            if not layer.factored(layer.rank):
                self.skipped[layer.path] = (f"rank {layer.rank} of {layer.full} would not reduce its "
                                            f"{layer.dense_params} weights")
                self.dense_kept += layer.dense_params
                continue
            factorized = _factorized(layer)
            aliases = self.aliases.get(layer.path, ())
            for path in (layer.path, *aliases):  # a shared module: every name refers to the one factorization
                parent, attr = parent_and_name(model, path)
                setattr(parent, attr, factorized)
            self.layers[layer.path] = {
                "type": kind, "shape": list(layer.shape), "rank": layer.rank, "full_rank": layer.full,
                "energy": round(layer.energy(layer.rank), 6),
                "params_before": layer.dense_params, "params_after": layer.params(layer.rank),
                **({"aliases": list(aliases)} if aliases else {}),
            }
        return model

    def _finalize(self, model: nn.Module) -> nn.Module:
        for path, entry in self.layers.items():
            module = model.get_submodule(path)
            if not (isinstance(module, nn.Sequential) and len(module) == 2):
                raise CompressionError(f"{self.name}: factorized layer {path!r} was replaced by {type(module)}")
            apart = [alias for alias in entry.get("aliases", ()) if model.get_submodule(alias) is not module]
            if apart:
                raise CompressionError(f"{self.name}: {apart} no longer share the factorized layer {path!r}")
        return model

    def _report(self) -> dict[str, Any]:
        before = sum(v["params_before"] for v in self.layers.values()) + self.dense_kept
        after = sum(v["params_after"] for v in self.layers.values()) + self.dense_kept
        return {"layers": self.layers, "skipped": self.skipped, "params_before": before, "params_after": after,
                "mode": "budget" if self.config.budget is not None else "energy"}


def reconstruction_error(weight: np.ndarray, factored: nn.Sequential) -> float:
    """Relative Frobenius error ``‖W − B·A‖ / ‖W‖`` of a factorized layer against the dense ``weight``."""
    first, second = factored[0].weight.detach().double(), factored[1].weight.detach().double()
    product = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
    w = torch.as_tensor(weight, dtype=torch.float64).reshape(product.shape)
    return float(torch.linalg.norm(w - product) / torch.linalg.norm(w))
