"""Per-method behaviour on tiny numpy models: α-BN's statistics, FOA's search, LAME's bound iterations, T3A."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from device_agents.rng import rng_from_words, rng_to_words
from device_agents.tta import (
    FOA,
    LAME,
    T3A,
    AlphaBN,
    AlphaBNConfig,
    FOAConfig,
    LAMEConfig,
    ModelCapabilityError,
    SourceModel,
    T3AConfig,
    knn_affinity,
    laplacian_adjusted,
)
from device_agents.tta.cma_search import CMASearch
from runtime.model import ForwardResult, softmax
from tests.device_agents.conftest import TinyAdaptableModel
from tests.device_agents.test_tta import TinyModel, TinyPredictor


def _batch(seed: int, size: int = 32) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, 1, 8, 8)) * 0.5 + 0.4).astype(np.float32)


# -- α-BN ------------------------------------------------------------------------------------------------------


def test_alpha_bn_feeds_the_running_estimate_and_the_batch_in_one_pass() -> None:
    model = TinyModel()
    cfg = AlphaBNConfig(alpha=0.8, ema_momentum=0.99)
    method = AlphaBN(cfg)
    method.predict(model, _batch(0))
    state = method.snapshot()
    x = _batch(1)
    model.calls.clear()
    out = method.predict(model, x)
    w = 1 - 0.99**32
    assert model.calls == [(32, pytest.approx(0.8 * w))]
    ref = model.params
    ema_mean = state["bn1.ema_mean"]
    mean = ((1 - 0.8) * ref["bn1.mean"] + 0.8 * (1 - w) * ema_mean) / (1 - 0.8 * w)
    var = ((1 - 0.8) * ref["bn1.var"] + 0.8 * (1 - w) * (state["bn1.ema_sq"] - ema_mean**2)) / (1 - 0.8 * w)
    want = model.forward(x, 0.8 * w, {"bn1.mean": mean.astype(np.float32), "bn1.var": var.astype(np.float32)})
    np.testing.assert_allclose(out.logits, want.logits, rtol=1e-5, atol=1e-6)
    mu_b, _ = want.batch_stats["bn1"]
    keep = 0.99**32
    np.testing.assert_allclose(method.snapshot()["bn1.ema_mean"], keep * ema_mean + (1 - keep) * mu_b, rtol=1e-6)


def test_classic_alpha_bn_is_the_graphs_own_mix() -> None:
    model, x = TinyModel(), _batch(0)
    out = AlphaBN(AlphaBNConfig(alpha=0.3, batch_weight=1.0)).predict(model, x)
    np.testing.assert_array_equal(out.logits, model.forward(x, alpha=0.3).logits)


def test_alpha_bn_zero_equals_source() -> None:
    model, x = TinyModel(), _batch(0)
    for size in (1, 32):
        method = AlphaBN(AlphaBNConfig(alpha=0.0))
        got = [method.predict(model, x[i : i + size]).logits for i in range(0, 32, size)]
        want = [SourceModel().predict(model, x[i : i + size]).logits for i in range(0, 32, size)]
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-6)


def test_alpha_bn_small_batches_estimate_pooled_target_statistics() -> None:
    model = TinyModel()
    rng = np.random.default_rng(0)
    stream = (rng.random((400, 1, 8, 8)) * 0.5 + 0.4).astype(np.float32)
    stream += rng.normal(0, 0.1, (400, 1, 1, 1)).astype(np.float32)  # per-sample offsets: between-sample variance
    method = AlphaBN(AlphaBNConfig(alpha=1.0, ema_momentum=0.99))
    for i in range(400):
        method.predict(model, stream[i : i + 1])
    assert all(n == 1 and a == 0.0 for n, a in model.calls)
    mu_all, var_all = model.forward(stream, alpha=1.0).batch_stats["bn1"]
    state = method.snapshot()
    est_var = state["bn1.ema_sq"] - state["bn1.ema_mean"] ** 2
    np.testing.assert_allclose(state["bn1.ema_mean"], mu_all, rtol=0.05, atol=0.02)
    np.testing.assert_allclose(est_var, var_all, rtol=0.25)
    assert np.all(est_var > model.forward(stream[:1], alpha=1.0).batch_stats["bn1"][1])  # pooled, not one sample


def test_alpha_bn_resists_single_class_batches() -> None:
    """Two input 'classes' arriving in runs: classic α-BN normalises each run to itself and loses the class
    signal; the running estimate keeps the logits of the two runs apart."""
    model = TinyModel()
    rng = np.random.default_rng(3)
    runs = [np.clip(rng.random((32, 1, 8, 8)) * 0.3 + level, 0, 1).astype(np.float32) for level in (0.1, 0.6) * 4]

    def gap(method: AlphaBN) -> float:
        outs = [method.predict(model, r).features.mean(axis=0) for r in runs]
        return float(np.abs(outs[-1] - outs[-2]).sum())

    assert gap(AlphaBN()) > 3 * gap(AlphaBN(AlphaBNConfig(batch_weight=1.0)))


# -- FOA -------------------------------------------------------------------------------------------------------


def test_foa_costs_population_times_generations_passes() -> None:
    model = TinyModel()
    method = FOA(FOAConfig(population=4, generations=2))
    method.predict(model, _batch(0))
    assert [n for n, _ in model.calls] == [32] * 8
    model.calls.clear()
    method.predict(model, _batch(1, size=4))  # below min_batch_for_search: one pass at the CMA-ES mean
    assert len(model.calls) == 1
    assert FOAConfig().passes_per_batch() == 4


def test_foa_carries_its_search_across_batches_and_starts_at_zero() -> None:
    model, method = TinyModel(), FOA(FOAConfig(sigma0=0.2))
    method.predict(model, _batch(0))
    first = method.snapshot()
    assert first["cma.mean"].shape == (2,) and float(first["cma.sigma"]) != 0.2
    for seed in range(1, 6):
        method.predict(model, _batch(seed))
    later = method.snapshot()
    assert not np.array_equal(first["cma.mean"], later["cma.mean"])
    assert not np.array_equal(first["cma.rng"], later["cma.rng"])
    fresh = FOA(FOAConfig(population=2, min_batch_for_search=64))
    out = fresh.predict(model, _batch(9))  # no search: the mean is 0, i.e. the model's own affine parameters
    np.testing.assert_array_equal(out.logits, AlphaBN().predict(model, _batch(9)).logits)


class _RecordingFOA(FOA):
    """FOA that records every candidate's fitness and logits."""

    def __init__(self, config: FOAConfig) -> None:
        super().__init__(config)
        self.seen: list[tuple[float, np.ndarray]] = []

    def _fitness(self, result: ForwardResult, plan: Any) -> float:
        value = super()._fitness(result, plan)
        self.seen.append((value, result.logits))
        return value


