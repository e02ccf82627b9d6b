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

Why no detector of class imbalance: on the corrupted digits, MNIST and CIFAR-10 streams measured for this
module, a detector on the batch statistics (deep-layer mean shift beyond sampling noise) and one on the batch's
predicted-label diversity both separated shuffled from class-sorted batches for the small digits CNN, but not
for a ResNet-8 on CIFAR-10 at severity 5 (26 % source accuracy: predictions follow the corruption, and batch
normalisation at every layer hides the class composition in the channel means). Gated by them, α-BN stayed
at 19.4 % on the class-sorted CIFAR stream (the statistics detector never fired) or reached 24.8 % (the
label-diversity detector), both below the source model's 26.1 %. The running estimate needs no detector.
Nor did a detector of domain switches pay (first-layer statistics jumping away from their running
estimate, then a short memory for a while): the first layer separates only the large switches, and a
short-memory phase after a switch costs the class-sorted streams what it gains on the shuffled ones (see
:class:`~device_agents.tta.alpha_bn.AlphaBNConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from device_agents.tta.base import TTAConfig, TTAMethod


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
        if self.min_batch_for_batch_stats < 1:
            raise ValueError(f"min_batch_for_batch_stats must be >= 1, got {self.min_batch_for_batch_stats}")

    def momenta(self, order: Sequence[str]) -> dict[str, float]:
        """Per-sample momentum of each layer, given the layers in graph order (input side first)."""
        deep = self.ema_momentum if self.deep_momentum is None else self.deep_momentum
        return {layer: self.ema_momentum if i < self.shallow_layers else deep for i, layer in enumerate(order)}


DEFAULT_STATISTICS = BatchStatisticsConfig()
"""The statistics settings the output-level methods build on by default (those of α-BN)."""


def layer_names(params: Mapping[str, np.ndarray]) -> list[str]:
    """Names ``L`` of the layers whose ``L.mean`` is among ``params`` (sorted)."""
    return sorted(name[: -len(".mean")] for name in params if name.endswith(".mean"))


class StatisticsMix:
    """The running estimate (kept in a method's state dict under ``prefix``) and the graph feeds it implies."""

    def __init__(self, config: BatchStatisticsConfig, prefix: str = "") -> None:
        self.config = config
        self.prefix = prefix

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
        names = layer_names(reference)
        known = set(names)
        ordered = [layer for layer in (order or ()) if layer in known]
        ordered += [layer for layer in names if layer not in set(ordered)]
        return self.config.momenta(ordered)

    def batch_weight(self, n: int, momenta: Mapping[str, float] | None = None) -> float:
        """Weight w of an n-sample batch in the target statistics (``momenta``: the layers' momenta; the
        longest memory among them sets w = 1 - m^n)."""
        cfg = self.config
        if n < cfg.min_batch_for_batch_stats:
            return 0.0
        if cfg.batch_weight is not None:
            return cfg.batch_weight
        m = max(momenta.values()) if momenta else cfg.ema_momentum
        return 1.0 - m**n

    def feeds(
        self,
        state: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        n: int,
        order: Sequence[str] | None = None,
    ) -> tuple[float, dict[str, np.ndarray]]:
        """``(a, {L.mean, L.var})``: the graph's α input and statistics inputs for an n-sample batch."""
        alpha, w = self.config.alpha, self.batch_weight(n, self.momenta(reference, order))
        a = alpha * w
        keep = alpha * (1.0 - w)
        scale = 1.0 / (1.0 - a) if a < 1.0 else 0.0
        feeds: dict[str, np.ndarray] = {}
        for layer in layer_names(reference):
            ref_mean, ref_var = reference[f"{layer}.mean"], reference[f"{layer}.var"]
            if w >= 1.0:  # classic α-BN: the graph mixes the reference with the batch by α itself
                feeds[f"{layer}.mean"], feeds[f"{layer}.var"] = ref_mean, ref_var
                continue
            mean = state[f"{self.prefix}{layer}.ema_mean"]
            var = np.maximum(state[f"{self.prefix}{layer}.ema_sq"] - mean**2, 0.0)
            feeds[f"{layer}.mean"] = (((1 - alpha) * ref_mean + keep * mean) * scale).astype(np.float32)
            feeds[f"{layer}.var"] = (((1 - alpha) * ref_var + keep * var) * scale).astype(np.float32)
        return a, feeds

    def fold(
        self,
        state: Mapping[str, np.ndarray],
        batch_stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
        n: int,
        order: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """The running-estimate entries of ``state`` after folding in a batch's ``(μ, σ²)`` per layer, each
        layer with its own momentum (``order``: the layers in graph order, as for :meth:`momenta`)."""
        layers = {key[len(self.prefix) : -len(".ema_mean")] for key in state
                  if key.startswith(self.prefix) and key.endswith(".ema_mean")}
        momenta = self.config.momenta(
            [layer for layer in (order or ()) if layer in layers] + sorted(layers.difference(order or ()))
        )
        out: dict[str, np.ndarray] = {}
        for layer, (mean, var) in batch_stats.items():
            key_mean, key_sq = f"{self.prefix}{layer}.ema_mean", f"{self.prefix}{layer}.ema_sq"
            if key_mean not in state:
                raise KeyError(f"graph returned statistics of layer {layer!r} with no reference statistics")
            keep = momenta[layer] ** n
            mean = np.asarray(mean, dtype=np.float64)
            sq = np.asarray(var, dtype=np.float64) + mean**2
            out[key_mean] = keep * state[key_mean] + (1 - keep) * mean
            out[key_sq] = keep * state[key_sq] + (1 - keep) * sq
        return out


class NormalisedPass:
    """The one forward pass that the output-level methods (:class:`~device_agents.tta.lame.LAME`,
    :class:`~device_agents.tta.t3a.T3A`) build on.

    On an adaptable graph with a statistics config, the pass normalises with the α-BN statistics of
    :class:`StatisticsMix` (reference mixed with the running target estimate and the batch) and folds the
    batch into the running estimate kept in the method's state under ``prefix``; otherwise (a folded or
    foreign predictor, or ``config=None``) it is the unadapted source pass. Output-level corrections compose
    with normalisation adaptation — LAME and T3A are model-agnostic and take "the model" as given (Boudiaf et
    al. 2022 §5 run LAME on top of other adapted models; Iwasawa & Matsuo 2021 combine T3A with Tent) — and
    the running estimate withstands class-sorted streams, so the corrections start from a model that is no
    worse than the source model on either order, at the cost of one pass, as before.
    """

    def __init__(self, config: BatchStatisticsConfig | None, prefix: str = "stats.") -> None:
        self.config = config
        self.prefix = prefix
        self._mix = None if config is None else StatisticsMix(config, prefix)

    def run(
        self, model: object, x: np.ndarray, state: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
        """``(logits, probs, features, statistics state)`` of one pass over the validated batch ``x``."""
        from device_agents.tta.models import graph_layer_order, is_adaptable, source_pass
        from runtime.model import softmax

        if self._mix is None or not is_adaptable(model):
            logits, probs, features = source_pass(model, x)
            return logits, probs, features, {}
        n = int(x.shape[0])
        reference = model.params  # type: ignore[attr-defined]
        stats = {k: v for k, v in state.items() if k.startswith(self.prefix)} or self._mix.initial_state(reference)
        order = graph_layer_order(model)
        alpha, feeds = self._mix.feeds(stats, reference, n, order)
        result = model.forward(x, alpha=alpha, params=feeds)  # type: ignore[attr-defined]
        stats = {**stats, **self._mix.fold(stats, result.batch_stats, n, order)}
        return result.logits, softmax(result.logits), result.features, stats


class FeaturePassMethod(TTAMethod):
    """Base of the output-level methods that read penultimate features from one :class:`NormalisedPass`
    (:class:`~device_agents.tta.lame.LAME`, :class:`~device_agents.tta.t3a.T3A`); their config has a
    ``statistics`` field (None: the unadapted source pass)."""

    requires_features = True

    def __init__(self, config: TTAConfig | None = None) -> None:
        super().__init__(config)
        self._pass = NormalisedPass(self.config.statistics)  # type: ignore[attr-defined]

    def _feature_pass(self, model: object, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(probs, features, statistics state)`` of the pass; a model without features is refused."""
        from device_agents.tta.models import ModelCapabilityError, describe_model

        _, probs, features, stats = self._pass.run(model, x, self._state)
        if features is None:
            raise ModelCapabilityError(f"{describe_model(model)} returned no features")
        return probs, features, stats
