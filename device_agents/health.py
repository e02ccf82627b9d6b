"""The device's health signal, used to decide whether a freshly applied update is kept or rolled back.

Two numbers, both measured with plain forward passes (source normalisation, ``alpha=golden_alpha``, no TTA
state) for a candidate parameter set: the mean normalised prediction entropy on the most recent input
batches the agent saw, and the top-1 agreement with the bundle's recorded golden outputs. An update is
kept unless, compared with the parameters before it, entropy rises by more than ``max_entropy_increase``
or golden agreement falls by more than ``max_agreement_drop``.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.bundle import golden_input, read_golden
from runtime.model import softmax

if TYPE_CHECKING:
    from runtime.model import AdaptableModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Health:
    """Mean normalised entropy on recent batches (NaN: none seen) and golden top-1 agreement (NaN: none)."""

    entropy: float
    agreement: float


@dataclass(frozen=True)
class HealthPolicy:
    """Rollback thresholds; ``recent_samples`` bounds the recent inputs kept for the entropy signal."""

    max_entropy_increase: float = 0.10
    max_agreement_drop: float = 0.10
    recent_samples: int = 256

    def __post_init__(self) -> None:
        for name in ("max_entropy_increase", "max_agreement_drop"):  # NaN would roll every update back; inf
            value = getattr(self, name)  # turns that check off
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
                raise ValueError(f"health {name} must be a number >= 0 (inf: never), got {value!r}")
        if (isinstance(self.recent_samples, bool) or not isinstance(self.recent_samples, numbers.Integral)
                or self.recent_samples < 0):
            raise ValueError(f"health recent_samples must be an integer >= 0, got {self.recent_samples!r}")

    def verdict(self, before: Health, after: Health) -> str:
        """"" when ``after`` is acceptable, else the reason to roll back. A signal measured before that is no
        longer finite after (the parameters make the model's outputs NaN or infinite) counts as worse."""
        reasons = []
        if math.isfinite(before.entropy) and not after.entropy - before.entropy <= self.max_entropy_increase:
            reasons.append(f"mean entropy rose {before.entropy:.3f} -> {after.entropy:.3f} "
                           f"(> {self.max_entropy_increase})")
        if math.isfinite(before.agreement) and not before.agreement - after.agreement <= self.max_agreement_drop:
            reasons.append(f"golden top-1 agreement fell {before.agreement:.3f} -> {after.agreement:.3f} "
                           f"(> {self.max_agreement_drop})")
        return "; ".join(reasons)


def _golden(model: AdaptableModel) -> tuple[np.ndarray, np.ndarray] | None:
    """The bundle's golden inputs and recorded top-1 classes, or None when the bundle records no logits."""
    bundle = getattr(model, "bundle", None)
    if bundle is None:
        return None
    manifest = bundle.manifest
    name = manifest.golden_file_of(bundle.model.name)
    recorded = read_golden(bundle.root, name)
    logits = recorded.get(f"{bundle.model.name}/{manifest.logits_output}")
    if logits is None:
        return None
    return golden_input(recorded, name), np.asarray(logits).argmax(axis=1)


class HealthMonitor:
    """Keeps the recent inputs and measures :class:`Health` for a parameter set."""

    def __init__(self, model: AdaptableModel, policy: HealthPolicy) -> None:
        """Measure on ``model`` (its golden vectors are read once, here)."""
        self.model = model
        self.policy = policy
        self._recent: deque[np.ndarray] = deque()
        self._count = 0
        self._golden = _golden(model)

    def observe(self, x: np.ndarray) -> None:
        """Remember a batch, dropping the oldest beyond ``policy.recent_samples``."""
        if self.policy.recent_samples == 0:
            return
        batch = np.asarray(x, dtype=np.float32)[: self.policy.recent_samples]
        self._recent.append(batch)
        self._count += len(batch)
        while self._count - len(self._recent[0]) >= self.policy.recent_samples:
            self._count -= len(self._recent.popleft())

    def measure(self, params: Mapping[str, np.ndarray]) -> Health:
        """Health of ``params`` on the recent batches and the golden vectors."""
        alpha = float(getattr(getattr(self.model, "manifest", None), "golden_alpha", 0.0))
        entropy = float("nan")
        if self._recent:
            probs = softmax(self.model.forward(np.concatenate(list(self._recent)), alpha, params).logits)
            ent = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1) / math.log(probs.shape[1])
            entropy = float(ent.mean())
        agreement = float("nan")
        if self._golden is not None:
            x, top1 = self._golden
            logits = self.model.forward(x, alpha, params).logits
            agreement = float((logits.argmax(axis=1) == top1).mean())
        return Health(entropy, agreement)
