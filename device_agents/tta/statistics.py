"""Normalisation statistics for batch-statistics methods: a running estimate of the target statistics that
withstands temporally correlated streams, fed to the adaptable graph in one pass.

The graph normalises layer ``L`` with ``(1 - a) · L.mean + a · μ_batch`` (likewise the variance), where ``a``
is the graph's α input and ``L.mean``/``L.var`` are inputs. :class:`StatisticsMix` chooses both so that the
layer is normalised with

    μ = (1 - α) · μ_ref + α · T,        T = (1 - w) · M + w · μ_batch,

``μ_ref`` the model's current reference (source or cloud-updated) statistics, ``M`` a running estimate of the
target statistics from earlier batches (first and second moments, per-sample momentum ``m``) and ``w`` the
weight of the current batch. By default ``w = 1 - m^n`` — the running estimate's own weight of an n-sample
batch, i.e. the batch is normalised with the running estimate *after* folding the batch in — so a stream of
single-class batches (classes arriving in runs, as a camera sees them) cannot pull the statistics to one
class: the estimate spans about 1/(1 - m) samples. ``w = 1`` is the classic one-pass α-BN of Schneider et al.
(2020); batches smaller than ``min_batch`` use ``w = 0`` (their own statistics are too noisy).

Two memories: the first ``shallow_layers`` normalisation layers in graph order (default 4) keep a short memory
(m = 0.99, about 100 samples) and the deeper layers a long one (m = 0.9985, about 670 samples); ``w`` follows
the long one. A corruption moves the first layers' statistics at once, and they adopt the new domain within a
few batches; a run of one class moves mainly the deep layers' statistics, which then still average over
several runs. One memory had to choose: 0.995 everywhere fell 1–8 points below the source model on the
class-sorted CIFAR-10 streams, 0.998 everywhere lost 1–6 points on the others (numbers on
:class:`~device_agents.tta.alpha_bn.AlphaBNConfig`). A model with no more than ``shallow_layers`` normalisation
layers (the MNIST SmallCNN has 2) keeps the short memory everywhere.

Class balance: a stream that looks class-balanced (:class:`ClassBalanceDetector`, a test on the raw input,
so its answer does not depend on the normalisation in use) is normalised with each batch's own statistics
(``balanced_batch_weight`` = 1 for batches of at least ``min_batch_for_balanced`` samples, n / that for
smaller ones down to ``min_batch_for_batch_stats``); otherwise with the
running estimate as above. The running estimate is folded the same way in both cases. On the benchmark's
shuffled streams the batch's own statistics are worth 1-2 points over the running estimate (CIFAR-10-JPEG
ResNet-8 severity 5 batch 64: 49.4 % vs 47.1 %; severity 3: 65.1 % vs 63.8 %), on the class-sorted ones they
are ruinous (18.7 % and 22.7 % vs 36.1 % and 49.3 %, source 29.8 % and 44.2 %). An earlier detector on the
model's own signals failed on CIFAR-10 at severity 5 (26 % source accuracy: predictions follow the
corruption, and batch normalisation at every layer hides the class composition in the channel means: gated
by a deep-layer mean-shift test α-BN stayed at 19.4 % on the class-sorted stream, gated by the predicted
labels' diversity 24.8 %, below the source model's 26.1 %); the input-level test does not see through the
model at all. A detector of domain switches did not pay either (first-layer statistics jumping away from
their running estimate, then a short memory for a while): the first layer separates only the large
switches, and a short-memory phase after a switch costs the class-sorted streams what it gains on the
shuffled ones (see :class:`~device_agents.tta.alpha_bn.AlphaBNConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from device_agents.tta.base import TTAConfig, TTAMethod
from device_agents.tta.snapshots import BALANCE_KEYS, StateLayout
from runtime.checks import require_int

STATS_PREFIX = "stats."
"""Where the methods that build on α-BN's pass (:class:`NormalisedPass`) keep its state."""