def test_foa_predicts_with_the_fittest_candidate() -> None:
    model, method = TinyModel(), _RecordingFOA(FOAConfig(population=6, generations=2))
    out = method.predict(model, _batch(4))
    assert len(method.seen) == 12
    fitness = [f for f, _ in method.seen]
    np.testing.assert_array_equal(out.logits, method.seen[int(np.argmin(fitness))][1])
    assert len({round(f, 12) for f in fitness}) > 1  # the candidates differ


def test_foa_refuses_unknown_layers_and_a_fitness_without_targets() -> None:
    with pytest.raises(ModelCapabilityError, match=r"FOA layers .*'bn7'"):
        FOA(FOAConfig(layers=("bn7",))).predict(TinyModel(), _batch(0))
    with pytest.raises(ModelCapabilityError, match="needs source statistics after the adapted layers"):
        FOA().predict(TinyAdaptableModel(), _batch(0))  # one layer and no manifest: nothing to compare


def test_cma_search_state_round_trips_through_arrays() -> None:
    rng = np.random.default_rng(5)
    rng.standard_normal(3)
    words = rng_to_words(rng)
    assert words.dtype == np.uint64 and words.shape == (6,)
    np.testing.assert_array_equal(rng_from_words(words).standard_normal(4), rng.standard_normal(4))
    search = CMASearch(population=5, sigma0=0.1, seed=0)
    es = search.strategy({}, 3)
    candidates = es.ask()
    es.tell(candidates, [float(np.sum(c**2)) for c in candidates])
    exported = search.export()
    search.invalidate()
    rebuilt = search.strategy(exported, 3)
    np.testing.assert_array_equal(rebuilt.mean, exported["cma.mean"])
    assert rebuilt.sigma == pytest.approx(float(exported["cma.sigma"]))
    again = CMASearch(population=5, sigma0=0.1, seed=0).strategy(exported, 3)
    np.testing.assert_array_equal(np.asarray(rebuilt.ask()), np.asarray(again.ask()))


# -- LAME ------------------------------------------------------------------------------------------------------


