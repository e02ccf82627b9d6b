"""Windowed-mean detectors on feature vectors, with thresholds calibrated to an expected run time.

A :class:`WindowedEmbeddingDetector` maps each feature vector to an embedding ``e(x) ∈ R^q``, keeps the mean
``ē_t`` of the last ``window_size`` embeddings, and signals a drift when a statistic ``g(ē_t)`` exceeds a
threshold ``h``. Subclasses choose ``e`` and ``g`` (:class:`~device_agents.drift.mmd.MMDDrift`: random Fourier
features and the squared distance to the reference mean embedding, i.e. an MMD²;
:class:`~device_agents.drift.mahalanobis.MahalanobisDrift`: the Mahalanobis score and its windowed mean).

**Calibration to an expected run time (ERT).** The ERT is the average number of updates until a false alarm
when nothing changes (the online detectors of alibi-detect are configured the same way). Here ``h`` is set by
simulation: ``n_runs`` no-change streams of ``run_length`` updates are drawn with replacement from reference
data (:meth:`WindowedEmbeddingDetector._null_pools`), the largest statistic of each run is recorded, a Gumbel
law is fitted to these maxima by moments (the maximum of a long stationary run of a statistic with an
exponential tail is Gumbel), and ``h`` is the level that a run of ``run_length`` stays below with probability
``exp(−run_length / ERT)`` — the no-alarm probability when the run time to a false alarm is exponential with
mean ERT. That is ``h = μ + β·ln(ERT / run_length)`` for the fitted location ``μ`` and scale ``β``; the fit
extrapolates to ERTs far longer than anything simulated. The benchmark measures the false alarms this yields.

**Reference.** Given in ``__init__`` (source features), or — with ``reference=None`` — the first
``reference_size`` updates after each reset are taken as the reference (no drift can be signalled meanwhile),
so after a drift the detector re-learns the new regime.

Both update paths run the same code over rows (per-sample updates are batches of one): embeddings use
row-wise arithmetic (``einsum``, elementwise functions, last-axis sums) whose result for a row does not depend
on the other rows, and window sums are differences of a running ``cumsum``, so :meth:`update` and
:meth:`update_many` signal drift at the same positions.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping

import numpy as np

from device_agents.drift.base import (
    MAX_ABS_VALUE,
    FeatureDetector,
    StateOverflowError,
    check_positive_int,
    state_array,
    state_scalar,
)

EULER_GAMMA = 0.5772156649015329


def gumbel_threshold(maxima: np.ndarray, run_length: int, ert: float) -> float:
    """The level a run of ``run_length`` exceeds with probability ``1 − exp(−run_length/ert)``, from a
    moment fit of a Gumbel law to ``maxima`` (the largest statistic of each simulated no-change run)."""
    m = np.asarray(maxima, dtype=np.float64)
    if m.size < 2:
        raise ValueError(f"need at least 2 run maxima to fit a Gumbel law, got {m.size}")
    # the moments of m / 2^k (k: the exponent of the largest |m|), so squared deviations of huge maxima cannot
    # overflow; dividing by a power of two is exact, so ordinary maxima give the same numbers bit for bit
    top = float(np.max(np.abs(m)))
    unit = 2.0 ** math.frexp(top)[1] if math.isfinite(top) and top > 1.0 else 1.0
    std = float(np.std(m / unit, ddof=1)) * unit
    scale = max(std * math.sqrt(6.0) / math.pi, 1e-12)
    location = float(np.mean(m / unit)) * unit - EULER_GAMMA * scale
    return location + scale * math.log(ert / run_length)


def cumsum_rows(a: np.ndarray) -> np.ndarray:
    """``np.cumsum(a, axis=0)`` (the same sequential sums, bit for bit), computed along contiguous memory."""
    return np.ascontiguousarray(a.T).cumsum(axis=1).T


class WindowedEmbeddingDetector(FeatureDetector):
    """Drift when a statistic of the mean embedding of the last ``window_size`` rows exceeds an ERT-calibrated
    threshold. See the module docstring for the calibration."""

    def __init__(self, dim: int, reference: np.ndarray | None, window_size: int, ert: float, reference_size: int,
                 n_runs: int, run_length: int, seed: int) -> None:
        self.dim = check_positive_int("dim", dim)
        self.window_size = check_positive_int("window_size", window_size)
        if not (math.isfinite(ert) and ert > window_size):
            raise ValueError(f"ert must be finite and > window_size ({window_size}), got {ert}")
        self.ert = float(ert)
        self.reference_size = check_positive_int("reference_size", reference_size, minimum=2)
        self.n_runs = check_positive_int("n_runs", n_runs, minimum=10)
        self.run_length = check_positive_int("run_length", run_length, minimum=window_size + 1)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self._given = reference is not None
        self._fitted = False
        if reference is not None:
            ref = np.asarray(reference, dtype=np.float64)
            if ref.ndim != 2 or ref.shape[1] != self.dim or ref.shape[0] < 2:
                raise ValueError(f"reference must have shape (n >= 2, {self.dim}), got {ref.shape}")
            if not np.all(np.isfinite(ref)):
                raise ValueError("reference contains non-finite values")
            if not np.all(np.abs(ref) <= MAX_ABS_VALUE):
                raise ValueError(f"reference contains values of magnitude above {MAX_ABS_VALUE:g} (largest "
                                 f"{float(np.abs(ref).max()):g})")
            self._fit_and_calibrate(ref)
        super().__init__()

    # -- what subclasses define ----------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, reference: np.ndarray) -> None:
        """Set the embedding and the reference statistics from reference rows."""

    @abstractmethod
    def _embed(self, x: np.ndarray) -> np.ndarray:
        """Embeddings ``(n, q)`` of rows ``x`` (row-wise arithmetic only)."""

    @abstractmethod
    def _score(self, window_mean: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        """The statistic of each window-mean row (against ``reference``, default the fitted one)."""

    def _null_pools(self, reference: np.ndarray, rng: np.random.Generator, run: int
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings to draw a no-change run from, and the reference statistic to score it against."""
        return self._embed(reference), None

    # -- calibration ---------------------------------------------------------------------------------------
    def _fit_and_calibrate(self, reference: np.ndarray) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite threshold is refused below
            self._calibrate(reference)

    def _calibrate(self, reference: np.ndarray) -> None:
        self._fit(reference)
        rng = np.random.default_rng(self.seed)
        maxima = np.empty(self.n_runs)
        for run in range(self.n_runs):
            pool, ref_stat = self._null_pools(reference, rng, run)
            rows = pool[rng.integers(0, pool.shape[0], self.run_length)]
            sums = cumsum_rows(np.concatenate([np.zeros((1, rows.shape[1])), rows]))
            means = (sums[self.window_size :] - sums[: -self.window_size]) / self.window_size
            maxima[run] = float(self._score(means, ref_stat).max())
        threshold = gumbel_threshold(maxima, self.run_length, self.ert)
        if not math.isfinite(threshold):
            raise ValueError(f"{type(self).__name__}: the reference gives a non-finite threshold {threshold} (its "
                             "embeddings or scores overflow: a degenerate covariance or bandwidth?)")
        self._threshold = threshold
        self.null_maxima = maxima
        self._fitted = True

    # -- state ---------------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        if not self._given:
            self._fitted = False
            self._learnt: np.ndarray | None = None  # the reference rows learnt after the last reset
        self._buffer: list[np.ndarray] = []
        self._n = 0
        self._cum: np.ndarray | None = None
        self._ring: np.ndarray | None = None  # cumulative sums before each of the last window_size rows

    @property
    def n_seen(self) -> int:
        """Rows seen since the last reset (reference rows included)."""
        return self._n + sum(b.shape[0] for b in self._buffer)

    def _embedding_size(self) -> int:
        """``q``, the width of the fitted embedding (the window sums' width)."""
        return int(self._embed(np.zeros((1, self.dim))).shape[1])

    def _state_arrays(self) -> dict[str, np.ndarray]:
        q = self._embedding_size() if self._fitted else 0
        return {
            "n": np.asarray(self._n, np.int64),
            "cum": np.zeros(0) if self._cum is None else self._cum.copy(),
            "ring": np.zeros((0, q)) if self._ring is None else self._ring.copy(),
            "buffer": np.concatenate(self._buffer) if self._buffer else np.zeros((0, self.dim)),
            "reference": (self._learnt.copy() if not self._given and self._learnt is not None
                          else np.zeros((0, self.dim))),
        }

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        n = state_scalar(state, "n", "i", minimum=0)
        buffer = state_array(state, "buffer", (None, self.dim))
        reference = state_array(state, "reference", (None, self.dim))
        for key, rows in (("buffer", buffer), ("reference", reference)):
            if rows.size and not np.all(np.abs(rows) <= MAX_ABS_VALUE):  # what update_many itself refuses
                raise ValueError(f"{key!r} holds values of magnitude above {MAX_ABS_VALUE:g}")
        if self._given and reference.shape[0]:
            raise ValueError("a detector given its reference holds no learnt one, got "
                             f"{reference.shape[0]} reference rows")
        if not self._given:  # fitted from learnt rows, or still learning them
            if reference.shape[0] not in (0, self.reference_size):
                raise ValueError(f"'reference' holds {reference.shape[0]} rows, a learnt reference "
                                 f"{self.reference_size}")
            if reference.shape[0]:
                self._fit_and_calibrate(reference)  # deterministic: the same embedding and threshold
            else:
                self._fitted = False
            self._learnt = reference if reference.shape[0] else None
        if not self._fitted:
            if n or buffer.shape[0] >= self.reference_size:
                raise ValueError(f"a detector learning its reference holds fewer than {self.reference_size} "
                                 f"buffered rows and n = 0, got {buffer.shape[0]} and n = {n}")
            self._n, self._buffer, self._cum, self._ring = 0, [buffer] if buffer.shape[0] else [], None, None
            return
        if buffer.shape[0]:
            raise ValueError(f"a fitted detector buffers no rows, got {buffer.shape[0]}")
        q = self._embedding_size()
        rows = n - (0 if self._given else self.reference_size)  # rows embedded since the fit
        if rows < 0:
            raise ValueError(f"'n' = {n} is below the {self.reference_size} reference rows")
        cum = state_array(state, "cum", (q,) if rows else (0,))
        ring = state_array(state, "ring", (min(rows, self.window_size - 1), q))
        self._n, self._buffer = n, []
        self._cum, self._ring = (cum, ring) if rows else (None, None)
        # the sums must leave room for the stream: a state whose next ordinary row (a zero feature vector) would
        # already overflow them, or whose current window statistic is not finite, would refuse every update
        probe = self._save_state()
        try:
            self._run_fitted(np.zeros((1, self.dim)))
        except StateOverflowError:
            raise ValueError("the window sums would overflow at the next row") from None
        finally:
            self._restore_state(probe)

    @property
    def fitted(self) -> bool:
        """Whether a reference is set (given, or learnt from the first rows after the last reset)."""
        return self._fitted

    def _run(self, x: np.ndarray) -> int | None:
        offset = 0
        if not self._fitted:
            have = sum(b.shape[0] for b in self._buffer)
            take = min(self.reference_size - have, x.shape[0])
            self._buffer.append(x[:take].copy())
            offset = take
            if have + take < self.reference_size:
                return None
            learnt = np.concatenate(self._buffer)
            try:
                self._fit_and_calibrate(learnt)
            except ValueError as exc:  # the reference rows learnt so far cannot be used
                raise StateOverflowError(take - 1, f"the reference completed by this row fails ({exc}); "
                                         "reset() to learn a new one") from None
            self._n = self.reference_size
            self._buffer, self._learnt = [], learnt
            x = x[take:]
            if x.shape[0] == 0:
                return None
        try:
            hit = self._run_fitted(x)
        except StateOverflowError as exc:
            raise StateOverflowError(offset + exc.position, exc.detail) from None
        return None if hit is None else offset + hit

    def _run_fitted(self, x: np.ndarray) -> int | None:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, before any state changes
            e = self._embed(x)
            q, w = e.shape[1], self.window_size
            cum = np.zeros(q) if self._cum is None else self._cum
            ring = np.zeros((0, q)) if self._ring is None else self._ring
            sums = cumsum_rows(np.concatenate([cum[None, :], e]))  # sums[i]: before row i
            history = np.concatenate([ring, sums[:-1]])  # cumulative sums before each row, oldest first
            seen = ring.shape[0] + np.arange(1, x.shape[0] + 1)  # rows in the window after each row
            full = seen >= w
            stats = np.full(x.shape[0], -np.inf)
            if full.any():
                idx = np.flatnonzero(full)
                start = history[idx + ring.shape[0] + 1 - w]
                stats[idx] = self._score((sums[idx + 1] - start) / w)
        hits = np.flatnonzero(stats > self._threshold)
        end = int(hits[0]) if hits.size else x.shape[0] - 1
        # rows whose window is not yet full hold the placeholder -inf
        broken = ~np.all(np.isfinite(sums[1 : end + 2]), axis=1) | (full[: end + 1] & ~np.isfinite(stats[: end + 1]))
        if broken.any():
            raise StateOverflowError(int(np.flatnonzero(broken)[0]), "its embedding would make the window sums "
                                     "or the statistic non-finite")
        self._cum = sums[end + 1].copy()
        self._ring = np.concatenate([ring, sums[: end + 1]])[-(w - 1) :] if w > 1 else np.zeros((0, q))
        self._n += end + 1
        if np.isfinite(stats[end]):
            self._statistic = float(stats[end])
        self._drift_detected = bool(hits.size)
        return end if hits.size else None