@dataclass(frozen=True)
class BatchStatisticsConfig(TTAConfig):
    """Statistics settings shared by :class:`~device_agents.tta.alpha_bn.AlphaBN` and
    :class:`~device_agents.tta.foa.FOA`.

    ``alpha``: weight of the target statistics T against the reference (0 = source, 1 = target only).
    ``ema_momentum``: per-sample momentum m of the running estimate of the first ``shallow_layers``
    normalisation layers in graph order (a batch of n weighs 1 - m^n).
    ``deep_momentum``: per-sample momentum of the layers after those (None: ``ema_momentum`` everywhere).
    ``shallow_layers``: how many normalisation layers, from the input on, keep ``ema_momentum``.
    ``batch_weight``: weight w of the current batch in T; None (default) = 1 - m^n with m the longest memory
    in use on the model; 1.0 = classic α-BN.
    ``min_batch_for_batch_stats``: smaller batches use w = 0 (the running estimate only).
    ``balanced_batch_weight``: the batch weight used instead of 1 - m^n while the class-balance detector (see
    :class:`ClassBalanceDetector`) finds the stream class-balanced (None: no detector; also unused when
    ``batch_weight`` is set). ``imbalance_threshold``: the detector's threshold on its smoothed statistic
    (1 = pure sampling noise). ``min_batch_for_balanced``: a smaller batch in a balanced stretch weighs
    ``balanced_batch_weight · n / min_batch_for_balanced`` (its statistics are noisier).

    Why two memories: the first layers' statistics carry the corruption (noise, blur, contrast, brightness
    move them at once), which a short memory adopts quickly after a domain switch; deeper layers' statistics
    also carry the class composition of recent batches, which a stream of classes arriving in runs (about
    100 images per class in the benchmark) pulls to one class unless their memory spans several runs.
    """

    alpha: float = 1.0
    ema_momentum: float = 0.99
    deep_momentum: float | None = 0.9985
    shallow_layers: int = 4
    batch_weight: float | None = None
    min_batch_for_batch_stats: int = 16
    balanced_batch_weight: float | None = 1.0
    imbalance_threshold: float = 2.0
    min_batch_for_balanced: int = 32

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in (0, 1), got {self.ema_momentum}")
        if self.deep_momentum is not None and not 0.0 < self.deep_momentum < 1.0:
            raise ValueError(f"deep_momentum must be None or in (0, 1), got {self.deep_momentum}")
        if isinstance(self.shallow_layers, bool) or not isinstance(self.shallow_layers, int) or self.shallow_layers < 0:
            raise ValueError(f"shallow_layers must be an integer >= 0, got {self.shallow_layers!r}")
        if self.batch_weight is not None and not (
            math.isfinite(self.batch_weight) and 0.0 <= self.batch_weight <= 1.0
        ):
            raise ValueError(f"batch_weight must be None or in [0, 1], got {self.batch_weight}")
        require_int("min_batch_for_batch_stats", self.min_batch_for_batch_stats, 1)
        if self.balanced_batch_weight is not None and not (
            math.isfinite(self.balanced_batch_weight) and 0.0 <= self.balanced_batch_weight <= 1.0
        ):
            raise ValueError(f"balanced_batch_weight must be None or in [0, 1], got {self.balanced_batch_weight}")
        if not (math.isfinite(self.imbalance_threshold) and self.imbalance_threshold > 1.0):
            raise ValueError(f"imbalance_threshold must be finite and > 1, got {self.imbalance_threshold}")
        require_int("min_batch_for_balanced", self.min_batch_for_balanced, 2)

    def momenta(self, order: Sequence[str]) -> dict[str, float]:
        """Per-sample momentum of each layer, given the layers in graph order (input side first)."""
        deep = self.ema_momentum if self.deep_momentum is None else self.deep_momentum
        return {layer: self.ema_momentum if i < self.shallow_layers else deep for i, layer in enumerate(order)}


DEFAULT_STATISTICS = BatchStatisticsConfig()
"""The statistics settings the output-level methods build on by default (those of α-BN)."""


def layer_names(params: Mapping[str, np.ndarray]) -> list[str]:
    """Names ``L`` of the layers whose ``L.mean`` is among ``params`` (sorted)."""
    return sorted(name[: -len(".mean")] for name in params if name.endswith(".mean"))