def test_lame_without_neighbours_is_the_identity() -> None:
    probs = softmax(np.random.default_rng(0).normal(size=(6, 4)))
    np.testing.assert_allclose(laplacian_adjusted(probs, np.zeros((6, 6))), probs)
    assert not knn_affinity(np.ones((1, 3)), 5).any()
    model, x = TinyModel(), _batch(0, size=1)
    np.testing.assert_allclose(LAME().predict(model, x).probs, SourceModel().predict(model, x).probs, rtol=1e-6)


def test_knn_affinity_links_each_sample_to_its_nearest_cosine_neighbours() -> None:
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.02]])
    w = knn_affinity(features, 2)
    np.testing.assert_array_equal(w.sum(axis=1), 2)
    assert np.all(np.diag(w) == 0)
    assert w[0, 4] == w[0, 1] == 1 and w[2, 3] == 1 and w[0, 2] == 0


def test_lame_pulls_neighbours_to_a_shared_class_and_lowers_its_energy() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0]])
    labels = np.repeat([0, 1], 10)
    features = centres[labels] + rng.normal(0, 0.5, (20, 3))
    logits = np.where(np.arange(3) == labels[:, None], 1.0, 0.0) + rng.normal(0, 1.2, (20, 3))
    probs = softmax(logits)
    w = knn_affinity(features, 5)
    z = laplacian_adjusted(probs, w, weight=1.0)
    np.testing.assert_allclose(z.sum(axis=1), 1.0)
    assert (z.argmax(1) == labels).mean() > (probs.argmax(1) == labels).mean()
    assert (z.argmax(1) == labels).mean() == 1.0

    def energy(q: np.ndarray) -> float:
        return float(np.sum(q * (np.log(q) - np.log(probs))) - np.sum((w @ q) * q))

    assert energy(z) < energy(probs)


def test_lame_corrects_the_alpha_bn_pass_and_keeps_its_running_statistics() -> None:
    model = TinyModel()
    lame, abn = LAME(LAMEConfig(laplacian_weight=0.0)), AlphaBN()
    for seed in range(3):
        x = _batch(seed)
        np.testing.assert_allclose(lame.predict(model, x).probs, abn.predict(model, x).probs, rtol=1e-6)
    state = lame.snapshot()
    assert state.keys() == {f"stats.{k}" for k in abn.snapshot()}
    for key, value in abn.snapshot().items():
        np.testing.assert_allclose(state[f"stats.{key}"], value)
    lame.reset()
    assert lame.snapshot() == {}


def test_lame_source_pass_option_is_the_papers_lame() -> None:
    model, x = TinyModel(), _batch(0)
    out = LAME(LAMEConfig(statistics=None, center_features=False, symmetric=False)).predict(model, x)
    source = SourceModel().predict(model, x)
    want = laplacian_adjusted(source.probs, knn_affinity(source.features, 5))
    np.testing.assert_allclose(out.probs, want, rtol=1e-6)


def test_knn_affinity_centres_and_symmetrises() -> None:
    features = np.array([[2.0, 1.0], [2.1, 1.0], [1.0, 2.0], [1.0, 2.2]])
    assert knn_affinity(features, 1).sum() == 4
    centred = knn_affinity(features, 1, center=np.array([1.5, 1.5]), symmetric=True)
    np.testing.assert_array_equal(centred, centred.T)
    assert centred[0, 1] == centred[2, 3] == 1.0 and centred[0, 2] == 0.0


def test_lame_gate_runs_the_detector_where_the_statistics_do_not() -> None:
    """The gate's class-balance test runs wherever LAME corrects: on the statistics' detector when they use
    one, on its own (same state keys) when they do not or when the pass is the source pass; ungated LAME
    keeps no detector state."""
    from device_agents.tta import BatchStatisticsConfig

    model = TinyModel()
    configs = {"statistics' detector": LAMEConfig(),
               "statistics without one": LAMEConfig(statistics=BatchStatisticsConfig(balanced_batch_weight=None)),
               "source pass": LAMEConfig(statistics=None)}
    for label, config in configs.items():
        method = LAME(config)
        for seed in range(3):
            method.predict(model, _batch(seed))
        assert "stats.balance.score" in method.snapshot(), label
    ungated = LAME(LAMEConfig(statistics=None, balanced_laplacian_weight=None))
    ungated.predict(model, _batch(0))
    assert ungated.snapshot() == {}


def test_lame_config_checks_statistics() -> None:
    with pytest.raises(ValueError, match="statistics"):
        LAMEConfig(statistics=0.5)  # type: ignore[arg-type]


# -- T3A -------------------------------------------------------------------------------------------------------


