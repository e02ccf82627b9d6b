"""FOA: forward-only adaptation of normalisation affine parameters with CMA-ES (Niu et al. 2024)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agents.tta.base import TTAMethod, TTAOutput
from device_agents.tta.cma_search import KEYS as CMA_KEYS
from device_agents.tta.cma_search import CMASearch, check_settings
from device_agents.tta.models import (
    ModelCapabilityError,
    declared_input,
    describe_model,
    forward_validated,
    graph_layer_order,
    reference_params,
    source_feature_stats,
    source_layer_stats,
)
from device_agents.tta.snapshots import StateLayout
from device_agents.tta.statistics import STATS_PREFIX, BatchStatisticsConfig, StatisticsMix
from runtime.checks import require_int
from runtime.model import entropy, softmax

PRIOR_KEY = "foa.prior"
DEFAULT_POPULATION = 4  # candidates per generation without the mirrored view (one fewer with it)
MIRROR_CHUNK = 8  # samples per pass of the mirrored view
MAX_GENERATIONS = 1000
"""Most CMA-ES generations per batch: each costs ``population`` forward passes of the batch (FOA runs one;
1000 already makes a batch cost thousands of passes), so more is a mistake, not a setting."""


@dataclass(frozen=True)
class FOAConfig(BatchStatisticsConfig):
    """Settings of :class:`FOA`; the statistics fields are those of :class:`BatchStatisticsConfig`.

    ``layers``: the normalisation layers whose scale/shift are searched — the last ``n`` in graph order, or
    explicit names. ``per_channel``: search one scale and one shift per channel (2·C values per layer) instead
    of one per layer (2). ``population``: CMA-ES candidates per generation, 2 to 1024
    (:data:`~device_agents.tta.cma_search.MAX_POPULATION`); ``generations``: per batch, 1 to 1000
    (:data:`MAX_GENERATIONS`), so a batch costs ``population × generations`` forward passes. ``sigma0``:
    initial CMA-ES step size, in (0, 10] (:data:`~device_agents.tta.cma_search.MAX_SIGMA0`; the search starts
    at 0: unchanged parameters). ``fitness_lambda``: λ of the statistics term. ``variance_floor``: source
    variances are floored at this fraction of their mean in the statistics distance (dead features have zero
    variance). ``min_batch_for_search``: smaller batches are predicted at the CMA-ES mean in one pass,
    without a search step. ``seed``: the CMA-ES sampler's seed. ``prior_correction`` (τ, 0 = off) and
    ``prior_momentum`` (m): on a stream the class-balance detector finds balanced, the logits are shifted by
    -τ · log p̄ (centred), p̄ a running mean of the predicted class probabilities (per-sample momentum m), so
    that the predictions do not drift towards the classes a corruption favours; see :meth:`FOA._corrected`.
    ``flip_view``: one more pass per batch on the batch mirrored along the image width, at the CMA-ES mean,
    whose probabilities are averaged in with weight ``flip_weight`` — right only for models whose classes are
    mirror-invariant (trained with horizontal flips: CIFAR-10, not digits). ``None`` (the default): on exactly
    when the bundle's manifest declares the ``hflip`` input invariance (``edgeloop export --invariance hflip``).
    ``population`` ``None`` (the default): 4, or 3 with the mirrored view, so that a batch costs 4 forward
    passes either way.

    Measured on continual streams of ten corruptions at severity 5, batch 64 (top-1 shuffled / class-sorted,
    source in brackets, :class:`~device_agents.tta.alpha_bn.AlphaBN` with the same statistics in braces):

    * MNIST SmallCNN, 500 per domain: 0.865 / 0.864 (0.706 / 0.698) {0.844 / 0.834}; with classic batch
      statistics (``batch_weight=1``) 0.922 / 0.894 — that stream's class runs are short enough;
    * digits small_cnn, 540 per domain: 0.722 / 0.633 (0.518 / 0.523) {0.718 / 0.629};
    * CIFAR-10-JPEG ResNet-8, 5 corruptions, 1000 per domain: 0.485 / 0.294 (0.261 / 0.261) {0.487 / 0.295}.

    Ablations (MNIST, over an earlier statistics base): per-channel search 0.895 / 0.860 vs per-layer 0.917 /
    0.876; λ = 0 (entropy only) collapses to 0.679 shuffled; λ = 1: 0.918 / 0.859; population 3 or 4: about
    1 point lower; two adapted layers 0.903 / 0.843. Time per batch (one onnxruntime thread, median) relative
    to one source pass on the same adaptable graph / to the folded model: MNIST batch 64 0.20× / 0.11×,
    batch 16 0.14× / 0.09×; CIFAR ResNet-8 batch 64 and 16 0.20× / 0.13× (population 5).

    Population 4 (the default since): one pass fewer per batch; on continual streams of the ten corruptions,
    200 samples per domain, severity 5, MNIST shuffled / class-sorted: batch 16 0.833 / 0.824 (population 5:
    0.843 / 0.821), batch 64 0.825 / 0.823 (0.816 / 0.783); population 3 lost 1-3 points at batch 16.

    On the two-memory statistics (the default since, see :class:`~device_agents.tta.alpha_bn.AlphaBNConfig`),
    1024 samples per domain, shuffled / class-sorted: CIFAR s5 b64 0.471 / 0.360 (one memory 0.479 / 0.285),
    s3 b64 0.639 / 0.485 (0.648 / 0.371), s5 b16 0.478 / 0.359 (0.479 / 0.285); MNIST s5 b64 0.913 / 0.870
    (0.897 / 0.884).

    With the class-balance detector (the default since, see :class:`~device_agents.tta.alpha_bn.AlphaBNConfig`):
    CIFAR s5 b64 0.489 / 0.360 (was 0.471 / 0.360), s3 b64 0.649 / 0.485 (0.639 / 0.485); MNIST s5 b64
    0.930 / 0.870 (0.913 / 0.870), s3 b64 0.984 / 0.962 (0.983 / 0.962); batch 16 unchanged. The search
    itself adds nothing measurable on CIFAR over the statistics (α-BN: 0.492 at s5, 0.649 at s3): measured on
    top of batch statistics (``batch_weight=1``), s3 b64 shuffled 0.651 (α-BN 0.651), and neither 3 or 9
    adapted layers (0.650 / 0.650), population 6 over 9 layers (0.649), λ 0.1 / 2 (0.644 / 0.651), σ0 0.3
    (0.650) nor predicting with the average of the candidates' probabilities (0.650) changed that. On MNIST
    the search is worth 2–4 points, with a spread of about ±0.4 over CMA-ES seeds (measured before the
    detector re-anchored on domain switches: seeds 0-3, s5 shuffled b64 0.917 / 0.923 / 0.925 / 0.922, b16
    0.922 / 0.927 / 0.925 / 0.925); batch statistics always (``batch_weight=1``) give 0.930 / 0.937 shuffled
    and 0.880 / 0.883 class-sorted (b64 / b16) on MNIST — safe there, unlike CIFAR (0.190 class-sorted s5
    b64).

    Prior correction (τ = 1, m = 0.995, the default since; no extra forward pass, state: one vector of class
    probabilities). On the benchmark's full streams (``bench_tta --quick-accuracy``), top-1 % before → after:
    CIFAR-10-JPEG ResNet-8 shuffled s5 b64 48.93 → 49.66, s3 b64 64.85 → 65.13, s5 b16 47.76 → 48.05, s3 b16
    63.87 → 64.48; MNIST shuffled s5 b64 92.95 → 93.20, s3 b64 98.35 → 98.36, s3 b16 98.32 → 98.26, s5 b16
    92.18 (unchanged: the detector then never found that stream balanced, a defect fixed since, see
    :class:`~device_agents.tta.statistics.ClassBalanceDetector`); every class-sorted stream (CIFAR and
    MNIST, s5 and s3, b64 and b16) unchanged to the sample — the detector never let the correction in there.
    Grid on the same streams (CIFAR s5 / s3 b64): τ 0.5 49.42 / 65.01, τ 1.25 49.75 / 65.05, τ 2 49.54 / 65.09
    (m 0.995); m 0.98 / 0.99 / 0.998 at τ 1: 49.41 / 49.52 / 49.67 and 64.81 / 64.89 / 65.01. Driving the
    corrected marginal to uniform with an integrating bias instead (b += η · log q̄) gave at most 49.73 / 65.24
    on CIFAR but lost up to 1.4 points on MNIST s3. The low-dimensional search the correction was tried next
    to — one scale and one shift per layer over all 9 ResNet-8 layers (18 dimensions instead of 2) — lost:
    s5 / s3 b64 shuffled 47.21 / 64.07 (σ0 0.3: 43.83 / 49.64) against 48.93 / 64.85 with the last layer only.

    Mirrored view (``flip_view``; on by default exactly for a bundle declaring the ``hflip`` invariance), same
    streams, with the prior correction, CIFAR-10-JPEG ResNet-8 shuffled s5 / s3 b64, class-sorted s5 / s3 b64,
    shuffled s5 / s3 b16, class-sorted s5 / s3 b16: population 3 + the mirrored view (4 passes, as without
    it) 51.37 / 66.87, 37.13 / 50.11, 49.50 / 66.04, 36.89 / 50.03; default without it (population 4) 49.66
    / 65.13, 36.03 / 48.52, 48.05 / 64.48, 35.92 / 48.06. The mirrored view normalised with its own batch
    statistics instead (one pass over the whole mirrored batch) gave 51.46 / 66.78, 37.10 / 50.12, 49.48 /
    66.07, 36.94 / 50.06, and population 4 + the view (5 passes) 51.66 / 66.88, 36.98 / 49.56, 49.44 / 65.98,
    37.01 / 49.72. On MNIST digits a mirrored view is another symbol: s5 b64 shuffled 93.20 → 84.14, b16
    92.18 → 83.54, class-sorted b64 87.03 → 78.81 — hence only for models that declare the invariance. Cost
    on the CIFAR ResNet-8 at batch 64 (one thread, a process per variant): time per batch unchanged within
    noise (4 passes either way), peak memory +0.25 MB over FOA without the view (chunks of 8; +0.8 MB when
    the whole mirrored batch was one copy and one pass, see :meth:`FOA._with_flipped_view`).
    """

    layers: int | tuple[str, ...] = 1
    per_channel: bool = False
    population: int | None = None
    generations: int = 1
    sigma0: float = 0.1
    fitness_lambda: float = 0.5
    variance_floor: float = 1e-2
    min_batch_for_search: int = 8
    seed: int = 0
    prior_correction: float = 1.0
    prior_momentum: float = 0.995
    flip_view: bool | None = None
    flip_weight: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, int):
            if self.layers < 1:
                raise ValueError(f"layers must be >= 1 or a tuple of layer names, got {self.layers}")
        elif not (isinstance(self.layers, tuple) and self.layers and all(isinstance(n, str) for n in self.layers)):
            raise ValueError(f"layers must be an int or a non-empty tuple of layer names, got {self.layers!r}")
        elif len(set(self.layers)) != len(self.layers):
            # a repeated name would add search dimensions that the last of its copies overwrites (dead ones)
            raise ValueError(f"layers names a layer more than once: {self.layers!r}")
        # population (None: the default) in [MIN_POPULATION, MAX_POPULATION], sigma0 in (0, MAX_SIGMA0]
        check_settings(self.population_for(False), self.sigma0)
        require_int("generations", self.generations, 1, MAX_GENERATIONS)
        if not (math.isfinite(self.variance_floor) and self.variance_floor > 0.0):
            raise ValueError(f"variance_floor must be finite and > 0, got {self.variance_floor}")
        if not (math.isfinite(self.fitness_lambda) and self.fitness_lambda >= 0.0):
            raise ValueError(f"fitness_lambda must be finite and >= 0, got {self.fitness_lambda}")
        require_int("min_batch_for_search", self.min_batch_for_search, 2)
        require_int("seed", self.seed, 0)  # numpy seeds are non-negative
        if not (math.isfinite(self.prior_correction) and 0.0 <= self.prior_correction <= 1.0):
            raise ValueError(f"prior_correction must be in [0, 1], got {self.prior_correction}")
        if not (math.isfinite(self.prior_momentum) and 0.0 < self.prior_momentum < 1.0):
            raise ValueError(f"prior_momentum must be in (0, 1), got {self.prior_momentum}")
        if self.flip_view is not None and not isinstance(self.flip_view, bool):
            raise ValueError(f"flip_view must be None or a bool, got {self.flip_view!r}")
        if not (math.isfinite(self.flip_weight) and 0.0 < self.flip_weight < 1.0):
            raise ValueError(f"flip_weight must be in (0, 1), got {self.flip_weight}")

    def mirrored(self, invariances: tuple[str, ...] = ()) -> bool:
        """Whether the mirrored view is used for a model declaring ``invariances``."""
        return ("hflip" in invariances) if self.flip_view is None else self.flip_view

    def population_for(self, mirrored: bool) -> int:
        """CMA-ES candidates per generation, with or without the mirrored view."""
        if self.population is not None:
            return self.population
        return DEFAULT_POPULATION - 1 if mirrored else DEFAULT_POPULATION

    def passes_per_batch(self, invariances: tuple[str, ...] = ()) -> int:
        """Forward passes per searched batch for a model declaring ``invariances`` (the mirrored view counts as
        one: it runs over the batch in chunks of :data:`MIRROR_CHUNK` samples)."""
        mirrored = self.mirrored(invariances)
        return self.population_for(mirrored) * self.generations + int(mirrored)


@dataclass(frozen=True)
class _Outputs:
    """What FOA keeps of a forward pass (logits, features, per-layer batch statistics), in arrays it owns."""

    logits: np.ndarray
    features: np.ndarray
    batch_stats: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def copy_of(cls, result: Any) -> _Outputs:
        """Copies of ``result``'s arrays (a ``ForwardResult`` or anything with its fields)."""
        return cls(np.array(result.logits), np.array(result.features),
                   {name: (np.array(mean), np.array(var)) for name, (mean, var) in result.batch_stats.items()})


