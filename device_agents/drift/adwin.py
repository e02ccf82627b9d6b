"""ADWIN: adaptive windowing with an exponential histogram (Bifet & Gavaldà 2007, "Learning from time-changing
data with adaptive windowing", SDM; the ADWIN2 variant of §4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agents.drift.base import (
    MAX_ABS_VALUE,
    ScalarDetector,
    check_open_unit,
    check_positive_int,
    state_array,
    state_scalar,
)

_CHUNK = 1 << 15  # values per vectorized step: bounds the (ticks × levels × buckets) candidate arrays


class ADWIN(ScalarDetector):
    """ADWIN2 change detector over a stream of numbers.

    The window ``W`` (everything since the last reset) is summarised by an exponential histogram: buckets of
    ``2^i`` consecutive values, at most ``max_buckets`` per level; when a level holds one more, its two oldest
    buckets merge into one bucket of the next level. Memory is ``O(max_buckets · log |W|)``. A bucket keeps
    the running sums ``Σ(x − x₀)`` and ``Σ(x − x₀)²`` at its end (``x₀`` is the first value after the reset),
    from which every split's counts, means and the window variance follow.

    Every ``clock`` values (once ``|W| > grace_period``) each bucket boundary splits ``W`` into an older
    ``W₀`` and a newer ``W₁`` (both at least ``min_window_length`` long), and a drift is signalled when for
    some split (§4, with ``1/m = 1/n₀ + 1/n₁`` and ``δ' = δ / ln |W|``)

        |μ̂₀ − μ̂₁| > ε_cut = sqrt(2/m · σ̂²_W · ln(2/δ')) + 2/(3m) · ln(2/δ').

    As in River, the first update after a drift resets the detector (``W`` restarts empty), so the histogram
    is a function of ``|W|`` alone; :meth:`update_many` uses that to build the buckets of every check at once
    from prefix sums, bit-identical to the per-sample path. :attr:`statistic` is the largest
    ``|μ̂₀ − μ̂₁| / ε_cut`` of the last check (threshold 1).

    Parameters
    ----------
    delta
        Confidence δ in (0, 1): smaller means fewer false alarms and later detections.
    clock
        Check for a cut every ``clock`` values.
    max_buckets
        Buckets per level of the exponential histogram (the paper's M).
    min_window_length
        Smallest ``W₀`` and ``W₁`` a split may leave.
    grace_period
        Values to see after a reset before the first check.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(42)
    >>> stream = np.concatenate([rng.normal(0.0, 1.0, 1000), rng.normal(1.0, 1.0, 1000)])
    >>> adwin = ADWIN()
    >>> for i, value in enumerate(stream):
    ...     if adwin.update(value).drift_detected:
    ...         print(f"Change detected at index {i}")
    Change detected at index 1055
    >>> ADWIN().update_many(stream)
    [1055]
    """

    chunk = _CHUNK

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
    ) -> None:
        self.delta = check_open_unit("delta", delta)
        self.clock = check_positive_int("clock", clock)
        self.max_buckets = check_positive_int("max_buckets", max_buckets, minimum=2)
        self.min_window_length = check_positive_int("min_window_length", min_window_length)
        self.grace_period = check_positive_int("grace_period", grace_period, minimum=0)
        self._threshold = 1.0
        super().__init__()

    def _params(self) -> dict[str, Any]:
        return {"delta": self.delta, "clock": self.clock, "max_buckets": self.max_buckets,
                "min_window_length": self.min_window_length, "grace_period": self.grace_period}

    def _reset_state(self) -> None:
        self._n = 0
        self._shift = 0.0
        self._sum = 0.0
        self._sq = 0.0
        # levels[i]: buckets of 2^i values, oldest first, each (end position, Σ(x−x₀), Σ(x−x₀)²) at its end
        self._levels: list[list[tuple[int, float, float]]] = [[]]

    @property
    def n_seen(self) -> int:
        """Values seen since the last reset (the window width)."""
        return self._n

    def _state_arrays(self) -> dict[str, np.ndarray]:
        buckets = np.array([b for level in self._levels for b in level], dtype=np.float64).reshape(-1, 3)
        return {"n": np.asarray(self._n, np.int64), "shift": np.asarray(self._shift, np.float64),
                "sum": np.asarray(self._sum, np.float64), "sq": np.asarray(self._sq, np.float64),
                "level_sizes": np.array([len(level) for level in self._levels], np.int64),
                "bucket_end": buckets[:, 0].astype(np.int64), "bucket_sum": buckets[:, 1], "bucket_sq": buckets[:, 2]}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        n = state_scalar(state, "n", "i", minimum=0)
        sizes = state_array(state, "level_sizes", (None,), "i")
        ends = state_array(state, "bucket_end", (None,), "i")
        sums = state_array(state, "bucket_sum", (ends.size,))
        sqs = state_array(state, "bucket_sq", (ends.size,))
        if sizes.size == 0 or sizes.min() < 0 or int(sizes.sum()) != ends.size:
            raise ValueError(f"'level_sizes' {sizes.tolist()} does not partition the {ends.size} buckets")
        # the bucket structure is a function of n alone (see _ends): the saved one must be it
        want, exists = self._ends(np.array([max(n, 1)], np.int64))
        per_level = [ends_of[kept] for ends_of, kept in zip(want[0].reshape(-1, self.max_buckets),
                                                             exists[0].reshape(-1, self.max_buckets), strict=True)
                     ] if n else []
        levels: list[list[tuple[int, float, float]]] = []
        start = 0
        for i, size in enumerate(sizes.tolist()):
            expected = per_level[i].tolist() if i < len(per_level) else []
            got = ends[start : start + size].tolist()
            if got != expected:
                raise ValueError(f"level {i} holds buckets ending at {got[:8]}, the histogram of {n} values "
                                 f"ends them at {expected[:8]}")
            levels.append([(int(e), float(a), float(b)) for e, a, b in zip(got, sums[start : start + size],
                                                                             sqs[start : start + size], strict=True)])
            start += size
        if sum(len(x) for x in per_level) != ends.size:
            raise ValueError(f"the histogram of {n} values has {sum(len(x) for x in per_level)} buckets, got "
                             f"{ends.size}")
        shift, total, sq = (state_scalar(state, key, "f") for key in ("shift", "sum", "sq"))
        # buckets carry the prefix sums at their end: oldest first, the sums of squares never decrease, and the
        # newest one is the whole window's (n, sum, sq)
        prefix = [b for level in reversed(levels) for b in level]
        squares = np.array([b[2] for b in prefix])
        if n and (prefix[-1] != (n, total, sq) or squares.min() < 0 or np.any(np.diff(squares) < 0)):
            raise ValueError("the buckets' prefix sums disagree with each other or with the window's (n, sum, sq)")
        if not n and (total or sq):
            raise ValueError("a state with n = 0 must have zero sums")
        if abs(total) > n * 2 * MAX_ABS_VALUE or sq > n * 4 * MAX_ABS_VALUE**2 or abs(shift) > MAX_ABS_VALUE:
            raise ValueError(f"sums beyond what {n} values of magnitude <= {MAX_ABS_VALUE:g} can reach")
        self._n, self._levels, self._shift, self._sum, self._sq = n, levels, shift, total, sq

    @property
    def width(self) -> int:
        """The window width ``|W|``."""
        return self._n

    @property
    def n_buckets(self) -> int:
        """Buckets held by the exponential histogram."""
        return sum(len(level) for level in self._levels)

    @property
    def estimation(self) -> float:
        """Mean of the window."""
        return self._shift + self._sum / self._n if self._n else 0.0

    # -- the cut test, shared by both paths (elementwise, so bit-identical whatever the array shapes) --------
    def _cut(self, p: np.ndarray, sp: np.ndarray, qp: np.ndarray, n: np.ndarray, s: np.ndarray, q: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """Per split at ``p`` of a window of ``n`` values: (cut?, |μ̂₀ − μ̂₁| / ε_cut)."""
        n0, n1 = p.astype(np.float64), (n - p).astype(np.float64)
        diff = np.abs(sp / n0 - (s - sp) / n1)
        nf = n.astype(np.float64)
        var = np.maximum((q - s * s / nf) / nf, 0.0)
        inv_m = 1.0 / n0 + 1.0 / n1
        log_term = np.log(2.0 * np.log(nf) / self.delta)
        eps = np.sqrt(2.0 * inv_m * var * log_term) + (2.0 / 3.0) * inv_m * log_term
        valid = (p >= self.min_window_length) & (n - p >= self.min_window_length)
        return valid & (diff > eps), np.where(valid, diff / eps, 0.0)

    def _is_check(self, n: int) -> bool:
        return n % self.clock == 0 and n > self.grace_period

    # -- per-sample path ---------------------------------------------------------------------------------------
    def _update_one(self, x: float) -> None:
        if self._n == 0:
            self._shift = x
        d = x - self._shift
        self._n += 1
        self._sum += d
        self._sq += d * d
        levels = self._levels
        levels[0].append((self._n, self._sum, self._sq))
        i = 0
        while len(levels[i]) > self.max_buckets:  # merge the two oldest: the boundary between them goes
            del levels[i][0]
            if i + 1 == len(levels):
                levels.append([])
            levels[i + 1].append(levels[i].pop(0))
            i += 1
        if self._is_check(self._n):
            ends = [b for level in reversed(levels) for b in level][:-1]
            if ends:
                arr = np.array(ends, dtype=np.float64)
                p = arr[:, 0].astype(np.int64)
                cut, ratio = self._cut(p, arr[:, 1], arr[:, 2], np.full(p.shape, self._n, np.int64),
                                       np.full(p.shape, self._sum), np.full(p.shape, self._sq))
                self._statistic = float(ratio.max())
                self._drift_detected = bool(cut.any())

    # -- vectorized path ---------------------------------------------------------------------------------------
    def _counts(self, n: np.ndarray) -> np.ndarray:
        """Buckets per level ``(len(n), levels)`` of the histogram after ``n`` values (from empty)."""
        levels = max(1, int(n.max()).bit_length())
        counts = np.zeros((n.size, levels), np.int64)
        arrivals = n.astype(np.int64)
        for i in range(levels):
            merges = np.maximum((arrivals - self.max_buckets + 1) // 2, 0)
            counts[:, i] = arrivals - 2 * merges
            arrivals = merges
        return counts

    def _ends(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bucket end positions after ``n`` values, ``(len(n), levels·max_buckets)``, and which exist."""
        counts = self._counts(n)
        levels = counts.shape[1]
        size = np.left_shift(1, np.arange(levels, dtype=np.int64))
        above = np.cumsum((counts * size)[:, ::-1], axis=1)[:, ::-1] - counts * size  # values in older levels
        k = np.arange(1, self.max_buckets + 1, dtype=np.int64)
        ends = above[:, :, None] + k[None, None, :] * size[None, :, None]
        exists = k[None, None, :] <= counts[:, :, None]
        return ends.reshape(n.size, -1), exists.reshape(n.size, -1)

    def _stored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ends = [b for level in reversed(self._levels) for b in level]
        arr = np.array(ends, dtype=np.float64).reshape(-1, 3)
        return arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2]

    def _run_chunk(self, x: np.ndarray) -> int | None:
        base = self._n
        if base == 0:
            self._shift = float(x[0])
        d = x - self._shift
        sums = np.cumsum(np.r_[self._sum, d])[1:]
        sqs = np.cumsum(np.r_[self._sq, d * d])[1:]
        old_p, old_s, old_q = self._stored()
        positions = base + np.arange(1, x.size + 1, dtype=np.int64)
        checks = positions[(positions % self.clock == 0) & (positions > self.grace_period)]
        end, stat, found = x.size - 1, None, False
        if checks.size:
            ends, exists = self._ends(checks)
            keep = exists & (ends < checks[:, None])
            rows, cols = np.nonzero(keep)
            p = ends[rows, cols]
            sp, qp = self._prefix(p, base, sums, sqs, old_p, old_s, old_q)
            tick_idx = checks[rows] - base - 1
            cut, ratio = self._cut(p, sp, qp, checks[rows], sums[tick_idx], sqs[tick_idx])
            per_tick = np.zeros(checks.size)
            np.maximum.at(per_tick, rows, ratio)
            cut_ticks = np.unique(rows[cut])
            last = int(cut_ticks[0]) if cut_ticks.size else checks.size - 1
            if cut_ticks.size:
                end, found = int(checks[last] - base - 1), True
            stat = float(per_tick[last]) if keep[last].any() else None
        self._rebuild(base + end + 1, base, sums, sqs, old_p, old_s, old_q)
        self._sum, self._sq = float(sums[end]), float(sqs[end])
        if stat is not None:
            self._statistic = stat
        self._drift_detected = found
        return end if found else None

    @staticmethod
    def _prefix(p: np.ndarray, base: int, sums: np.ndarray, sqs: np.ndarray, old_p: np.ndarray,
                old_s: np.ndarray, old_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums at positions ``p``: from this chunk's cumsums, or the stored bucket ends before it."""
        new = p > base
        sp, qp = np.empty(p.shape), np.empty(p.shape)
        sp[new], qp[new] = sums[p[new] - base - 1], sqs[p[new] - base - 1]
        if (~new).any():
            at = np.searchsorted(old_p, p[~new])
            sp[~new], qp[~new] = old_s[at], old_q[at]
        return sp, qp

    def _rebuild(self, n: int, base: int, sums: np.ndarray, sqs: np.ndarray, old_p: np.ndarray,
                 old_s: np.ndarray, old_q: np.ndarray) -> None:
        """Set the histogram to its state after ``n`` values."""
        ends, exists = self._ends(np.array([n], np.int64))
        ends, exists = ends[0].reshape(-1, self.max_buckets), exists[0].reshape(-1, self.max_buckets)
        levels = []
        for row, ok in zip(ends, exists, strict=True):  # level 0 first; within a level oldest first
            p = row[ok]
            sp, qp = self._prefix(p, base, sums, sqs, old_p, old_s, old_q)
            levels.append(list(zip(p.tolist(), sp.tolist(), qp.tolist(), strict=True)))
        while len(levels) > 1 and not levels[-1]:
            levels.pop()
        self._levels = levels
        self._n = n
