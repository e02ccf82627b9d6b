"""Page-Hinkley drift detection (Page 1954, "Continuous inspection schemes"; Hinkley 1971).

Follows River's detector contract: hyperparameters only in ``__init__``, ``update(x) -> self``, a read-only
``drift_detected`` property, and the state is reset at the first update after a detected drift.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

_MODES = ("up", "down", "both")


class PageHinkley:
    """Page-Hinkley test for a change in the mean of a stream.

    With the running mean ``x̄_t`` of the values seen since the last reset, the cumulative deviations are

        U_t = α·U_{t-1} + (x_t − x̄_t − δ)      (increase),   m_t = min_{s≤t} U_s
        L_t = α·L_{t-1} + (x_t − x̄_t + δ)      (decrease),   M_t = max_{s≤t} L_s

    and a drift is signalled once at least ``min_instances`` values were seen and ``U_t − m_t > λ``
    (mode ``"up"``), ``M_t − L_t > λ`` (mode ``"down"``) or either (``"both"``), where ``δ`` is ``delta``,
    ``λ`` is ``threshold`` and ``α`` is the forgetting factor ``alpha``.

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
        if int(min_instances) < 1:
            raise ValueError(f"min_instances must be >= 1, got {min_instances}")
        if not (math.isfinite(delta) and delta >= 0):
            raise ValueError(f"delta must be finite and >= 0, got {delta}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {threshold}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.min_instances = int(min_instances)
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.mode = mode
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._sum_up = 0.0
        self._min_up = math.inf
        self._sum_down = 0.0
        self._max_down = -math.inf
        self._statistic = 0.0
        self._drift_detected = False

    def __repr__(self) -> str:
        return (
            f"PageHinkley(min_instances={self.min_instances}, delta={self.delta}, "
            f"threshold={self.threshold}, alpha={self.alpha}, mode={self.mode!r})"
        )

    @property
    def drift_detected(self) -> bool:
        """Whether the last :meth:`update` signalled a drift."""
        return self._drift_detected

    @property
    def statistic(self) -> float:
        """The test statistic after the last update: the largest enabled cumulative deviation."""
        return self._statistic

    @property
    def n_seen(self) -> int:
        """Values seen since the last reset."""
        return self._n

    def update(self, x: float) -> PageHinkley:
        """Feed one value; a drift found on the previous call resets the state first. Returns ``self``."""
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"PageHinkley.update got a non-finite value {x}")
        if self._drift_detected:
            self._reset()
        self._n += 1
        self._mean += (x - self._mean) / self._n
        deviation = x - self._mean
        self._sum_up = self.alpha * self._sum_up + deviation - self.delta
        self._sum_down = self.alpha * self._sum_down + deviation + self.delta
        self._min_up = min(self._min_up, self._sum_up)
        self._max_down = max(self._max_down, self._sum_down)
        up = self._sum_up - self._min_up if self.mode != "down" else 0.0
        down = self._max_down - self._sum_down if self.mode != "up" else 0.0
        self._statistic = max(up, down)
        if self._n >= self.min_instances:
            self._drift_detected = self._statistic > self.threshold
        return self

    def update_many(self, values: Iterable[float]) -> list[int]:
        """Feed values in order; return the positions (within ``values``) where a drift was signalled.

        Equivalent to calling :meth:`update` on each value and recording where ``drift_detected`` is true.
        """
        return [i for i, value in enumerate(values) if self.update(value).drift_detected]