@dataclass(frozen=True)
class _Plan:
    """What the search touches in one model: adapted layers and their widths, and the statistics targets."""

    adapted: tuple[str, ...]
    widths: tuple[int, ...]
    downstream: tuple[str, ...]
    layer_stats: dict[str, _Target]
    feature_stats: _Target | None
    population: int
    width_axis: int | None  # the axis the mirrored view flips; None: no mirrored view


@dataclass(frozen=True)
class _Target:
    """Source statistics of one layer (or of the features) as the fitness's distance uses them, computed once
    per plan: mean, standard deviation and the floored variance that divides the gaps."""

    mean: np.ndarray
    std: np.ndarray
    floor: np.ndarray

    @classmethod
    def of(cls, mean: np.ndarray, var: np.ndarray, variance_floor: float) -> _Target:
        """The target for source ``mean``/``var``; variances are floored at ``variance_floor`` × their mean."""
        var = np.asarray(var, np.float64)
        return cls(np.asarray(mean, np.float64), np.sqrt(var), var + variance_floor * float(var.mean()) + 1e-12)

    def distance(self, mean: np.ndarray, var: np.ndarray) -> float:
        """Mean over channels of ((μ - μ^S)² + (σ - σ^S)²) / floored σ^S²."""
        mean_gap = (np.asarray(mean, np.float64) - self.mean) ** 2
        std_gap = (np.sqrt(np.maximum(np.asarray(var, np.float64), 0.0)) - self.std) ** 2
        return float(np.mean((mean_gap + std_gap) / self.floor))


