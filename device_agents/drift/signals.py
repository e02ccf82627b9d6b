"""Signals a device can watch for drift, computed from model outputs (numpy only).

Per sample: prediction entropy, max-softmax confidence, the penultimate feature vector and its norm — feed
them to a scalar detector (entropy, confidence, norm) or a feature detector (features). Per batch: the
shift of every adaptable layer's activation statistics from the source statistics in the bundle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from runtime.model import ForwardResult


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def prediction_entropy(probs: np.ndarray, normalized: bool = False) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``probs``; divided by ``ln K`` (values in [0, 1]) if ``normalized``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, K >= 2), got {p.shape}")
    h = -np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=1)
    return h / math.log(p.shape[1]) if normalized else h


def max_softmax(probs: np.ndarray) -> np.ndarray:
    """The confidence of each prediction: the largest probability of each row."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (n, K), got {p.shape}")
    return p.max(axis=1)


def feature_norm(features: np.ndarray) -> np.ndarray:
    """The Euclidean norm of each feature vector (rows)."""
    f = np.asarray(features, dtype=np.float64)
    return np.sqrt(np.sum(f.reshape(f.shape[0], -1) ** 2, axis=1))


def feature_shift(features: np.ndarray, source_mean: np.ndarray, source_var: np.ndarray,
                  eps: float = 1e-6) -> np.ndarray:
    """Per sample, the mean over feature dimensions of ``(f − μ_src)² / σ²_src``: how far each feature vector
    lies from the source feature statistics (``Manifest.source_feature_stats``), ≈ 1 in the source domain."""
    f = np.asarray(features, dtype=np.float64)
    z = (f - np.asarray(source_mean, np.float64)) ** 2 / (np.asarray(source_var, np.float64) + eps)
    return z.mean(axis=1)


def gaussian_kl(mean: np.ndarray, var: np.ndarray, ref_mean: np.ndarray, ref_var: np.ndarray,
                eps: float = 1e-6) -> float:
    """Mean over channels of ``KL(N(mean, var) ‖ N(ref_mean, ref_var))`` (per-channel Gaussians)."""
    v, rv = np.asarray(var, np.float64) + eps, np.asarray(ref_var, np.float64) + eps
    d = np.asarray(mean, np.float64) - np.asarray(ref_mean, np.float64)
    return float(np.mean(0.5 * (np.log(rv / v) + (v + d * d) / rv - 1.0)))


def layer_shift(batch_stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
                source_stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Per adaptable layer, :func:`gaussian_kl` of the batch's per-channel activation statistics to the source
    statistics: one number per layer and batch (0 when the batch looks like the source)."""
    missing = set(batch_stats) - set(source_stats)
    if missing:
        raise ValueError(f"no source statistics for layers {sorted(missing)}")
    return {name: gaussian_kl(m, v, *source_stats[name]) for name, (m, v) in batch_stats.items()}


@dataclass(frozen=True)
class Signals:
    """Per-sample signals of one forward pass."""

    probs: np.ndarray
    entropy: np.ndarray
    confidence: np.ndarray
    features: np.ndarray
    feature_norm: np.ndarray
    layer_shift: dict[str, float]


def signals_from_forward(result: ForwardResult, source_stats: Mapping[str, tuple[np.ndarray, np.ndarray]]
                         | None = None, normalized_entropy: bool = True) -> Signals:
    """Every signal of an :class:`~runtime.model.ForwardResult`; layer shifts need ``source_stats``
    (layer name → (mean, var)), e.g. from :func:`source_layer_stats`."""
    probs = softmax(result.logits)
    shift = layer_shift(result.batch_stats, source_stats) if source_stats is not None else {}
    features = np.asarray(result.features, dtype=np.float64).reshape(probs.shape[0], -1)
    return Signals(probs, prediction_entropy(probs, normalized_entropy), max_softmax(probs), features,
                   feature_norm(features), shift)


def source_layer_stats(manifest: object) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Source running mean and variance of each adaptable layer of a :class:`runtime.manifest.Manifest`."""
    layers = getattr(manifest, "layers", ())
    initial = getattr(manifest, "initial_params", {})
    return {layer.name: (initial[layer.mean], initial[layer.var]) for layer in layers}