DESCRIPTOR_BANDS = 48
"""Per-sample input descriptor of :class:`ClassBalanceDetector`: the means of this many contiguous bands of
equal width of the flattened sample (for an NCHW image, row bands of each channel; a remainder of fewer
values than bands at the end of the sample is left out)."""
DESCRIPTOR_MOMENTUM = 0.999
"""Per-sample momentum of the detector's running mean of the descriptor (about 1000 samples: longer than a
class run, so that a run does not become the reference it is tested against; domain switches re-anchor it).
Measured with 0.99 (100 samples) on the benchmark's streams (batch 64, shuffled / class-sorted): CIFAR s5
49.2 / 35.2, s3 64.9 / 48.4 — 49.2 / 36.1 and 64.9 / 49.3 with 0.999 — and on class-sorted CIFAR s5 streams
of the first four corruptions with runs of about 200 and 400 samples per class: 19.1 % and 14.8 % (without
the detector 22.6 % and 19.1 %, source 14.8 % and 14.7 %); with 0.999: 22.6 % and 18.3 %."""
SCORE_MOMENTUM = 0.995
"""Per-sample momentum of the detector's smoothed log statistic (about 200 samples)."""
MAX_STATISTIC = 8.0
"""z is capped here before it enters the smoothed score: a domain switch makes z jump by orders of magnitude
for a batch, which would otherwise hold the score above the threshold for many batches."""
DETECTOR_WINDOW = 64
"""Samples per test: smaller batches are pooled with the following ones until a window is complete (a test on
16 samples separates class runs from shuffled CIFAR-10 images too poorly)."""
REANCHOR_SPACING = 512.0
"""Samples that must pass between two re-anchorings of the detector's running input mean (see
:class:`ClassBalanceDetector`): a domain switch comes once in a long while, class runs every ~100 samples."""
INITIAL_SCORE = math.log(MAX_STATISTIC)
"""The smoothed log statistic a fresh detector starts from (imbalanced until the first batches say otherwise)."""