class FOA(TTAMethod):
    """Forward-Optimization Adaptation (Niu et al. 2024, "Test-Time Model Adaptation with Only Forward
    Passes", ICML), for CNNs on the adaptable graph.

    * **Normalisation**: every candidate runs with the statistics of :class:`AlphaBN` (reference mixed with a
      running target estimate and the batch, :mod:`device_agents.tta.statistics`), which is what keeps FOA on
      its feet on temporally correlated streams.
    * **Search** (Eq. 6): CMA-ES (``cma.CMAEvolutionStrategy``) over deltas on the scale/shift of the chosen
      layers — ``L.weight · exp(δ_s)`` and ``L.bias + δ_b · |L.weight|``, both 0 at the start — continual: the
      strategy carries across batches.
    * **Fitness** (Eq. 5): mean normalised prediction entropy + λ · Σ_l [‖(μ_l - μ_l^S)/σ_l^S‖² +
      ‖(σ_l - σ_l^S)/σ_l^S‖²] / C_l over the normalisation layers after the first adapted one (graph outputs
      ``L.batch_mean/var`` at the candidate's parameters, against the manifest's ``source_statistics.layers``)
      and the penultimate features (against ``source_statistics.features``). The batch is predicted by the
      fittest candidate.
    * **Activation shifting** (Eqs. 7-9 shift the penultimate features by μ^S - EMA(μ_T) before the
      classifier, which this graph does not expose). Normalising a layer with the EMA of its test means μ̂_T
      instead of μ^S is the same as shifting its input by μ^S - μ̂_T: BN(z; μ̂_T) = BN(z + μ^S - μ̂_T; μ^S).
      The running estimate does exactly that at every layer, including the last, so the shift is part of the
      normalisation (fully so at α = 1) and there is no separate flag.

    State: the running statistics (``stats.<layer>.ema_*``) and the CMA-ES state (``cma.*``, see
    :class:`~device_agents.tta.cma_search.CMASearch`). Needs an adaptable graph and source statistics
    downstream of the adapted layers.
    """

    name = "foa"
    config_class = FOAConfig
    config: FOAConfig
    requires_adaptable = True
    state_layout = StateLayout(statistics=STATS_PREFIX, groups=(CMA_KEYS,), optional=(PRIOR_KEY,))

    def __init__(self, config: FOAConfig | None = None) -> None:
        super().__init__(config)
        self._mix = StatisticsMix(self.config, prefix=STATS_PREFIX)
        self._search = CMASearch(self.config.population_for(False), self.config.sigma0, self.config.seed)
        self._planned: tuple[weakref.ref[Any], _Plan] | None = None

    def _state_replaced(self) -> None:
        """The live CMA-ES strategy is rebuilt from the state arrays on the next batch."""
        self._search.invalidate()

    def forward_and_adapt(self, model: Any, x: np.ndarray) -> TTAOutput:
        """Evaluate ``population`` candidates per generation, tell CMA-ES, predict with the fittest."""
        cfg, n = self.config, int(x.shape[0])
        plan = self._plan(model)
        reference = reference_params(model)
        state = dict(self._state) or self._mix.initial_state(reference)
        order = graph_layer_order(model)
        # the prior correction uses the detector's verdict at every batch size; the statistics ignore it below
        # min_batch_for_batch_stats (StatisticsMix.batch_weight)
        balanced, detected = self._mix.detect(state, x, small_batches=cfg.prior_correction > 0.0)
        alpha, feeds = self._mix.feeds(state, reference, n, order, balanced)
        dim = 2 * sum(plan.widths) if cfg.per_channel else 2 * len(plan.adapted)
        self._search.use_population(plan.population)
        strategy = self._search.strategy(state, dim)
        if n < cfg.min_batch_for_search:
            best = forward_validated(model, x, alpha, {**feeds, **self._affine(reference, plan, self._search.mean())})
        else:
            best = self._search_step(model, x, alpha, feeds, reference, plan, strategy)
        logits = best.logits
        if plan.width_axis is not None:
            logits = self._with_flipped_view(model, x, alpha, feeds, reference, plan, self._search.mean(), best)
        logits, prior = self._corrected(state, logits, balanced)
        self._state = {**state, **self._mix.fold(state, best.batch_stats, n, order), **detected,
                       **self._search.export(), **prior}
        return TTAOutput(logits=logits, features=best.features, probs=softmax(logits))

    def _with_flipped_view(
        self, model: Any, x: np.ndarray, alpha: float, feeds: dict[str, np.ndarray],
        reference: dict[str, np.ndarray], plan: _Plan, mean: np.ndarray, best: Any,
    ) -> np.ndarray:
        """Log of ``(1 - flip_weight) · softmax(best.logits) + flip_weight · p_flip``, p_flip the prediction for
        the batch mirrored along the image width at the CMA-ES mean.

        The mirrored view is normalised with exactly the statistics the batch was normalised with (``best``'s
        batch statistics mixed by α with the fed ones, as the graph mixes them, fed at α = 0), so it needs no
        statistics of its own: it runs in chunks of :data:`MIRROR_CHUNK` samples, and its mirrored copy is one
        chunk, not the batch. Peak memory over FOA without the view, CIFAR ResNet-8 at batch 64 (a process per
        variant): one pass over the whole mirrored batch +0.8 MB, chunks of 16 +0.5 MB, of 8 +0.25 MB, of 4
        +0.15 MB; time per batch the same within noise. Its statistics are
        not folded into the running estimate."""
        if x.ndim != 4:
            raise ModelCapabilityError(f"the mirrored view needs image batches of rank 4, got shape {x.shape}")
        params = {**feeds, **self._affine(reference, plan, mean)}
        for layer, (batch_mean, batch_var) in best.batch_stats.items():
            for key, batch in ((f"{layer}.mean", batch_mean), (f"{layer}.var", batch_var)):
                fed = params.get(key, reference[key])
                params[key] = ((1.0 - alpha) * fed + alpha * np.asarray(batch, np.float64)).astype(np.float32)
        w = self.config.flip_weight
        probs = (1.0 - w) * softmax(best.logits)
        for start in range(0, len(x), MIRROR_CHUNK):
            part = np.ascontiguousarray(np.flip(x[start : start + MIRROR_CHUNK], axis=plan.width_axis))
            flipped = forward_validated(model, part, 0.0, params)  # a mirrored copy of validated rows
            probs[start : start + len(part)] += w * softmax(np.asarray(flipped.logits))
        return np.log(np.maximum(probs, 1e-12)).astype(np.asarray(best.logits).dtype)

    def _corrected(
        self, state: Mapping[str, np.ndarray], logits: np.ndarray, balanced: bool
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(logits, prior state)``: on a stream the detector finds class-balanced, the batch's predicted class
        marginal is folded into a running estimate p̄ (per-sample momentum ``prior_momentum``) and the logits are
        shifted by ``-prior_correction · log p̄`` (centred), which undoes the drift of the predictions towards the
        classes the corruption favours; elsewhere the logits pass unchanged and p̄ is left as it was."""
        tau = self.config.prior_correction
        if tau == 0.0 or not balanced:
            return logits, {}
        batch = softmax(logits).mean(axis=0, dtype=np.float64)
        old = state.get(PRIOR_KEY)
        if old is None or old.shape != batch.shape:
            prior = batch
        else:
            keep = self.config.prior_momentum ** len(logits)
            prior = keep * np.asarray(old, np.float64) + (1.0 - keep) * batch
        log_prior = np.log(np.maximum(prior, 1e-6))
        shift = (tau * (log_prior - log_prior.mean())).astype(logits.dtype)
        return logits - shift, {PRIOR_KEY: prior}

    def adapted_params(self, model: Any) -> dict[str, np.ndarray]:
        """The running statistics (see the base class) and the adapted layers' scale/shift at the CMA-ES mean."""
        out = super().adapted_params(model)
        mean = self._state.get("cma.mean")
        if out and mean is not None:
            out.update(self._affine(model.params, self._plan(model), np.asarray(mean, dtype=np.float64)))
        return out

    def _search_step(
        self, model: Any, x: np.ndarray, alpha: float, feeds: dict[str, np.ndarray],
        reference: dict[str, np.ndarray], plan: _Plan, strategy: Any,
    ) -> Any:
        """``generations`` rounds of ask → one forward pass per candidate → tell; the fittest result.

        The fittest result so far is kept as a copy (:class:`_Outputs`), never as the pass's own outputs:
        onnxruntime returns arrays that live in its arena, and holding them across the next passes fragments
        the arena and makes it grow (measured: 1–3 MiB of peak memory on CIFAR ResNet-8).
        """
        best, best_fitness = None, math.inf
        for _ in range(self.config.generations):
            candidates = strategy.ask()
            fitness = []
            for z in candidates:
                result = forward_validated(model, x, alpha, {**feeds, **self._affine(reference, plan, z)})
                fitness.append(self._fitness(result, plan))
                if best is None or fitness[-1] < best_fitness:
                    best, best_fitness = _Outputs.copy_of(result), fitness[-1]
                del result
            strategy.tell(candidates, fitness)
        return best

    def _plan(self, model: Any) -> _Plan:
        """The search plan for ``model`` (cached per model object: layers and source statistics are fixed)."""
        if self._planned is not None and self._planned[0]() is model:
            return self._planned[1]
        plan = self._make_plan(model)
        self._planned = (weakref.ref(model), plan)
        return plan

    def _make_plan(self, model: Any) -> _Plan:
        order = graph_layer_order(model)
        layers = self.config.layers
        adapted = tuple(order[-layers:]) if isinstance(layers, int) else layers
        unknown = [name for name in adapted if name not in order]
        if unknown or (isinstance(layers, int) and layers > len(order)):
            raise ModelCapabilityError(
                f"FOA layers {layers!r} not in the normalisation layers {order} of {describe_model(model)}"
            )
        params = model.params
        first = min(order.index(name) for name in adapted)
        downstream = tuple(order[first + 1 :])
        features = source_feature_stats(model)
        if not downstream and features is None:
            raise ModelCapabilityError(
                f"FOA's fitness needs source statistics after the adapted layers {list(adapted)}: "
                f"{describe_model(model)} has no later normalisation layer and no source feature statistics"
            )
        layer_stats = source_layer_stats(model)
        widths = tuple(int(params[f"{name}.weight"].shape[0]) for name in adapted)
        floor = self.config.variance_floor
        targets = {k: _Target.of(*layer_stats[k], floor) for k in downstream}
        layout, invariances = declared_input(model)
        mirrored = self.config.mirrored(invariances)
        return _Plan(adapted, widths, downstream, targets, None if features is None else _Target.of(*features, floor),
                     population=self.config.population_for(mirrored),
                     width_axis=(3 if layout == "NCHW" else 2) if mirrored else None)

    def passes_per_batch(self, model: Any) -> int:
        """Forward passes per searched batch on ``model`` (with the mirrored view when it is used)."""
        return self.config.passes_per_batch(declared_input(model)[1])

    def _affine(self, reference: dict[str, np.ndarray], plan: _Plan, z: np.ndarray) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        offset = 0
        for name, width in zip(plan.adapted, plan.widths, strict=True):
            size = width if self.config.per_channel else 1
            log_scale, shift = z[offset : offset + size], z[offset + size : offset + 2 * size]
            offset += 2 * size
            weight = reference[f"{name}.weight"].astype(np.float64)
            feeds[f"{name}.weight"] = (weight * np.exp(log_scale)).astype(np.float32)
            feeds[f"{name}.bias"] = (reference[f"{name}.bias"] + shift * np.abs(weight)).astype(np.float32)
        return feeds

    def _fitness(self, result: Any, plan: _Plan) -> float:
        probs = softmax(result.logits)
        value = float(entropy(probs).mean() / math.log(probs.shape[1]))
        distance = 0.0
        for name in plan.downstream:
            mean, var = result.batch_stats[name]
            distance += plan.layer_stats[name].distance(mean, var)
        if plan.feature_stats is not None and len(result.features) > 1:
            f = np.asarray(result.features, np.float64)
            distance += plan.feature_stats.distance(f.mean(axis=0), f.var(axis=0))
        fitness = value + self.config.fitness_lambda * distance
        if not math.isfinite(fitness):
            raise FloatingPointError(f"FOA fitness is {fitness}: the model returned non-finite outputs")
        return fitness
