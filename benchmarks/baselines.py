"""Backprop test-time adaptation baselines, for comparison with the forward-only methods only (torch).

These run on the trained torch checkpoint a bundle was exported from; nothing on the device side imports
this module (``device_agents/`` and ``runtime/`` never import torch).

* :class:`Tent` (Wang et al. 2021, "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR):
  BatchNorm layers normalise with the batch's own statistics (train mode, no running estimates), only
  their affine parameters (γ, β) are trained, to minimise the mean prediction entropy; one optimiser step
  per batch, Adam (lr 1e-3, β = (0.9, 0.999)), predictions from the forward pass of that step.
* :class:`EATA` (Niu et al. 2022, "Efficient Test-Time Model Adaptation without Forgetting", ICML): Tent's
  setup, but the entropy loss is taken only over *reliable* samples (entropy below E0 = 0.4·ln K) that are
  *non-redundant* (absolute cosine similarity of their probabilities to a moving average of the probabilities
  of previously used samples below ``d_margin``), each weighted by 1 / exp(H - E0), plus an anti-forgetting
  regulariser α_F Σ F_i (θ_i - θ_i⁰)² with the diagonal Fisher information F computed on clean source samples
  (cross-entropy with the model's own pseudo-labels, squared gradients averaged over batches).

Both are continual (their state is never reset by themselves); ``reset()`` restores the source parameters and
optimiser state (the "reset per domain" reference resets at the known domain boundaries).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax of each row of ``logits``."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def configure_norm_adaptation(model: nn.Module) -> list[nn.Parameter]:
    """Tent's model setup, in place: train mode; every parameter frozen except the BatchNorm affine ones;
    BatchNorm layers forget their running statistics so they always normalise with the batch's own.

    Returns the trainable parameters (γ and β of each BatchNorm, in module order)."""
    model.train()
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            for p in (module.weight, module.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
    if not params:
        raise ValueError(f"{type(model).__name__} has no BatchNorm affine parameters to adapt")
    return params


def norm_param_names(model: nn.Module) -> list[str]:
    """Names of the BatchNorm affine parameters (what :func:`configure_norm_adaptation` makes trainable)."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            names += [f"{mod_name}.{p}" for p in ("weight", "bias") if getattr(module, p) is not None]
    return names


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy


