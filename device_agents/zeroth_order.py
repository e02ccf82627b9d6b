"""Zeroth-order (SPSA) learning of a device's adaptable parameters from labelled batches: forward passes only.

A device that receives labels (a user correcting a prediction, a sensor with ground truth) can improve its
model without backpropagation, which the device runtime cannot do: :class:`SPSA` estimates the gradient of the
cross-entropy from two forward passes per random direction and takes a step on the adaptable parameters of a
``runtime.AdaptableModel`` (by default every normalisation scale/shift, ``<layer>.weight`` / ``<layer>.bias``).

The estimator is simultaneous-perturbation stochastic approximation (Spall 1992, "Multivariate Stochastic
Approximation Using a Simultaneous Perturbation Gradient Approximation", IEEE TAC 37(3)) in the two-sided
form MeZO uses for fine-tuning (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"):
at step k, for each of ``q`` directions z ~ Rademacher(±1) drawn from a seeded generator,

    g_j = (L(θ + c_k z_j) - L(θ - c_k z_j)) / (2 c_k),      θ ← θ - a_k · (1/q) Σ_j g_j z_j,

with Spall's gain sequences a_k = a / (k + 1 + A)^α and c_k = c / (k + 1)^γ (his recommended α = 0.602,
γ = 0.101). A step costs exactly ``2 q`` forward passes of the batch (the loss it reports is the mean of those
passes, so no extra one). numpy only; no torch.

Parameters the model's graph needs >= 0 (``AdaptableModel.nonnegative_params``: a TFLite graph that max-pools
before those scales) are kept there: both perturbed points and the step are clipped at 0 (projected SPSA), so
a scale near 0 never hands the model a value it would refuse.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.model import check_batch


@dataclass(frozen=True)
class SPSAConfig:
    """Settings of :class:`SPSA`.

    ``lr`` a and ``lr_decay`` α, ``stability`` A: the step size a_k = a / (k + 1 + A)^α. ``perturbation`` c
    and ``perturbation_decay`` γ: c_k = c / (k + 1)^γ. ``directions`` q: perturbations averaged per step (a step
    costs 2q forward passes). ``params``: the adaptable parameters optimised (None: every ``<layer>.weight`` and
    ``<layer>.bias``, the normalisation scale/shift). ``alpha``: the graph's α during the passes (0: normalise
    with the model's own statistics). ``max_update``: each coordinate's change per step is clipped to
    ±``max_update`` (None: no clipping), a guard against one noisy estimate. ``seed`` seeds the directions.
    """

    lr: float = 0.05
    lr_decay: float = 0.602
    stability: float = 0.0
    perturbation: float = 0.01
    perturbation_decay: float = 0.101
    directions: int = 1
    params: tuple[str, ...] | None = None
    alpha: float = 0.0
    max_update: float | None = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("lr", "perturbation"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"SPSA {name} must be finite and > 0, got {value}")
        for name in ("lr_decay", "perturbation_decay", "stability"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"SPSA {name} must be finite and >= 0, got {value}")
        for name, least in (("directions", 1), ("seed", 0)):  # a float or negative value failed later, unnamed
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"SPSA {name} must be >= {least} (an integer), got {value!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SPSA alpha must be in [0, 1], got {self.alpha}")
        if self.max_update is not None and not (math.isfinite(self.max_update) and self.max_update > 0):
            raise ValueError(f"SPSA max_update must be None or finite and > 0, got {self.max_update}")
        if self.params is not None and not (isinstance(self.params, tuple) and self.params
                                            and all(isinstance(n, str) for n in self.params)):
            raise ValueError(f"SPSA params must be None or a non-empty tuple of names, got {self.params!r}")

    @property
    def passes_per_step(self) -> int:
        """Forward passes one :meth:`SPSA.step` runs: two per direction."""
        return 2 * self.directions


@dataclass(frozen=True)
class SPSAStep:
    """Outcome of one step: ``loss`` (mean cross-entropy over the step's perturbed passes, an estimate of the
    loss before the step), the gains a_k and c_k used, the norm of the applied change, and the passes run."""

    step: int
    loss: float
    lr: float
    perturbation: float
    update_norm: float
    forward_passes: int


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy (nats) of integer ``labels`` under ``logits`` (N, K), in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


class SPSA:
    """Zeroth-order optimiser of a model's adaptable parameters (see the module doc).

    Its state (step count and the direction generator) is explicit: :meth:`snapshot` / :meth:`restore`, and a
    rejected batch — wrong shape, NaN, labels out of range, a failing pass — leaves both it and the model as
    they were. Two optimisers with the same seed given the same batches make the same steps.
    """

    def __init__(self, config: SPSAConfig | None = None) -> None:
        """Start at step 0 with the direction generator seeded from ``config.seed``."""
        self.config = config or SPSAConfig()
        self.steps = 0
        self._rng = np.random.default_rng(self.config.seed)

    def snapshot(self) -> dict[str, Any]:
        """The step count and generator state (restore with :meth:`restore`)."""
        return {"steps": self.steps, "rng": self._rng.bit_generator.state}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Return to a :meth:`snapshot`."""
        rng = np.random.default_rng()
        rng.bit_generator.state = dict(state["rng"])
        self.steps, self._rng = int(state["steps"]), rng

    def gains(self, step: int) -> tuple[float, float]:
        """``(a_k, c_k)`` at step ``k`` = ``step``."""
        c = self.config
        return (c.lr / (step + 1 + c.stability) ** c.lr_decay,
                c.perturbation / (step + 1) ** c.perturbation_decay)

    def param_names(self, model: Any) -> list[str]:
        """The names this optimiser changes on ``model`` (checked against its parameters)."""
        available = model.params
        if self.config.params is None:
            names = sorted(n for n in available if n.endswith((".weight", ".bias")))
            if not names:
                raise InputError(f"the model has no '<layer>.weight'/'<layer>.bias' parameters: {sorted(available)}")
            return names
        unknown = sorted(set(self.config.params) - set(available))
        if unknown:
            raise InputError(f"SPSA params {unknown} are not adaptable parameters of the model "
                             f"({sorted(available)})")
        return sorted(self.config.params)

    def check_batch(self, model: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate a labelled batch: ``x`` by the model's input checks, ``y`` integer labels, one per sample,
        each in 0..K-1. Returns ``(x float32, y int64)``; raises :class:`InputError` naming the problem."""
        checker = getattr(model, "check_input", None)
        batch = checker(x) if checker is not None else check_batch(x)
        labels = np.asarray(y)
        if labels.dtype.kind not in "iu":
            raise InputError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.ndim != 1 or labels.shape[0] != batch.shape[0]:
            raise InputError(f"labels have shape {labels.shape}; expected ({batch.shape[0]},), one per sample")
        k = int(model.num_classes)
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise InputError(f"labels must lie in 0..{k - 1}, got values from {labels.min()} to {labels.max()}")
        return batch, labels.astype(np.int64)

    def loss(self, model: Any, x: np.ndarray, y: np.ndarray, params: Mapping[str, np.ndarray] | None = None
             ) -> float:
        """Mean cross-entropy of one validated pass with ``params`` overriding the model's."""
        result = model.forward(x, alpha=self.config.alpha, params=params)
        value = cross_entropy(result.logits, y)
        if not math.isfinite(value):
            raise FloatingPointError(f"SPSA loss is {value}: the model returned non-finite logits")
        return value

    def step(self, model: Any, x: np.ndarray, y: np.ndarray, fixed: Mapping[str, np.ndarray] | None = None
             ) -> SPSAStep:
        """One SPSA step on the labelled batch ``(x, y)``: 2q forward passes, then one ``model.set_params``.

        ``fixed`` overrides other parameters during the passes without being optimised or stored, e.g. the
        normalisation statistics a TTA method currently adapts to (so the scale/shift is learned under them).
        """
        batch, labels = self.check_batch(model, x, y)
        names = self.param_names(model)
        held = {k: np.asarray(v, np.float32) for k, v in (fixed or {}).items() if k not in names}
        saved = self.snapshot()
        try:
            current = model.params
            theta = {n: np.asarray(current[n], dtype=np.float64) for n in names}
            lr, c = self.gains(self.steps)
            bounded = set(names) & set(getattr(model, "nonnegative_params", ()))
            grad = {n: np.zeros_like(v) for n, v in theta.items()}
            losses = []
            for _ in range(self.config.directions):
                z = {n: self._rng.integers(0, 2, size=v.shape).astype(np.float64) * 2.0 - 1.0
                     for n, v in theta.items()}
                plus = self.loss(model, batch, labels, {**held, **_point(theta, z, c, bounded)})
                minus = self.loss(model, batch, labels, {**held, **_point(theta, z, -c, bounded)})
                g = (plus - minus) / (2.0 * c)
                losses += [plus, minus]
                for n in names:
                    grad[n] += g * z[n] / self.config.directions
            change = {n: -lr * grad[n] for n in names}
            if self.config.max_update is not None:
                change = {n: np.clip(v, -self.config.max_update, self.config.max_update) for n, v in change.items()}
            new = {n: theta[n] + change[n] for n in names}
            for n in bounded:  # projected step: the graph needs these >= 0
                np.maximum(new[n], 0.0, out=new[n])
                change[n] = new[n] - theta[n]
            model.set_params({n: v.astype(np.float32) for n, v in new.items()})
        except BaseException:
            self.restore(saved)
            raise
        self.steps += 1
        norm = float(np.sqrt(sum(float(np.sum(v ** 2)) for v in change.values())))
        return SPSAStep(self.steps, float(np.mean(losses)), lr, c, norm, 2 * self.config.directions)


def _point(theta: Mapping[str, np.ndarray], z: Mapping[str, np.ndarray], scale: float, bounded: set[str]
           ) -> dict[str, np.ndarray]:
    """The perturbed parameters θ + scale · z as float32, with those in ``bounded`` (the model's
    ``nonnegative_params``) clipped at 0 (the graph is exact only there; near 0 the two-sided difference is
    then one-sided for those coordinates)."""
    out = {}
    for n, v in theta.items():
        p = v + scale * z[n]
        out[n] = (np.maximum(p, 0.0) if n in bounded else p).astype(np.float32)
    return out
