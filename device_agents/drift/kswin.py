"""KSWIN: Kolmogorov-Smirnov windowing (Raab, Heusinger & Schleif 2020, "Reactive soft prototype computing for
concept drift streams", Neurocomputing 416)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from device_agents.drift.base import (
    ScalarDetector,
    check_open_unit,
    check_positive_int,
    state_array,
    state_scalar,
)
from device_agents.rng import rng_from_words, rng_to_words

_CHUNK = 4096  # tests per vectorized step


def ks_tail_probability(k: int, n: int) -> float:
    """Exact ``P(D ≥ k/n)`` of the two-sided two-sample Kolmogorov-Smirnov statistic for two samples of ``n``
    under the null (Gnedenko & Korolyuk 1951): ``2·Σ_{j≥1} (−1)^{j+1} C(2n, n−jk) / C(2n, n)``."""
    if k <= 0:
        return 1.0
    total = sum((-1) ** (j + 1) * math.comb(2 * n, n - j * k) for j in range(1, n // k + 1))
    return float(Fraction(2 * total, math.comb(2 * n, n)))


def ks_critical_count(alpha: float, n: int, min_statistic: float = 0.1) -> int:
    """The smallest ``k`` with ``P(D ≥ k/n) ≤ alpha`` and ``k/n > min_statistic`` (n + 1 when none)."""
    k = math.floor(min_statistic * n) + 1
    while k <= n and ks_tail_probability(k, n) > alpha:
        k += 1
    return k


def ks_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``n·D`` per row for equal-size samples ``a`` and ``b`` of shape ``(rows, n)`` (ties handled): integers."""
    values = np.concatenate([a, b], axis=1)
    order = np.argsort(values, axis=1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=1)
    steps = np.where(order < a.shape[1], 1, -1)
    walk = np.cumsum(steps, axis=1)
    last_of_tie = np.ones(values.shape, bool)
    last_of_tie[:, :-1] = sorted_values[:, 1:] != sorted_values[:, :-1]
    return np.max(np.where(last_of_tie, np.abs(walk), 0), axis=1)


class KSWIN(ScalarDetector):
    """Drift detection with a two-sample Kolmogorov-Smirnov test on a sliding window.

    The window holds the last ``window_size`` values. Once it is full, every update compares its newest
    ``stat_size`` values with ``stat_size`` values drawn without replacement from the older part, and signals
    a drift when the KS statistic ``D`` reaches the critical value of the exact two-sided test at level
    ``alpha`` (and exceeds 0.1, as in River). The critical value is computed once, in ``__init__``, from the
    exact null distribution for two samples of ``stat_size``; :attr:`statistic` is ``D`` and
    :attr:`threshold` lies half a step below the critical ``D``.

    A test runs at every update, so ``alpha`` is a per-test level, not a false-alarm rate: the default is far
    below River's 0.005 so that long stationary streams stay quiet (see ``BENCHMARKS.md``). The random draws
    come from ``numpy.random.default_rng(seed)``, re-seeded at every reset (as River re-seeds), one row of
    ``window_size − stat_size`` uniforms per test, so :meth:`update_many` draws exactly what per-sample updates
    draw and finds the same drifts.

    Parameters
    ----------
    alpha
        Level of each KS test, in (0, 1).
    window_size
        Length of the sliding window.
    stat_size
        Size of the two samples compared; at most half of ``window_size``.
    seed
        Seed of the sampling generator (None: fresh entropy at every reset).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(12345)
    >>> stream = np.concatenate([rng.normal(0.0, 1.0, 1000), rng.normal(1.0, 1.0, 1000)])
    >>> kswin = KSWIN(seed=1)
    >>> for i, value in enumerate(stream):
    ...     if kswin.update(value).drift_detected:
    ...         print(f"Change detected at index {i}")
    Change detected at index 1076
    >>> KSWIN(seed=1).update_many(stream)
    [1076]
    """

    chunk = _CHUNK

    def __init__(self, alpha: float = 1e-6, window_size: int = 200, stat_size: int = 60, seed: int | None = 0
                 ) -> None:
        self.alpha = check_open_unit("alpha", alpha)
        self.window_size = check_positive_int("window_size", window_size, minimum=2)
        self.stat_size = check_positive_int("stat_size", stat_size)
        if 2 * self.stat_size > self.window_size:
            raise ValueError(f"stat_size must be at most window_size / 2, got stat_size={stat_size} "
                             f"with window_size={window_size}")
        if seed is not None:
            check_positive_int("seed", seed, minimum=0)
        self.seed = seed
        self.critical_count = ks_critical_count(self.alpha, self.stat_size)
        self._threshold = (self.critical_count - 0.5) / self.stat_size
        super().__init__()

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "window_size": self.window_size, "stat_size": self.stat_size, "seed": self.seed}

    def _reset_state(self) -> None:
        self._n = 0
        self._window = np.empty(0)
        self._rng = np.random.default_rng(self.seed)

    @property
    def n_seen(self) -> int:
        """Values seen since the last reset."""
        return self._n

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"n": np.asarray(self._n, np.int64), "window": self._window.copy(), "rng": rng_to_words(self._rng)}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        n = state_scalar(state, "n", "i", minimum=0)
        window = state_array(state, "window", (None,))
        if window.size != min(n, self.window_size):
            raise ValueError(f"'window' holds {window.size} values, after {n} values it holds "
                             f"{min(n, self.window_size)}")
        self._n, self._window = n, window
        self._rng = rng_from_words(state_array(state, "rng", (6,), "u"))

    def _tests(self, windows: np.ndarray) -> np.ndarray:
        """``n·D`` for each full window (rows), drawing one row of uniforms per window."""
        older = self.window_size - self.stat_size
        keys = self._rng.random((windows.shape[0], older))
        picks = np.argpartition(keys, self.stat_size - 1, axis=1)[:, : self.stat_size]
        sample = np.take_along_axis(windows[:, :older], picks, axis=1)
        return ks_counts(sample, windows[:, older:])

    def _update_one(self, x: float) -> None:
        self._n += 1
        self._window = np.append(self._window[-(self.window_size - 1) :], x)
        if self._window.size == self.window_size:
            count = int(self._tests(self._window[None, :])[0])
            self._statistic = count / self.stat_size
            self._drift_detected = count >= self.critical_count

    def _run_chunk(self, x: np.ndarray) -> int | None:
        previous = self._window[-(self.window_size - 1) :]
        history = np.concatenate([previous, x])
        skip = self.window_size - 1 - previous.size  # values of x before the window is full
        end, found = x.size - 1, False
        if history.size >= self.window_size:
            counts = self._tests(sliding_window_view(history, self.window_size))
            hits = np.flatnonzero(counts >= self.critical_count)
            if hits.size:
                end, found = skip + int(hits[0]), True
            self._statistic = float(counts[end - skip]) / self.stat_size
        self._n += end + 1
        self._window = history[: previous.size + end + 1][-self.window_size :].copy()
        self._drift_detected = found
        return end if found else None