class ClassBalanceDetector:
    """Whether the recent batches look class-balanced (i.i.d. within a domain) or arrive in class runs.

    On the raw input, so that the answer does not depend on how the model normalises: each sample is reduced
    to a descriptor d (the means of :data:`DESCRIPTOR_BANDS` bands of the flattened sample), and a batch of n
    samples gives

        z = mean_j (d̄_j - D_j)² / (s_j² / n),

    d̄ the batch mean, s² the batch's own sample variance and D a running mean of d over earlier batches. For
    a batch drawn i.i.d. from the stream z ≈ 1 (sampling noise, plus the lag of D); a batch of one class has
    a small spread s² and a mean away from D, so z grows with n. log z is smoothed over batches (per-sample
    momentum :data:`SCORE_MOMENTUM`) and compared with ``log(imbalance_threshold)``. A domain switch makes z
    jump (the running mean D lags behind the new domain): while the stream counts as balanced, a jump beyond
    :data:`MAX_STATISTIC` re-anchors D on the batch and leaves the score unchanged, at most once per
    :data:`REANCHOR_SPACING` samples (a class-sorted stream that slipped into the balanced state jumps again
    at its next class change, within about 100 samples, and that jump counts); otherwise a jump counts as
    evidence of imbalance, capped at :data:`MAX_STATISTIC` (the conservative side).

    Measured at severity 5 after the first four batches of each domain, with a 100-sample running mean D
    (5/25/50/75/95th percentiles of z per batch, shuffled vs class-sorted): CIFAR-10-JPEG batch 64
    0.4/0.7/1.2/1.8/3.3 vs 0.8/2.3/4.6/10/27, batch 16 0.3/0.7/1.0/1.6/3.0 vs 0.4/1.0/2.0/3.6/9.5; MNIST
    batch 64 0.3/0.9/1.2/1.7/9.0 vs 4.7/11/17/32/164, batch 16 0.4/0.8/1.3/2.1/7.8 vs 1.3/3.4/5.9/14/59.
    Batches smaller than
    :data:`DETECTOR_WINDOW` are pooled until a window of samples is complete, and tested together; the
    running mean D starts from the first whole window. (It used to start from the first batch: at batch 16
    its sampling noise inflated z for ~1000 samples and the MNIST shuffled stream was never found balanced,
    the CIFAR one 37 % of the time; now 85 % and 90 % at batch 16, as at batch 64 (86 % and 91 %), and 0 % on
    either class-sorted stream, at both batch sizes.) A batch smaller than the window also gets its own z
    against the window it is pooled into (:meth:`update_with_batch`), and no balanced verdict when that
    exceeds :data:`MAX_STATISTIC`: a window can look balanced while a batch in it is one class run.

    Small balanced batches weigh n / ``min_batch_for_balanced`` (:meth:`StatisticsMix.batch_weight`). On the
    benchmark's batch-16 streams (``bench_tta --quick-accuracy``, severity 5 / 3, shuffled, top-1 %) against
    the earlier detector (that never tested batches of 16 for the statistics): α-BN MNIST 88.06 → 88.55 /
    97.45 → 97.56, CIFAR 47.45 → 47.95 / 64.34 → 63.76; FOA MNIST 92.18 → 92.64 / 98.26 → 98.14, CIFAR
    49.50 → 50.30 / 66.04 → 65.62; LAME MNIST 85.25 → 85.76 / 96.70 → 96.96, CIFAR 41.41 → 43.00 / 57.84
    → 59.21; T3A MNIST 87.92 → 88.80 / 97.14 → 97.26, CIFAR 47.42 → 47.96 / 63.78 → 63.61; every class-sorted
    stream unchanged to the sample. A full weight of 1 at batch 16 gave FOA MNIST 94.05 but CIFAR s3 64.19;
    without the per-batch veto FOA MNIST s5 93.33 (every method 0.1-0.7 points more on shuffled streams).
    """

    def __init__(self, prefix: str = "") -> None:
        # input_mean, score, anchor_age, pool_count, pool_sum, pool_squares: the keys a StateLayout expects
        self.key_mean, self.key_score, self.key_age, self.key_count, self.key_sum, self.key_squares = (
            f"{prefix}{key}" for key in BALANCE_KEYS)

    def update(
        self, state: Mapping[str, np.ndarray], x: np.ndarray, threshold: float = math.inf
    ) -> tuple[float, dict[str, np.ndarray]]:
        """``(smoothed log z, the detector's state entries after the batch x)``; ``threshold``: the log
        threshold the caller compares the score with (for re-anchoring on a domain switch)."""
        score, entries, _ = self.update_with_batch(state, x, threshold)
        return score, entries

    def verdict(
        self, state: Mapping[str, np.ndarray], x: np.ndarray, threshold: float
    ) -> tuple[bool, dict[str, np.ndarray]]:
        """``(balanced, the detector's state entries after the batch x)``: the smoothed log statistic below the
        log ``threshold``, and the batch not vetoed (a batch smaller than the window whose own z exceeds
        :data:`MAX_STATISTIC` looks like a class run by itself)."""
        score, entries, batch_z = self.update_with_batch(state, x, threshold)
        return score < threshold and batch_z <= MAX_STATISTIC, entries

    def update_with_batch(
        self, state: Mapping[str, np.ndarray], x: np.ndarray, threshold: float = math.inf
    ) -> tuple[float, dict[str, np.ndarray], float]:
        """:meth:`update`, and z of the batch x alone when x is smaller than a window (0 otherwise, and before
        the running mean exists), against the window it is pooled into (or the running mean when it opens
        one): a window that looks balanced can hold a batch that is one class run by itself, which this shows."""
        n = int(x.shape[0])
        flat = np.asarray(x).reshape(n, -1)
        bands = min(DESCRIPTOR_BANDS, flat.shape[1])
        width = flat.shape[1] // bands  # a remainder (< bands values at the end of the sample) is left out
        d = np.einsum("ijk->ij", flat[:, : bands * width].reshape(n, bands, width)).astype(np.float64)
        d *= 1.0 / width
        score = float(state[self.key_score]) if self.key_score in state else INITIAL_SCORE
        # pool the batch with the samples not yet tested (the pool's sums count only while its count is > 0);
        # test once the pool holds a window's worth
        pooled = float(state.get(self.key_count, 0.0))
        if pooled > 0 and state[self.key_sum].shape != d.shape[1:]:
            pooled = 0.0  # another input shape: start over
        count = pooled + n
        total = d.sum(axis=0)
        squares = np.einsum("ij,ij->j", d, d)
        previous = state.get(self.key_mean)
        anchored = previous is not None and previous.shape == d.shape[1:]
        if anchored and n < DETECTOR_WINDOW and n > 1:
            # the batch against the window it is pooled into when it has company there (it moves with a domain
            # switch at once), else against the running mean
            reference = (total + state[self.key_sum]) * (1.0 / count) if pooled > 0 else previous
            batch_z = _z_statistic(total, squares, n, reference)
        else:
            batch_z = 0.0
        if pooled > 0:
            total += state[self.key_sum]
            squares += state[self.key_squares]
        if not anchored:
            # the running mean starts from a whole window, never from one small batch: anchored on 16 samples
            # it was off by their sampling noise, which inflated z about fivefold for the next ~1000 samples,
            # and a batch-16 stream (MNIST, shuffled) never left the imbalanced state
            if count < DETECTOR_WINDOW:
                return score, {self.key_score: np.array(score), self.key_count: np.array(count),
                               self.key_sum: total, self.key_squares: squares}, 0.0
            return score, {self.key_mean: total * (1.0 / count), self.key_score: np.array(score),
                           self.key_count: np.array(0.0)}, 0.0
        age = float(state.get(self.key_age, REANCHOR_SPACING)) + n
        if count < DETECTOR_WINDOW:
            return score, {self.key_mean: previous, self.key_score: np.array(score), self.key_age: np.array(age),
                           self.key_count: np.array(count), self.key_sum: total, self.key_squares: squares}, batch_z
        mean = total * (1.0 / count)
        z = _z_statistic(total, squares, count, previous)
        emptied = {self.key_count: np.array(0.0)}
        if score < threshold and z > MAX_STATISTIC and age - count >= REANCHOR_SPACING:
            # a jump in a stream known to be class-balanced: a domain switch; re-anchor the running mean
            # instead of waiting for it to catch up (3-8 windows with a 100-sample memory, dozens with the
            # default), and leave the score as it was
            return score, {self.key_mean: mean, self.key_score: np.array(score), self.key_age: np.array(0.0),
                           **emptied}, batch_z
        keep = SCORE_MOMENTUM**count
        score = keep * score + (1.0 - keep) * math.log(min(max(z, 1e-6), MAX_STATISTIC))
        keep = DESCRIPTOR_MOMENTUM**count
        running = previous * keep
        running += (1.0 - keep) * mean
        return score, {self.key_mean: running, self.key_score: np.array(score), self.key_age: np.array(age),
                       **emptied}, batch_z