def test_t3a_combines_templates_with_the_models_prediction() -> None:
    model, x = TinyModel(), _batch(3)
    base = AlphaBN().predict(model, x)
    out = T3A(T3AConfig(template_scale=0.0, imbalanced_template_scale=0.0)).predict(model, x)  # templates off
    np.testing.assert_allclose(out.probs, base.probs, rtol=1e-5)
    paper = T3A(T3AConfig(model_weight=0.0, template_scale=1.0, imbalanced_template_scale=None)).predict(model, x)
    both = T3A(T3AConfig(imbalanced_template_scale=None)).predict(model, x)
    want = np.log(np.clip(base.probs, 1e-12, None)) + 5.0 * paper.logits
    np.testing.assert_allclose(both.logits, want, rtol=1e-4, atol=1e-4)
    # a fresh detector has not yet found the stream balanced: the templates weigh imbalanced_template_scale
    halved = T3A().predict(model, x)
    want = np.log(np.clip(base.probs, 1e-12, None)) + 2.5 * paper.logits
    np.testing.assert_allclose(halved.logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="imbalanced_template_scale"):
        T3AConfig(imbalanced_template_scale=-1.0)
    with pytest.raises(ValueError, match="imbalanced_template_scale and model_weight cannot both be 0"):
        T3AConfig(model_weight=0.0, imbalanced_template_scale=0.0)
    with pytest.raises(ValueError, match="both be 0"):
        T3AConfig(template_scale=0.0, model_weight=0.0)
    with pytest.raises(ValueError, match="template_scale"):
        T3AConfig(template_scale=-1.0)


def test_t3a_is_not_below_source_on_a_shifted_fixture() -> None:
    """Shifted inputs (brightness offset): the prototype classifier on the α-BN pass keeps at least the
    accuracy of the source model's labels on the shifted stream (labels: the clean model's predictions)."""
    model = TinyModel()
    rng = np.random.default_rng(7)
    clean = rng.random((256, 1, 8, 8), dtype=np.float32)
    labels = SourceModel().predict(model, clean).probs.argmax(1)
    shifted = (clean * 0.6 + 0.35).astype(np.float32)
    t3a, hits_t3a, hits_src = T3A(), 0, 0
    for i in range(0, 256, 32):
        x, y = shifted[i : i + 32], labels[i : i + 32]
        hits_t3a += int((t3a.predict(model, x).probs.argmax(1) == y).sum())
        hits_src += int((SourceModel().predict(model, x).probs.argmax(1) == y).sum())
    assert hits_t3a >= hits_src




def test_t3a_keeps_a_bounded_entropy_filtered_support() -> None:
    model, method = TinyModel(), T3A(T3AConfig(filter_k=3, statistics=None))
    for seed in range(5):
        method.predict(model, _batch(seed))
    state = method.snapshot()
    assert state["supports"].shape == (3, 3, 4) and state["support_entropy"].shape == (3, 3)
    filled = np.isfinite(state["support_entropy"])
    assert filled.sum() >= 3
    for k in range(3):  # sorted: the M lowest entropies kept
        assert np.all(np.diff(state["support_entropy"][k][filled[k]]) >= 0)
    seen = []
    for seed in range(5):
        probs = SourceModel().predict(model, _batch(seed)).probs
        seen.append(-(probs * np.log(probs)).sum(1)[probs.argmax(1) == 0])
    lowest = np.sort(np.concatenate(seen))[: int(filled[0].sum())]
    np.testing.assert_allclose(np.sort(state["support_entropy"][0][filled[0]]), lowest, rtol=1e-9)


def test_t3a_classes_without_support_score_lowest() -> None:
    model, x = TinyModel(), _batch(2)
    paper = T3AConfig(statistics=None, model_weight=0.0, template_scale=1.0, imbalanced_template_scale=None)
    out = T3A(paper).predict(model, x)  # the paper's T3A
    predicted = set(np.unique(SourceModel().predict(model, x).probs.argmax(1)).tolist())
    empty = sorted(set(range(3)) - predicted)
    assert empty, "the tiny model should leave a class unpredicted on this batch"
    others = out.logits[:, sorted(predicted)]
    for k in empty:
        np.testing.assert_allclose(out.logits[:, k], others.min(axis=1) - 30.0, rtol=1e-5)
        assert np.all(out.probs[:, k] < 1e-12)


def test_t3a_works_on_a_predictor() -> None:
    model = TinyPredictor()
    out = T3A().predict(model, _batch(0))
    assert out.probs.shape == (32, 3) and out.features is not None
