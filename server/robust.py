"""Byzantine-robust aggregation rules: coordinate-wise trimmed mean and median, (Multi-)Krum.

Each combines the contributions' deltas without their sample counts, so that no device can buy influence by
claiming many samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.aggregation_base import AggregationError, Aggregator


@dataclass(frozen=True)
class TrimmedMeanConfig:
    """Fraction ``beta`` of contributions dropped at each end, per coordinate (0 <= beta < 0.5)."""

    beta: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise AggregationError(f"trimmed_mean beta {self.beta} must be in [0, 0.5)")


class TrimmedMean(Aggregator):
    """Coordinate-wise β-trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning", Def. 2):
    per coordinate drop the floor(βn) largest and smallest values and average the rest (unweighted)."""

    name = "trimmed_mean"

    def __init__(self, config: TrimmedMeanConfig | None = None) -> None:
        """Keep ``config``."""
        self.config = config or TrimmedMeanConfig()

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Mean of the middle n - 2 floor(βn) values per coordinate."""
        n = deltas.shape[0]
        k = math.floor(self.config.beta * n)
        if n - 2 * k < 1:
            raise AggregationError(f"trimmed_mean beta {self.config.beta} trims all {n} contributions")
        return np.sort(deltas, axis=0)[k:n - k].mean(axis=0)


@dataclass(frozen=True)
class MedianConfig:
    """Coordinate-wise median has no options."""


class CoordinateMedian(Aggregator):
    """Coordinate-wise median (Yin et al. 2018, Def. 1), unweighted."""

    name = "median"

    def __init__(self, config: MedianConfig | None = None) -> None:
        """``config`` is accepted for uniformity."""
        self.config = config or MedianConfig()

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Median per coordinate."""
        return np.median(deltas, axis=0)


@dataclass(frozen=True)
class KrumConfig:
    """``byzantine`` f tolerated; ``multi`` m deltas averaged (1: Krum, >1: Multi-Krum)."""

    byzantine: int = 1
    multi: int = 1

    def __post_init__(self) -> None:
        if self.byzantine < 0 or self.multi < 1:
            raise AggregationError(f"krum byzantine {self.byzantine} must be >= 0 and multi {self.multi} >= 1")


class Krum(Aggregator):
    """(Multi-)Krum (Blanchard et al. 2017, "Machine Learning with Adversaries", Sec. 4): score each delta by the
    sum of squared distances to its n - f - 2 nearest others; average the m lowest-scoring (unweighted).
    Needs n > 2f + 2 and m <= n - f."""

    name = "krum"
    whole_vector = True

    def __init__(self, config: KrumConfig | None = None) -> None:
        """Keep ``config``."""
        self.config = config or KrumConfig()
        self.selected: list[int] = []

    def min_contributions(self) -> int:
        """2f + 3 (n > 2f + 2), and at least m + f."""
        return max(2 * self.config.byzantine + 3, self.config.multi + self.config.byzantine)

    def scores(self, deltas: np.ndarray) -> np.ndarray:
        """Krum score of each row of ``deltas`` (n, d)."""
        n = deltas.shape[0]
        sq = np.sum(deltas ** 2, axis=1)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * deltas @ deltas.T, 0.0)
        np.fill_diagonal(dist, np.inf)
        nearest = n - self.config.byzantine - 2
        return np.sort(dist, axis=1)[:, :nearest].sum(axis=1)

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Mean of the m rows with the lowest scores (ties: lowest index)."""
        self.selected = sorted(np.argsort(self.scores(deltas), kind="stable")[:self.config.multi].tolist())
        return deltas[self.selected].mean(axis=0)

    def metrics(self) -> dict[str, float]:
        """How many contributions were selected."""
        return {"selected": float(len(self.selected))}
