"""Page-Hinkley drift detection (Page 1954, "Continuous inspection schemes"; Hinkley 1971)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from device_agents.drift.base import ScalarDetector, check_positive_int

_MODES = ("up", "down", "both")


class PageHinkley(ScalarDetector):
    """Page-Hinkley test for a change in the mean of a stream.

    With the running mean ``x̄_t = S_t / t`` of the values seen since the last reset, the cumulative deviations are

        U_t = α·U_{t-1} + (x_t − x̄_t − δ)      (increase),   m_t = min_{s≤t} U_s
        L_t = α·L_{t-1} + (x_t − x̄_t + δ)      (decrease),   M_t = max_{s≤t} L_s

    and a drift is signalled once at least ``min_instances`` values were seen and ``U_t − m_t > λ``
    (mode ``"up"``), ``M_t − L_t > λ`` (mode ``"down"``) or either (``"both"``), where ``δ`` is ``delta``,
    ``λ`` is ``threshold`` and ``α`` is the forgetting factor ``alpha``. The defaults are River's.

    :meth:`update_many` computes the running sums with ``cumsum`` (bit-identical to the per-sample sums) and the
    forgetting recurrence with one tight loop (a plain ``cumsum`` when ``alpha == 1``), so both paths give the
    same statistic to the last bit.

    Parameters
    ----------
    min_instances
        Values to see after a reset before a drift may be signalled.
    delta
        Magnitude of change tolerated without alarm.
    threshold
        Detection threshold λ on the cumulative deviation.
    alpha
        Forgetting factor of the cumulative sums, in (0, 1].
    mode
        ``"up"`` detects increases of the mean, ``"down"`` decreases, ``"both"`` either.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(7)
    >>> stream = np.concatenate([rng.normal(0.2, 0.05, 500), rng.normal(0.5, 0.05, 500)])
    >>> ph = PageHinkley(threshold=5.0, mode="up")
    >>> for i, value in enumerate(stream):
    ...     if ph.update(value).drift_detected:
    ...         print(f"Change detected at index {i}")
    Change detected at index 517
    >>> PageHinkley(threshold=5.0, mode="up").update_many(stream)
    [517]
    """

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
        mode: str = "both",
    ) -> None:
        self.min_instances = check_positive_int("min_instances", min_instances)
        if not (math.isfinite(delta) and delta >= 0):
            raise ValueError(f"delta must be finite and >= 0, got {delta}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {threshold}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.delta = float(delta)
        self._threshold = float(threshold)
        self.alpha = float(alpha)
        self.mode = mode
        super().__init__()

    def _params(self) -> dict[str, Any]:
        return {"min_instances": self.min_instances, "delta": self.delta, "threshold": self._threshold,
                "alpha": self.alpha, "mode": self.mode}

    def _reset_state(self) -> None:
        self._n = 0
        self._sum = 0.0
        self._sum_up = 0.0
        self._min_up = math.inf
        self._sum_down = 0.0
        self._max_down = -math.inf

    @property
    def n_seen(self) -> int:
        """Values seen since the last reset."""
        return self._n

    def _update_one(self, x: float) -> None:
        self._n += 1
        self._sum += x
        deviation = x - self._sum / self._n
        self._sum_up = self.alpha * self._sum_up + (deviation - self.delta)
        self._sum_down = self.alpha * self._sum_down + (deviation + self.delta)
        self._min_up = min(self._min_up, self._sum_up)
        self._max_down = max(self._max_down, self._sum_down)
        up = self._sum_up - self._min_up if self.mode != "down" else 0.0
        down = self._max_down - self._sum_down if self.mode != "up" else 0.0
        self._statistic = max(up, down)
        self._drift_detected = self._n >= self.min_instances and self._statistic > self._threshold

    def _recurrence(self, start: float, steps: np.ndarray) -> np.ndarray:
        """``u_i = α·u_{i-1} + steps_i`` from ``u_{-1} = start``, in the per-sample path's arithmetic."""
        if self.alpha == 1.0:
            return np.cumsum(np.r_[start, steps])[1:]
        a = self.alpha
        acc = itertools.accumulate(steps.tolist(), lambda u, s: a * u + s, initial=start)
        return np.fromiter(acc, np.float64, steps.size + 1)[1:]

    def _run(self, x: np.ndarray) -> int | None:
        n = self._n + np.arange(1, x.size + 1, dtype=np.int64)
        sums = np.cumsum(np.r_[self._sum, x])[1:]
        deviation = x - sums / n
        up = self._recurrence(self._sum_up, deviation - self.delta)
        down = self._recurrence(self._sum_down, deviation + self.delta)
        min_up = np.minimum.accumulate(np.r_[self._min_up, up])[1:]
        max_down = np.maximum.accumulate(np.r_[self._max_down, down])[1:]
        stat_up = up - min_up if self.mode != "down" else np.zeros_like(up)
        stat_down = max_down - down if self.mode != "up" else np.zeros_like(down)
        stat = np.maximum(stat_up, stat_down)
        hits = np.flatnonzero((n >= self.min_instances) & (stat > self._threshold))
        end = int(hits[0]) if hits.size else x.size - 1
        self._n, self._sum = int(n[end]), float(sums[end])
        self._sum_up, self._sum_down = float(up[end]), float(down[end])
        self._min_up, self._max_down = float(min_up[end]), float(max_down[end])
        self._statistic = float(stat[end])
        self._drift_detected = bool(hits.size)
        return end if hits.size else None
