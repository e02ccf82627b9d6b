"""N:M structured sparsity of ``nn.Linear`` and ``nn.Conv2d`` weights along the input dimension.

``prepare`` attaches a magnitude mask (the N largest |w| of every M consecutive input weights per output
channel; for convolutions along ``C_in·kh·kw`` flattened in ``(C_in, kh, kw)`` order) as a
``torch.nn.utils.parametrize`` parametrization. A short masked fine-tune then restores accuracy with one of:

* ``method="mdgf"`` — Mask-Decay Gradient Flow (Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust
  N:M Sparsity Training in Transformers", Sec. 4.1): pruned weights enter the forward pass scaled by a mask
  value β that decays (linearly or exponentially) from ``initial_flow`` to 0 over the first ``freeze_at`` of
  the schedule, so the gradient they receive is β-scaled and fades out; afterwards β = 0 (exactly sparse).
* ``method="srste"`` — SR-STE (Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks
  From Scratch", Eq. 6): the forward pass is exactly sparse, the dense weights receive the straight-through
  gradient plus a decay ``λ·(1−mask)·W`` on pruned weights.

While ``progress < freeze_at`` masks are recomputed by magnitude every ``mask_update_every`` steps; later they
are frozen. ``finalize`` writes ``where(mask, W, 0)`` into a plain weight, removes the parametrization and
verifies the pattern holds exactly (every group of M has at least M−N zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from exporter.compress.base import (
    CompressionError,
    CompressionPass,
    UnsupportedLayerError,
    register_pass,
    select_layers,
    validate_exclude,
)
from exporter.compress.nm import check_nm, check_pattern, magnitude_mask, parse_pattern, sparsity
from runtime.checks import is_finite_number, require_int

METHODS = ("mdgf", "srste")
DECAYS = ("linear", "exponential")
EXP_DECAY_RATE = 5.0  # exponential MDGF: β = β0·exp(-5·progress/freeze_at), i.e. 0.7 % of β0 when masks freeze


@dataclass(frozen=True)
class NMSparsityConfig:
    """Options of :class:`NMSparsity`: the pattern ``n:m`` (any ``1 <= n < m <= 255``, default 2:4), module-path
    globs to ``exclude``, and the fine-tune schedule (``method``, ``decay``, ``initial_flow``, ``srste_lambda``,
    ``mask_update_every`` steps, ``freeze_at`` fraction; see the module docstring)."""

    n: int = 2
    m: int = 4
    exclude: tuple[str, ...] = field(default=())
    method: str = "mdgf"
    decay: str = "exponential"
    initial_flow: float = 1.0
    srste_lambda: float = 2e-4
    mask_update_every: int = 8
    freeze_at: float = 0.5

    def __post_init__(self) -> None:
        check_pattern(self.n, self.m)
        object.__setattr__(self, "exclude", validate_exclude(self.exclude))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        for name in ("initial_flow", "freeze_at"):
            value = getattr(self, name)
            if not is_finite_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if not (is_finite_number(self.srste_lambda) and self.srste_lambda >= 0):
            raise ValueError(f"srste_lambda must be >= 0 and finite, got {self.srste_lambda!r}")
        object.__setattr__(self, "mask_update_every", require_int("mask_update_every", self.mask_update_every, 1))

    @property
    def pattern(self) -> str:
        """``"n:m"``."""
        return f"{self.n}:{self.m}"

    @classmethod
    def from_string(cls, text: str, **options: Any) -> NMSparsityConfig:
        """Build from ``"N:M"`` (e.g. the CLI's ``--sparsity 2:4``) plus keyword options."""
        n, m = parse_pattern(text)
        return cls(n=n, m=m, **options)


class _MaskedWeight(torch.autograd.Function):
    """``W ⊙ (mask + β_f·(1−mask))`` forward; backward ``g ⊙ (mask + β_g·(1−mask)) + λ·(1−mask)⊙W``."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, mask: torch.Tensor, fwd: float, grad: float, lam: float) -> torch.Tensor:
        ctx.save_for_backward(w, mask)
        ctx.grad, ctx.lam = grad, lam
        return torch.where(mask, w, w * fwd) if fwd else torch.where(mask, w, torch.zeros_like(w))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, mask = ctx.saved_tensors
        out = torch.where(mask, g, g * ctx.grad)
        if ctx.lam:
            out = out + torch.where(mask, torch.zeros_like(w), ctx.lam * w)
        return out, None, None, None, None


class NMMask(nn.Module):
    """Parametrization holding a boolean N:M mask and the current gradient-flow factors."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.forward_flow = 0.0
        self.grad_flow = 0.0
        self.decay_lambda = 0.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The effective (masked) weight."""
        return _MaskedWeight.apply(w, self.mask, self.forward_flow, self.grad_flow, self.decay_lambda)


def _fan_in(module: nn.Module) -> int:
    return int(module.weight[0].numel())


def _mask_of(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    w = weight.detach().cpu().numpy()
    return torch.from_numpy(magnitude_mask(w, n, m, axis=1)).to(weight.device)


@register_pass
class NMSparsity(CompressionPass):
    """N:M structured sparsity pass (see the module docstring). Config: :class:`NMSparsityConfig`."""

    name = "nm_sparsity"
    order = 1
    config_type = NMSparsityConfig

    def __init__(self, config: NMSparsityConfig | None = None) -> None:
        super().__init__(config or NMSparsityConfig())
        self.config: NMSparsityConfig
        self.layers: dict[str, nn.Module] = {}
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.steps = 0
        self.mask_updates = 0
        self.stats: dict[str, dict[str, Any]] = {}

    def _check_divisible(self, targets: dict[str, nn.Module]) -> None:
        m = self.config.m
        bad = [(p, mod) for p, mod in targets.items() if _fan_in(mod) % m]
        if not bad:
            return
        path, module = bad[0]
        what = "C_in·kh·kw" if isinstance(module, nn.Conv2d) else "in_features"
        raise UnsupportedLayerError(
            self.name, path, type(module).__name__,
            f"its input dimension {what} = {_fan_in(module)} is not divisible by M={m} "
            f"(after low-rank, LowRankConfig(rank_multiple={m}) keeps factor widths divisible)",
            [p for p, _ in bad[1:]],
        )

    def _prepare(self, model: nn.Module) -> nn.Module:
        selection = select_layers(model, self.name, (nn.Linear, nn.Conv2d), self.config.exclude)
        self._check_divisible(selection.targets)
        for module in selection.targets.values():
            parametrize.register_parametrization(module, "weight", NMMask(_mask_of(module.weight, *self._nm)))
        # a module shared under several paths is masked once (the mask holds for every path: see ``aliases``)
        self.layers, self.excluded, self.aliases = dict(selection.targets), selection.excluded, selection.aliases
        self._set_flow(0.0)
        return model

    @property
    def _nm(self) -> tuple[int, int]:
        return self.config.n, self.config.m

    def _flow(self, progress: float) -> tuple[float, float, float]:
        """``(forward flow, gradient flow, λ)`` at ``progress`` of the fine-tune schedule."""
        c = self.config
        if progress >= c.freeze_at:
            return 0.0, 0.0, 0.0
        if c.method == "srste":
            return 0.0, 1.0, c.srste_lambda
        t = progress / c.freeze_at
        beta = c.initial_flow * (1.0 - t if c.decay == "linear" else math.exp(-EXP_DECAY_RATE * t))
        return beta, beta, 0.0

    def _set_flow(self, progress: float) -> None:
        fwd, grad, lam = self._flow(progress)
        for module in self.layers.values():
            mask = module.parametrizations.weight[0]
            mask.forward_flow, mask.grad_flow, mask.decay_lambda = fwd, grad, lam

    @torch.no_grad()
    def update_masks(self) -> None:
        """Re-select every mask by the magnitude of the dense (underlying) weights."""
        for module in self.layers.values():
            holder = module.parametrizations.weight
            holder[0].mask.copy_(_mask_of(holder.original, *self._nm))
        self.mask_updates += 1

    def step(self, progress: float) -> None:
        """Advance the schedule: gradient-flow factors for ``progress``; masks re-selected every
        ``mask_update_every`` steps until ``freeze_at``."""
        super().step(progress)
        self.steps += 1
        if progress < self.config.freeze_at and self.steps % self.config.mask_update_every == 0:
            self.update_masks()
        self._set_flow(progress)

    @torch.no_grad()
    def _finalize(self, model: nn.Module) -> nn.Module:
        n, m = self._nm
        for path, module in self.layers.items():
            mask = module.parametrizations.weight[0].mask.clone()
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.copy_(torch.where(mask, module.weight, torch.zeros_like(module.weight)))
            weight = module.weight.detach().cpu().numpy()
            if not check_nm(weight, n, m, axis=1):
                raise CompressionError(f"{self.name}: layer {path!r} does not satisfy {n}:{m} after finalize")
            self.stats[path] = {"type": type(module).__name__, "shape": list(weight.shape),
                                "pattern": self.config.pattern, "sparsity": round(sparsity(weight), 6)}
            if path in self.aliases:
                self.stats[path]["aliases"] = list(self.aliases[path])
        return model

    def _report(self) -> dict[str, Any]:
        zeros = sum(s["sparsity"] * math.prod(s["shape"]) for s in self.stats.values())
        total = sum(math.prod(s["shape"]) for s in self.stats.values())
        return {"pattern": self.config.pattern, "n": self.config.n, "m": self.config.m,
                "method": self.config.method, "layers": self.stats,
                "sparsity": round(zeros / total, 6) if total else 0.0,
                "mask_updates": self.mask_updates, "steps": self.steps}
