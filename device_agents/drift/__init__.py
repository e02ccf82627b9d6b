"""Drift detectors and the signals they watch.

Every detector follows River's contract — hyperparameters only in ``__init__``, ``update(x) -> self``, a
read-only ``drift_detected``, reset at the first update after a drift — and adds ``update_many(batch)``, a
vectorized path that signals drift at exactly the positions the per-sample path would.

Scalar streams (entropy, confidence, …): :class:`PageHinkley`, :class:`ADWIN`, :class:`KSWIN`.
Feature vectors: :class:`MMDDrift` (online MMD), :class:`MahalanobisDrift` (class-conditional source
Gaussians of the bundle); both calibrate their thresholds to an expected run time.

Every detector refuses (``ValueError``, state unchanged) non-finite observations and observations of magnitude
above :data:`MAX_ABS_VALUE` (``1e100``), so that its state stays finite (see :mod:`device_agents.drift.base`).
"""

from __future__ import annotations

from typing import Any

from device_agents.drift.adwin import ADWIN
from device_agents.drift.base import (
    MAX_ABS_VALUE,
    DriftDetector,
    FeatureDetector,
    ScalarDetector,
    StateOverflowError,
)
from device_agents.drift.kswin import KSWIN, ks_critical_count, ks_tail_probability
from device_agents.drift.mahalanobis import MahalanobisDrift, MahalanobisScorer
from device_agents.drift.mmd import MMDDrift, median_heuristic
from device_agents.drift.page_hinkley import PageHinkley
from device_agents.drift.signals import (
    Signals,
    feature_norm,
    feature_shift,
    layer_shift,
    max_softmax,
    prediction_entropy,
    signals_from_forward,
    source_layer_stats,
)
from device_agents.drift.windowed import WindowedEmbeddingDetector, gumbel_threshold

SCALAR_DETECTORS: dict[str, type[ScalarDetector]] = {"page_hinkley": PageHinkley, "adwin": ADWIN, "kswin": KSWIN}
FEATURE_DETECTORS: dict[str, type[FeatureDetector]] = {"mmd": MMDDrift, "mahalanobis": MahalanobisDrift}
DETECTORS: tuple[str, ...] = (*SCALAR_DETECTORS, *FEATURE_DETECTORS)


def create_detector(name: str, **kwargs: Any) -> DriftDetector:
    """The detector registered as ``name`` (scalar or feature), built with ``kwargs``."""
    registry: dict[str, type[DriftDetector]] = {**SCALAR_DETECTORS, **FEATURE_DETECTORS}
    if name not in registry:
        raise ValueError(f"unknown drift detector {name!r}; registered: {sorted(registry)}")
    return registry[name](**kwargs)


def detector_name(detector: DriftDetector) -> str:
    """The registry name of ``detector``'s class (its class name when it is not registered)."""
    for name, cls in {**SCALAR_DETECTORS, **FEATURE_DETECTORS}.items():
        if type(detector) is cls:
            return name
    return type(detector).__name__


def detector_signal(detector: DriftDetector) -> str:
    """What an agent feeds ``detector``: ``"features"`` (penultimate feature rows) or ``"entropy"``."""
    return "features" if isinstance(detector, FeatureDetector) else "entropy"


__all__ = [
    "ADWIN",
    "DETECTORS",
    "FEATURE_DETECTORS",
    "KSWIN",
    "MAX_ABS_VALUE",
    "SCALAR_DETECTORS",
    "DriftDetector",
    "FeatureDetector",
    "MMDDrift",
    "MahalanobisDrift",
    "MahalanobisScorer",
    "PageHinkley",
    "ScalarDetector",
    "Signals",
    "StateOverflowError",
    "WindowedEmbeddingDetector",
    "create_detector",
    "detector_name",
    "detector_signal",
    "feature_norm",
    "feature_shift",
    "gumbel_threshold",
    "ks_critical_count",
    "ks_tail_probability",
    "layer_shift",
    "max_softmax",
    "median_heuristic",
    "prediction_entropy",
    "signals_from_forward",
    "source_layer_stats",
]