def _z_statistic(total: np.ndarray, squares: np.ndarray, n: int, reference: np.ndarray) -> float:
    """z of n > 1 descriptors (their per-band ``total`` and sum of ``squares``: a window or one batch)
    against ``reference``, in units of their own sampling noise (see :class:`ClassBalanceDetector`)."""
    mean = total * (1.0 / n)
    spread = np.maximum(squares - n * mean * mean, 0.0) * (1.0 / (n - 1))  # variance of band means
    spread += 1e-2 * float(spread.mean()) + 1e-12  # constant bands (a black border) carry no evidence
    gap = mean - reference
    return float(np.dot(gap * gap, 1.0 / spread)) * n / len(gap)


class StatisticsMix:
    """The running estimate (kept in a method's state dict under ``prefix``) and the graph feeds it implies.

    Per model, the layer names, their momenta and the graph order are worked out once and cached (keyed by
    the reference's layer names and the order), so a batch costs a few numpy operations per layer.
    """

    def __init__(self, config: BatchStatisticsConfig, prefix: str = "") -> None:
        self.config = config
        self.prefix = prefix
        self.detector = ClassBalanceDetector(prefix)
        self._plans: dict[tuple[tuple[str, ...], tuple[str, ...]], _MixPlan] = {}

    def initial_state(self, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The running estimate anchored at the reference statistics (first and second moments, float64)."""
        state: dict[str, np.ndarray] = {}
        for layer in layer_names(reference):
            mean = np.asarray(reference[f"{layer}.mean"], dtype=np.float64)
            state[f"{self.prefix}{layer}.ema_mean"] = mean.copy()
            state[f"{self.prefix}{layer}.ema_sq"] = np.asarray(reference[f"{layer}.var"], np.float64) + mean**2
        if not state:
            raise ValueError(f"model parameters {sorted(reference)} hold no '<layer>.mean' statistics to adapt")
        return state

    def momenta(self, reference: Mapping[str, np.ndarray], order: Sequence[str] | None = None) -> dict[str, float]:
        """Per-sample momentum of each layer of ``reference``; ``order``: the layers in graph order (the
        model's :func:`~device_agents.tta.models.graph_layer_order`; layers it lacks follow, sorted by name)."""
        return dict(self._plan(layer_names(reference), order).momenta)

    def _plan(self, names: Sequence[str], order: Sequence[str] | None) -> _MixPlan:
        key = (tuple(names), tuple(order or ()))
        plan = self._plans.get(key)
        if plan is None:
            known = set(names)
            ordered = [layer for layer in (order or ()) if layer in known]
            ordered += [layer for layer in names if layer not in set(ordered)]
            momenta = self.config.momenta(ordered)
            p = self.prefix
            plan = _MixPlan(
                layers=tuple(names), momenta=momenta,
                keys=tuple((f"{layer}.mean", f"{layer}.var", f"{p}{layer}.ema_mean", f"{p}{layer}.ema_sq")
                           for layer in names),
            )
            if len(self._plans) > 8:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def batch_weight(self, n: int, momenta: Mapping[str, float] | None = None, balanced: bool = False) -> float:
        """Weight w of an n-sample batch in the target statistics (``momenta``: the layers' momenta; the
        longest memory among them sets w = 1 - m^n; ``balanced``: the detector's verdict, see
        :meth:`detect`)."""
        cfg = self.config
        if n < cfg.min_batch_for_batch_stats:
            return 0.0
        if cfg.batch_weight is not None:
            return cfg.batch_weight
        if balanced and cfg.balanced_batch_weight is not None:
            # a batch smaller than min_batch_for_balanced counts for its share of one: its statistics are noisier
            return cfg.balanced_batch_weight * min(1.0, n / cfg.min_batch_for_balanced)
        m = max(momenta.values()) if momenta else cfg.ema_momentum
        return 1.0 - m**n

    @property
    def uses_detector(self) -> bool:
        """Whether the statistics use the class-balance detector's verdict (``balanced_batch_weight`` set and
        no fixed ``batch_weight``)."""
        return self.config.balanced_batch_weight is not None and self.config.batch_weight is None

    def detect(
        self, state: Mapping[str, np.ndarray], x: np.ndarray, small_batches: bool = False
    ) -> tuple[bool, dict[str, np.ndarray]]:
        """``(balanced, detector state entries)`` for the batch ``x``: whether the stream looks class-balanced
        (always False when the config has no detector: ``balanced_batch_weight`` or ``batch_weight`` set so).
        Batches below ``min_batch_for_batch_stats`` are not tested unless ``small_batches`` (for a caller that
        uses the verdict beyond the statistics, which ignore it there: :meth:`batch_weight`); the detector pools
        batches smaller than its window before testing and vetoes one that alone looks like a class run."""
        cfg = self.config
        if not self.uses_detector:
            return False, {}
        if len(x) < cfg.min_batch_for_batch_stats and not small_batches:
            return False, {}  # smaller batches would not use the verdict: they neither pay for it nor feed it
        return self.detector.verdict(state, x, math.log(cfg.imbalance_threshold))

    def feeds(
        self,
        state: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        n: int,
        order: Sequence[str] | None = None,
        balanced: bool = False,
    ) -> tuple[float, dict[str, np.ndarray]]:
        """``(a, {L.mean, L.var})``: the graph's α input and statistics inputs for an n-sample batch; no
        statistics inputs where the batch weighs 1 (the graph's current statistics are the reference)."""
        plan = self._plan(layer_names(reference), order)
        alpha, w = self.config.alpha, self.batch_weight(n, plan.momenta, balanced)
        a = alpha * w
        feeds: dict[str, np.ndarray] = {}
        if w >= 1.0:  # classic α-BN: the graph mixes its current (reference) statistics with the batch by α
            return a, feeds
        keep = alpha * (1.0 - w)
        scale = 1.0 / (1.0 - a)
        ref_weight, keep = (1.0 - alpha) * scale, keep * scale
        # every layer at once, on the layers' vectors laid end to end (the same element-wise arithmetic as one
        # layer at a time, so the same numbers; a few numpy calls instead of a few per layer), then cut apart
        keys = plan.keys
        means = [state[s_mean] for _, _, s_mean, _ in keys]
        mean = np.concatenate(means)
        var = np.concatenate([state[s_sq] for _, _, _, s_sq in keys])
        var -= mean * mean
        np.maximum(var, 0.0, out=var)
        if ref_weight:
            ref_mean = np.concatenate([reference[k_mean] for k_mean, _, _, _ in keys])
            ref_var = np.concatenate([reference[k_var] for _, k_var, _, _ in keys])
            mixed_mean = (ref_weight * ref_mean + keep * mean).astype(np.float32)
            mixed_var = (ref_weight * ref_var + keep * var).astype(np.float32)
        else:
            mixed_mean, mixed_var = (keep * mean).astype(np.float32), (keep * var).astype(np.float32)
        for (k_mean, k_var, _, _), part in zip(keys, _parts(means), strict=True):
            feeds[k_mean], feeds[k_var] = mixed_mean[part], mixed_var[part]
        return a, feeds

    def fold(
        self,
        state: Mapping[str, np.ndarray],
        batch_stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
        n: int,
        order: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """The running-estimate entries of ``state`` after folding in a batch's ``(μ, σ²)`` per layer, each
        layer with its own momentum (``order``: the graph order, as for :meth:`momenta`, of the layers the
        graph reported statistics for)."""
        plan = self._plan(sorted(batch_stats), order)
        for (_, _, key_mean, _), layer in zip(plan.keys, plan.layers, strict=True):
            if key_mean not in state:
                raise KeyError(f"graph returned statistics of layer {layer!r} with no reference statistics")
        # every layer at once, as in :meth:`feeds`: the same element-wise arithmetic as one layer at a time
        means, variances = zip(*(batch_stats[layer] for layer in plan.layers), strict=True)
        mean = np.concatenate(means).astype(np.float64)
        sq = mean * mean
        sq += np.concatenate(variances)
        parts = _parts(means)
        if not np.isfinite(sq).all():
            # finite logits can come with an overflowed batch variance (activations beyond float32 in a layer the
            # prediction did not normalise with); folded in, every later batch would be refused
            layer = next(name for name, part in zip(plan.layers, parts, strict=True)
                         if not np.isfinite(sq[part]).all())
            raise FloatingPointError(f"the graph returned non-finite batch statistics for layer {layer!r}; "
                                     "nothing is folded into the running estimate")
        keep = np.repeat([plan.momenta[layer] ** n for layer in plan.layers], [len(m) for m in means])
        new_mean = np.concatenate([state[key_mean] for _, _, key_mean, _ in plan.keys]) * keep
        new_mean += (1 - keep) * mean
        new_sq = np.concatenate([state[key_sq] for _, _, _, key_sq in plan.keys]) * keep
        new_sq += (1 - keep) * sq
        out: dict[str, np.ndarray] = {}
        for (_, _, key_mean, key_sq), part in zip(plan.keys, parts, strict=True):
            out[key_mean], out[key_sq] = new_mean[part], new_sq[part]
        return out


def _parts(arrays: Sequence[np.ndarray]) -> list[slice]:
    """The slice of each of ``arrays`` (1-d) in their concatenation."""
    parts, start = [], 0
    for arr in arrays:
        parts.append(slice(start, start + len(arr)))
        start += len(arr)
    return parts


@dataclass(frozen=True)
class _MixPlan:
    """What :class:`StatisticsMix` works out once per model: layer names (sorted), their momenta, and per
    layer the feed names and state keys ``(L.mean, L.var, <prefix>L.ema_mean, <prefix>L.ema_sq)``."""

    layers: tuple[str, ...]
    momenta: dict[str, float]
    keys: tuple[tuple[str, str, str, str], ...]


class NormalisedPass:
    """The one forward pass of :class:`~device_agents.tta.alpha_bn.AlphaBN`, which the output-level methods
    (:class:`~device_agents.tta.lame.LAME`, :class:`~device_agents.tta.t3a.T3A`) build on.

    On an adaptable graph with a statistics config, the pass normalises with the α-BN statistics of
    :class:`StatisticsMix` (reference mixed with the running target estimate and the batch) and folds the
    batch into the running estimate kept in the method's state under ``prefix``; otherwise (a folded or
    foreign predictor, or ``config=None``) it is the unadapted source pass. Output-level corrections compose
    with normalisation adaptation — LAME and T3A are model-agnostic and take "the model" as given (Boudiaf et
    al. 2022 §5 run LAME on top of other adapted models; Iwasawa & Matsuo 2021 combine T3A with Tent) — and
    the running estimate withstands class-sorted streams, so the corrections start from a model that is no
    worse than the source model on either order, at the cost of one pass, as before.
    """

    def __init__(self, config: BatchStatisticsConfig | None, prefix: str = STATS_PREFIX) -> None:
        self.config = config
        self.prefix = prefix
        self._mix = None if config is None else StatisticsMix(config, prefix)
        # the class-balance test for callers that ask for it where the statistics do not run it (a predictor, no
        # statistics config, or a config without the detector): the same detector and state keys, its threshold
        self._detector = ClassBalanceDetector(prefix)
        self._threshold = math.log((config or DEFAULT_STATISTICS).imbalance_threshold)

    def run(
        self, model: object, x: np.ndarray, state: Mapping[str, np.ndarray], balance: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray], bool]:
        """``(logits, probs, features, statistics state, balanced)`` of one pass over the validated batch ``x``.

        ``balanced``: the :class:`ClassBalanceDetector`'s verdict on the stream after ``x`` (with the per-batch
        veto of :meth:`StatisticsMix.detect`) when ``balance`` is asked for or the statistics use it; else
        False. Its state entries are part of the returned state either way, so one detector serves both."""
        from device_agents.tta.models import (
            forward_validated,
            graph_layer_order,
            is_adaptable,
            reference_params,
            source_pass,
        )
        from runtime.model import softmax

        if self._mix is None or not is_adaptable(model):
            logits, probs, features = source_pass(model, x)
            if not balance:
                return logits, probs, features, {}, False
            known = {k: v for k, v in state.items() if k.startswith(self.prefix)}
            balanced, detected = self._detector.verdict(known, x, self._threshold)
            return logits, probs, features, {**known, **detected}, balanced
        n = int(x.shape[0])
        reference = reference_params(model)
        stats = {k: v for k, v in state.items() if k.startswith(self.prefix)} or self._mix.initial_state(reference)
        order = graph_layer_order(model)
        if self._mix.uses_detector:
            balanced, detected = self._mix.detect(stats, x, small_batches=balance)
        else:
            balanced, detected = self._detector.verdict(stats, x, self._threshold) if balance else (False, {})
        alpha, feeds = self._mix.feeds(stats, reference, n, order, balanced)
        result = forward_validated(model, x, alpha, feeds)
        stats = {**stats, **self._mix.fold(stats, result.batch_stats, n, order), **detected}
        return result.logits, softmax(result.logits), result.features, stats, balanced


class FeaturePassMethod(TTAMethod):
    """Base of the output-level methods that read penultimate features from one :class:`NormalisedPass`
    (:class:`~device_agents.tta.lame.LAME`, :class:`~device_agents.tta.t3a.T3A`); their config has a
    ``statistics`` field (None: the unadapted source pass)."""

    requires_features = True
    state_layout = StateLayout(statistics=STATS_PREFIX)  # the pass's running estimate and detector

    def __init__(self, config: TTAConfig | None = None) -> None:
        super().__init__(config)
        self._pass = NormalisedPass(self.config.statistics)  # type: ignore[attr-defined]

    def _feature_pass(self, model: object, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(probs, features, statistics state)`` of the pass; a model without features is refused."""
        probs, features, stats, _ = self._feature_pass_balanced(model, x, balance=False)
        return probs, features, stats

    def _feature_pass_balanced(
        self, model: object, x: np.ndarray, balance: bool = True
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], bool]:
        """:meth:`_feature_pass` and the class-balance verdict (:meth:`NormalisedPass.run` with ``balance``)."""
        from device_agents.tta.models import ModelCapabilityError, describe_model

        _, probs, features, stats, balanced = self._pass.run(model, x, self._state, balance=balance)
        if features is None:
            raise ModelCapabilityError(f"{describe_model(model)} returned no features")
        return probs, features, stats, balanced