@dataclass(frozen=True)
class TentConfig:
    """Adam learning rate and betas, and optimiser steps per batch."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 1

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


class Tent:
    """Tent on a copy of ``model`` (the original is left untouched)."""

    name = "tent"

    def __init__(self, model: nn.Module, config: TentConfig | None = None) -> None:
        self.config = config or TentConfig()
        self.model = copy.deepcopy(model)
        self.params = configure_norm_adaptation(self.model)
        self.optimizer = torch.optim.Adam(self.params, lr=self.config.lr, betas=self.config.betas)
        self._source_model = copy.deepcopy(self.model.state_dict())
        self._source_optim = copy.deepcopy(self.optimizer.state_dict())

    def reset(self) -> None:
        """Back to the source parameters and a fresh optimiser state."""
        self.model.load_state_dict(self._source_model)
        self.optimizer.load_state_dict(self._source_optim)

    def loss(self, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean entropy over the batch, and the number of samples it used."""
        return softmax_entropy(logits).mean(), int(logits.shape[0])

    def step(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Adapt on ``x`` and return its logits (the forward pass of the first step, before the update)."""
        xt = _as_tensor(x)
        first: torch.Tensor | None = None
        for _ in range(self.config.steps):
            logits = self.model(xt)
            first = logits.detach() if first is None else first
            loss, used = self.loss(logits)
            if used > 0:
                loss.backward()
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        assert first is not None
        return first

    def predict(self, x: np.ndarray) -> np.ndarray:
        """One adaptation step on the batch; its logits as a numpy array."""
        return self.step(x).numpy()


@dataclass(frozen=True)
class EATAConfig(TentConfig):
    """EATA's settings on top of Tent's optimiser.

    ``e_margin_fraction``: E0 = fraction · ln K (0.4 in the paper); ``d_margin``: samples whose probabilities
    have |cos| ≥ d_margin to the moving average are redundant (the paper uses 0.05 for ImageNet's 1,000
    classes; for K = 10 even a one-hot prediction has cosine 1/√10 ≈ 0.32 to a uniform average, so 0.05 would
    reject nearly everything — 0.4 is used, as in EATA's CIFAR-10 setting); ``average_momentum``: the moving
    average is ``m · old + (1 - m) · mean(new)`` (0.9); ``fisher_alpha``: α_F (2000, the paper's default).
    """

    e_margin_fraction: float = 0.4
    d_margin: float = 0.4
    average_momentum: float = 0.9
    fisher_alpha: float = 2000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.e_margin_fraction <= 1.0:
            raise ValueError(f"e_margin_fraction must be in (0, 1], got {self.e_margin_fraction}")
        if not 0.0 < self.d_margin <= 1.0:
            raise ValueError(f"d_margin must be in (0, 1], got {self.d_margin}")
        if not 0.0 <= self.average_momentum < 1.0:
            raise ValueError(f"average_momentum must be in [0, 1), got {self.average_momentum}")
        if self.fisher_alpha < 0:
            raise ValueError(f"fisher_alpha must be >= 0, got {self.fisher_alpha}")


def fisher_information(
    model: nn.Module, params: Iterable[nn.Parameter], batches: Iterable[np.ndarray | torch.Tensor]
) -> list[torch.Tensor]:
    """Diagonal Fisher of ``params`` on clean source batches, as EATA computes it: cross-entropy of the
    model's (train-mode) outputs with its own pseudo-labels, squared gradients averaged over batches."""
    params = list(params)
    fisher = [torch.zeros_like(p) for p in params]
    count = 0
    for x in batches:
        logits = model(_as_tensor(x))
        loss = F.cross_entropy(logits, logits.argmax(dim=1))
        grads = torch.autograd.grad(loss, params)
        for f, g in zip(fisher, grads, strict=True):
            f += g.detach() ** 2
        count += 1
    if count == 0:
        raise ValueError("fisher_information needs at least one batch")
    return [f / count for f in fisher]


class EATA(Tent):
    """EATA on a copy of ``model``; ``fisher_batches``: clean source batches for the Fisher regulariser."""

    name = "eata"
    config: EATAConfig

    def __init__(
        self, model: nn.Module, num_classes: int, fisher_batches: Iterable[np.ndarray], config: EATAConfig | None = None
    ) -> None:
        super().__init__(model, config or EATAConfig())
        self.e_margin = self.config.e_margin_fraction * math.log(num_classes)
        self.anchor = [p.detach().clone() for p in self.params]
        self.fisher = fisher_information(self.model, self.params, fisher_batches)
        self.average: torch.Tensor | None = None
        self.used_reliable = 0  # samples that passed the entropy filter, over the stream
        self.used_both = 0  # … and the redundancy filter (those that entered the loss)

    def reset(self) -> None:
        """Source parameters, fresh optimiser and no probability average."""
        super().reset()
        self.average = None

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the samples that enter the loss (reliable and non-redundant), and all entropies."""
        ent = softmax_entropy(logits)
        reliable = torch.nonzero(ent < self.e_margin).flatten()
        if self.average is None or reliable.numel() == 0:
            return reliable, ent
        probs = logits[reliable].softmax(dim=1)
        cos = F.cosine_similarity(self.average.unsqueeze(0), probs, dim=1)
        return reliable[cos.abs() < self.config.d_margin], ent

    def loss(self, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Weighted entropy of the selected samples plus the Fisher regulariser; updates the average."""
        keep, ent = self.select(logits)
        self.used_reliable += int((ent < self.e_margin).sum())
        self.used_both += int(keep.numel())
        if keep.numel() == 0:
            return logits.sum() * 0.0, 0
        selected = ent[keep]
        weights = torch.exp(-(selected.detach() - self.e_margin))
        loss = (selected * weights).mean()
        if self.config.fisher_alpha > 0:
            loss = loss + self.config.fisher_alpha * sum(
                (f * (p - a) ** 2).sum() for f, p, a in zip(self.fisher, self.params, self.anchor, strict=True)
            )
        new = logits[keep].detach().softmax(dim=1).mean(dim=0)
        m = self.config.average_momentum
        self.average = new if self.average is None else m * self.average + (1.0 - m) * new
        return loss, int(keep.numel())


def backprop_method(
    name: str, model: nn.Module, num_classes: int, fisher_batches: Iterable[np.ndarray] | None = None
) -> Any:
    """``tent`` or ``eata`` on a copy of ``model`` (``eata`` needs ``fisher_batches``)."""
    if name == "tent":
        return Tent(model)
    if name == "eata":
        if fisher_batches is None:
            raise ValueError("eata needs clean source batches for its Fisher regulariser")
        return EATA(model, num_classes, fisher_batches)
    raise ValueError(f"unknown backprop baseline {name!r}; choose tent or eata")
