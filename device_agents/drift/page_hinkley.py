"""Page-Hinkley drift detection (Page 1954, "Continuous inspection schemes"; Hinkley 1971)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agents.drift.base import (
    MAX_ABS_VALUE,
    ScalarDetector,
    check_positive_int,
    state_array,
    state_scalar,
)

_MODES = ("up", "down", "both")
_BLOCK = 32  # the forgetting recurrence restarts its partial sum every _BLOCK updates (see the class docstring)
_CHUNK = 4096  # values per vectorized step: a drift wastes at most the rest of one chunk


class PageHinkley(ScalarDetector):
    """Page-Hinkley test for a change in the mean of a stream.

    With the running mean ``x̄_t = S_t / t`` of the values seen since the last reset, the cumulative deviations are

        U_t = α·U_{t-1} + (x_t − x̄_t − δ)      (increase),   m_t = min_{s≤t} U_s
        L_t = α·L_{t-1} + (x_t − x̄_t + δ)      (decrease),   M_t = max_{s≤t} L_s

    and a drift is signalled once at least ``min_instances`` values were seen and ``U_t − m_t > λ``
    (mode ``"up"``), ``M_t − L_t > λ`` (mode ``"down"``) or either (``"both"``), where ``δ`` is ``delta``,
    ``λ`` is ``threshold`` and ``α`` is the forgetting factor ``alpha``. The defaults are River's.

    Both paths evaluate ``U_t`` in blocks of 32 updates counted from the reset: ``U_t = α^(k+1)·U_b + P_k`` with
    ``U_b`` the value at the end of the previous block and ``P_k = α·P_{k−1} + e_k`` the partial sum inside the
    block (the same recurrence, regrouped). :meth:`update_many` runs the ``P`` recurrence across all blocks at
    once (32 vector steps) and chains the block starts, so it computes the per-sample path's numbers bit for
    bit; running sums use ``cumsum``, which adds in the per-sample order.

    Parameters
    ----------
    min_instances
        Values to see after a reset before a drift may be signalled.
    delta
        Magnitude of change tolerated without alarm, at most ``1e100`` (the bound on the values).
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

    chunk = _CHUNK

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
        mode: str = "both",
    ) -> None:
        self.min_instances = check_positive_int("min_instances", min_instances)
        if not 0 <= delta <= MAX_ABS_VALUE:
            raise ValueError(f"delta must be in [0, {MAX_ABS_VALUE:g}] (larger offsets overflow the cumulative "
                             f"sums), got {delta}")
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
        self._offsets = np.array([-self.delta, self.delta])
        self._powers = np.power(self.alpha, np.arange(1, _BLOCK + 1, dtype=np.float64))  # α^(k+1)
        super().__init__()

    def _params(self) -> dict[str, Any]:
        return {"min_instances": self.min_instances, "delta": self.delta, "threshold": self._threshold,
                "alpha": self.alpha, "mode": self.mode}

    def _reset_state(self) -> None:
        self._n = 0
        self._sum = 0.0
        self._block_start = np.zeros(2)  # (U, L) at the end of the previous block of _BLOCK updates
        self._partial = np.zeros(2)  # Σ α^{k−j}·e_j over the current block so far
        self._sums = np.zeros(2)  # (U_t, L_t)
        self._min_up = math.inf
        self._max_down = -math.inf

    @property
    def n_seen(self) -> int:
        """Values seen since the last reset."""
        return self._n

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"n": np.asarray(self._n, np.int64), "sum": np.asarray(self._sum, np.float64),
                "block_start": self._block_start.copy(), "partial": self._partial.copy(), "sums": self._sums.copy(),
                "min_up": np.asarray(self._min_up, np.float64), "max_down": np.asarray(self._max_down, np.float64)}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._n = state_scalar(state, "n", "i", minimum=0)
        self._sum = state_scalar(state, "sum", "f")
        self._block_start, self._partial, self._sums = (state_array(state, key, (2,))
                                                        for key in ("block_start", "partial", "sums"))
        self._min_up = state_scalar(state, "min_up", "f", allow=(math.inf,))
        self._max_down = state_scalar(state, "max_down", "f", allow=(-math.inf,))
        if self._n == 0:
            if self._sum or np.any(self._block_start) or np.any(self._partial) or np.any(self._sums) or (
                    self._min_up != math.inf or self._max_down != -math.inf):
                raise ValueError("a state with n = 0 must be the fresh state (zero sums, no extremes)")
            return
        # each step adds a deviation of at most 2·MAX_ABS_VALUE (+ delta) to the sums: larger ones are not a
        # state any stream within the input bound reaches
        bound = self._n * (2 * MAX_ABS_VALUE + self.delta) * 2
        values = np.r_[self._sum, self._block_start, self._partial, self._sums, self._min_up, self._max_down]
        if not np.all(np.abs(values) <= bound):
            raise ValueError(f"sums beyond what {self._n} values of magnitude <= {MAX_ABS_VALUE:g} can reach")

    def _update_one(self, x: float) -> None:
        k = self._n % _BLOCK
        self._n += 1
        self._sum += x
        deviation = x - self._sum / self._n
        if k == 0:
            self._block_start, self._partial = self._sums, np.zeros(2)
        self._partial = self.alpha * self._partial + (deviation + self._offsets)
        self._sums = self._powers[k] * self._block_start + self._partial
        up, down = float(self._sums[0]), float(self._sums[1])
        self._min_up = min(self._min_up, up)
        self._max_down = max(self._max_down, down)
        stat_up = up - self._min_up if self.mode != "down" else 0.0
        stat_down = self._max_down - down if self.mode != "up" else 0.0
        self._statistic = max(stat_up, stat_down)
        self._drift_detected = self._n >= self.min_instances and self._statistic > self._threshold

    def _cumulative(self, e: np.ndarray) -> np.ndarray:
        """(U_t, L_t) for steps with offsets ``e`` (m, 2), by the per-sample path's block arithmetic."""
        first = self._n % _BLOCK
        rows = (first + e.shape[0] + _BLOCK - 1) // _BLOCK
        grid = np.zeros((rows * _BLOCK, 2))
        grid[first : first + e.shape[0]] = e
        grid = grid.reshape(rows, _BLOCK, 2)
        partial = np.empty_like(grid)
        prev = np.zeros((rows, 2))
        for k in range(_BLOCK):  # one column of every block at a time: the same operations as per sample
            if k == first and first:
                prev[0] = self._partial
            prev = self.alpha * prev + grid[:, k]
            partial[:, k] = prev
        up, down = (self._block_start if first else self._sums).tolist()
        last, ends = float(self._powers[_BLOCK - 1]), partial[:, _BLOCK - 1].tolist()
        chain = [(up, down)]
        for end_up, end_down in ends[:-1]:  # Python floats: the same IEEE operations as numpy's, faster here
            up, down = last * up + end_up, last * down + end_down
            chain.append((up, down))
        starts = np.array(chain)
        sums = self._powers[None, :, None] * starts[:, None, :] + partial
        self._partial_out = partial.reshape(-1, 2)[first : first + e.shape[0]]
        self._starts_out = np.repeat(starts, _BLOCK, axis=0)[first : first + e.shape[0]]
        return sums.reshape(-1, 2)[first : first + e.shape[0]]

    def _run_chunk(self, x: np.ndarray) -> int | None:
        n = self._n + np.arange(1, x.size + 1, dtype=np.int64)
        sums = np.cumsum(np.r_[self._sum, x])[1:]
        deviation = x - sums / n
        both = self._cumulative(deviation[:, None] + self._offsets[None, :])
        up, down = both[:, 0], both[:, 1]
        min_up = np.minimum.accumulate(np.r_[self._min_up, up])[1:]
        max_down = np.maximum.accumulate(np.r_[self._max_down, down])[1:]
        stat_up = up - min_up if self.mode != "down" else np.zeros_like(up)
        stat_down = max_down - down if self.mode != "up" else np.zeros_like(down)
        stat = np.maximum(stat_up, stat_down)
        hits = np.flatnonzero((n >= self.min_instances) & (stat > self._threshold))
        end = int(hits[0]) if hits.size else x.size - 1
        self._n, self._sum = int(n[end]), float(sums[end])
        self._sums = both[end].copy()
        self._partial, self._block_start = self._partial_out[end].copy(), self._starts_out[end].copy()
        self._min_up, self._max_down = float(min_up[end]), float(max_down[end])
        self._statistic = float(stat[end])
        self._drift_detected = bool(hits.size)
        return end if hits.size else None
