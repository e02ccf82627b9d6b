"""The running statistics estimate with a short memory for the first normalisation layers and a long one for
deeper layers (:mod:`device_agents.tta.statistics`), on a two-layer numpy model whose graph order differs
from its layers' name order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import SimpleNamespace

import numpy as np
import pytest

from device_agents.tta import FOA, LAME, T3A, AlphaBN, AlphaBNConfig, BatchStatisticsConfig, FOAConfig, LAMEConfig
from device_agents.tta.base import TTAMethod
from device_agents.tta.statistics import ClassBalanceDetector, StatisticsMix
from runtime.errors import InputError
from runtime.model import ForwardResult
from runtime.params import validate_params
from tests.device_agents.conftest import check_digit_batch

FIRST, SECOND = "stem", "block"  # graph order; sorted by name the second layer comes first


class TwoLayerModel:
    """x (N,1,8,8) → affine (3 ch) → α-mixed BN ``stem`` → ReLU → 1×1 mix (3 ch) → α-mixed BN ``block`` → ReLU →
    GAP → linear (3 classes); the adaptable graph's BN math and ``params``/``forward`` surface."""

    channels = 3
    num_classes = 3

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        c = self.channels
        self.w_in = rng.normal(1.0, 0.5, c).astype(np.float32)
        self.b_in = rng.normal(0.0, 0.5, c).astype(np.float32)
        self.mix = rng.normal(0.0, 1.0, (c, c)).astype(np.float32)
        self.head = rng.normal(0.0, 1.0, (c, self.num_classes)).astype(np.float32)
        self._shapes = {f"{layer}.{k}": (c,) for layer in (FIRST, SECOND) for k in ("weight", "bias", "mean", "var")}
        self._params = {f"{layer}.{k}": np.full(c, 1.0 if k in ("weight", "var") else 0.0, np.float32)
                        for layer in (FIRST, SECOND) for k in ("weight", "bias", "mean", "var")}
        self._params[f"{FIRST}.mean"] = (self.w_in * 0.5 + self.b_in).astype(np.float32)
        self._params[f"{FIRST}.var"] = (self.w_in**2 / 12).astype(np.float32)
        self.calls: list[tuple[int, float]] = []
        source = self.forward(np.random.default_rng(100).random((256, 1, 8, 8), dtype=np.float32)).features
        mean, var = source.mean(axis=0), source.var(axis=0)
        self.calls.clear()
        layers = [SimpleNamespace(name=FIRST), SimpleNamespace(name=SECOND)]
        self.manifest = SimpleNamespace(name="two-layer", layers=layers, features_output="features", raw={},
                                        source_feature_stats=lambda: (mean, var))

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._params.items()}

    def check_input(self, x: np.ndarray) -> np.ndarray:
        return check_digit_batch(x)

    @staticmethod
    def _bn(z: np.ndarray, p: Mapping[str, np.ndarray], layer: str, alpha: float
            ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        mu_b = z.mean(axis=(0, 2, 3))
        var_b = ((z - mu_b.reshape(1, -1, 1, 1)) ** 2).mean(axis=(0, 2, 3))
        mu = (1 - alpha) * p[f"{layer}.mean"] + alpha * mu_b
        var = (1 - alpha) * p[f"{layer}.var"] + alpha * var_b
        scale = p[f"{layer}.weight"] / np.sqrt(var + 1e-5)
        y = z * scale.reshape(1, -1, 1, 1) + (p[f"{layer}.bias"] - mu * scale).reshape(1, -1, 1, 1)
        return np.maximum(y, 0), (mu_b.astype(np.float32), var_b.astype(np.float32))

    def forward(self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None
                ) -> ForwardResult:
        x = self.check_input(x)
        p = self.params
        if params:
            p.update(validate_params(params, self._shapes))
        self.calls.append((x.shape[0], float(alpha)))
        z1 = x * self.w_in.reshape(1, -1, 1, 1) + self.b_in.reshape(1, -1, 1, 1)
        y1, s1 = self._bn(z1, p, FIRST, alpha)
        z2 = np.einsum("nchw,cd->ndhw", y1, self.mix)
        y2, s2 = self._bn(z2, p, SECOND, alpha)
        features = y2.mean(axis=(2, 3)).astype(np.float32)
        return ForwardResult((features @ self.head).astype(np.float32), features, {FIRST: s1, SECOND: s2})


def _batch(seed: int, size: int = 32, level: float = 0.4) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, 1, 8, 8)) * 0.5 + level).astype(np.float32)


def test_momenta_follow_graph_order() -> None:
    cfg = BatchStatisticsConfig(ema_momentum=0.9, deep_momentum=0.99, shallow_layers=1)
    assert cfg.momenta([FIRST, SECOND]) == {FIRST: 0.9, SECOND: 0.99}
    reference = TwoLayerModel().params
    mix = StatisticsMix(cfg)
    assert mix.momenta(reference, [FIRST, SECOND]) == {FIRST: 0.9, SECOND: 0.99}
    assert mix.momenta(reference) == {SECOND: 0.9, FIRST: 0.99}  # no graph order: sorted by name
    single = BatchStatisticsConfig(deep_momentum=None, ema_momentum=0.97)
    assert single.momenta(list("abcde")) == dict.fromkeys("abcde", 0.97)
    defaults = BatchStatisticsConfig().momenta([f"l{i}" for i in range(9)])
    assert [defaults[f"l{i}"] for i in range(9)] == [0.99] * 4 + [0.9985] * 5


def test_alpha_bn_folds_each_layer_with_its_own_memory() -> None:
    model = TwoLayerModel()
    method = AlphaBN(AlphaBNConfig(ema_momentum=0.9, deep_momentum=0.99, shallow_layers=1))
    method.predict(model, _batch(0))
    before = method.snapshot()
    model.calls.clear()
    x = _batch(1, level=0.2)
    method.predict(model, x)
    w = 1 - 0.99**32  # the batch weighs what the longest memory gives it
    assert model.calls == [(32, pytest.approx(w))]
    after = method.snapshot()
    mix = StatisticsMix(method.config)
    _, feeds = mix.feeds(before, model.params, 32, [FIRST, SECOND])
    stats = model.forward(x, alpha=w, params=feeds).batch_stats
    for layer, m in ((FIRST, 0.9), (SECOND, 0.99)):
        keep = m**32
        mu_b, var_b = (np.asarray(s, np.float64) for s in stats[layer])
        np.testing.assert_allclose(after[f"{layer}.ema_mean"], keep * before[f"{layer}.ema_mean"] + (1 - keep) * mu_b,
                                   rtol=1e-6)
        np.testing.assert_allclose(after[f"{layer}.ema_sq"],
                                   keep * before[f"{layer}.ema_sq"] + (1 - keep) * (var_b + mu_b**2), rtol=1e-6)


def test_one_memory_when_deep_momentum_is_none() -> None:
    x = [_batch(i, level=0.1 * i) for i in range(4)]
    single, uniform = (AlphaBN(AlphaBNConfig(ema_momentum=0.95, deep_momentum=d, shallow_layers=1))
                       for d in (None, 0.95))
    for method in (single, uniform):
        model = TwoLayerModel()
        for batch in x:
            method.predict(model, batch)
    a, b = single.snapshot(), uniform.snapshot()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("make", [
    lambda: AlphaBN(AlphaBNConfig(shallow_layers=1)),
    lambda: FOA(FOAConfig(shallow_layers=1, population=2)),
    lambda: LAME(LAMEConfig(statistics=BatchStatisticsConfig(shallow_layers=1))),
    lambda: T3A(),
], ids=["alpha_bn", "foa", "lame", "t3a"])
def test_deterministic_and_bad_input_leaves_the_state_unchanged(make: Callable[[], TTAMethod]) -> None:
    runs = []
    for _ in range(2):
        model, method = TwoLayerModel(), make()
        logits = [method.predict(model, _batch(seed, level=0.1 * seed)).logits for seed in range(3)]
        runs.append((logits, method.snapshot()))
        state = method.snapshot()
        for bad in (np.full((4, 1, 8, 8), np.nan, np.float32), np.zeros((4, 1, 7, 8), np.float32),
                    np.zeros((0, 1, 8, 8), np.float32)):
            with pytest.raises(InputError):
                method.predict(model, bad)
            after = method.snapshot()
            assert after.keys() == state.keys()
            for key in state:
                np.testing.assert_array_equal(after[key], state[key])
    (l1, s1), (l2, s2) = runs
    for a, b in zip(l1, l2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert s1.keys() == s2.keys() and all(np.array_equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("field, value", [("deep_momentum", 1.0), ("deep_momentum", 0.0), ("shallow_layers", -1),
                                          ("shallow_layers", True), ("shallow_layers", 1.5),
                                          ("balanced_batch_weight", 1.5), ("balanced_batch_weight", float("nan")),
                                          ("imbalance_threshold", 1.0), ("imbalance_threshold", float("inf")),
                                          ("min_batch_for_balanced", 1)])
def test_bad_statistics_config_is_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        BatchStatisticsConfig(**{field: value})


def _class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 1, 8, 8) images: noise around one of four class templates (a bright row band per class)."""
    x = rng.normal(0.3, 0.15, (len(labels), 1, 8, 8))
    for k in range(4):
        x[labels == k, 0, 2 * k : 2 * k + 2] += 0.4
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _detector_scores(order: str, batch: int, batches: int = 24) -> list[float]:
    rng = np.random.default_rng(0)
    if order == "shuffled":
        labels = rng.integers(0, 4, batch * batches)
    else:  # runs of 3 batches per class
        labels = np.arange(batch * batches) // (3 * batch) % 4
    detector, state, scores = ClassBalanceDetector(), {}, []
    for i in range(batches):
        score, state = detector.update(state, _class_images(labels[i * batch : (i + 1) * batch], rng))
        scores.append(score)
    return scores


def test_class_balance_detector_separates_shuffled_from_class_runs() -> None:
    threshold = np.log(BatchStatisticsConfig().imbalance_threshold)
    shuffled, runs = _detector_scores("shuffled", 64), _detector_scores("sorted", 64)
    assert shuffled[0] > threshold  # a fresh detector starts on the safe side
    assert all(s < threshold for s in shuffled[8:])
    assert all(s > threshold for s in runs)


def test_balanced_batches_use_their_own_statistics_and_small_ones_for_their_share() -> None:
    mix = StatisticsMix(BatchStatisticsConfig())
    momenta = {"a": 0.99, "b": 0.9985}
    assert mix.batch_weight(64, momenta, balanced=True) == 1.0
    assert mix.batch_weight(64, momenta, balanced=False) == pytest.approx(1 - 0.9985**64)
    assert mix.batch_weight(16, momenta, balanced=True) == pytest.approx(0.5)  # 16 / min_batch_for_balanced
    assert mix.batch_weight(16, momenta, balanced=False) == pytest.approx(1 - 0.9985**16)
    assert mix.batch_weight(8, momenta, balanced=True) == 0.0  # < min_batch_for_batch_stats
    off = StatisticsMix(BatchStatisticsConfig(balanced_batch_weight=None))
    assert off.detect({}, np.zeros((64, 1, 8, 8), np.float32)) == (False, {})


def test_alpha_bn_keeps_the_detector_in_its_state_and_switches_to_batch_statistics() -> None:
    model, method = TwoLayerModel(), AlphaBN()
    rng = np.random.default_rng(1)
    for _ in range(12):
        method.predict(model, _class_images(rng.integers(0, 4, 64), rng))
    state = method.snapshot()
    assert state["balance.score"] < np.log(2.0) and state["balance.input_mean"].shape == (48,)
    model.calls.clear()
    method.predict(model, _class_images(rng.integers(0, 4, 64), rng))
    assert model.calls[-1][1] == 1.0  # α·w with w = 1: the batch's own statistics


@pytest.mark.parametrize("batch", [16, 32, 64])
def test_a_shuffled_stream_of_small_batches_is_found_balanced(batch: int) -> None:
    """The running mean is anchored on a whole window, not on the first small batch: anchored on 16 samples it
    kept z inflated and a batch-16 stream never left the imbalanced state."""
    rng = np.random.default_rng(5)
    mix, state, verdicts = StatisticsMix(BatchStatisticsConfig()), {}, []
    for _ in range(1536 // batch):
        balanced, entries = mix.detect(state, _class_images(rng.integers(0, 4, batch), rng))
        state.update(entries)
        verdicts.append(balanced)
    assert "balance.input_mean" in state
    assert np.mean(verdicts[len(verdicts) // 2 :]) > 0.8


def test_a_small_batch_of_one_class_is_vetoed_in_a_balanced_stretch() -> None:
    """Windows of 64 pooled from batches of 16 can look balanced while one batch is a single class: that batch
    gets no balanced verdict (its own z against the running mean), its balanced neighbours keep theirs."""
    rng = np.random.default_rng(6)
    mix, state = StatisticsMix(BatchStatisticsConfig()), {}
    for _ in range(96):
        _, entries = mix.detect(state, _class_images(rng.integers(0, 4, 16), rng))
        state.update(entries)
    assert mix.detect(state, _class_images(rng.integers(0, 4, 16), rng))[0]
    assert not mix.detect(state, _class_images(np.full(16, 2), rng))[0]


def _balanced_detector_state(rng: np.random.Generator) -> tuple[ClassBalanceDetector, dict[str, np.ndarray]]:
    detector, state = ClassBalanceDetector(), {}
    for _ in range(12):
        _, state = detector.update(state, _class_images(rng.integers(0, 4, 64), rng), np.log(2.0))
    assert float(state["balance.score"]) < np.log(2.0)
    return detector, state


def test_a_domain_switch_in_a_balanced_stream_re_anchors_instead_of_reading_as_imbalance() -> None:
    rng = np.random.default_rng(2)
    detector, state = _balanced_detector_state(rng)
    before = float(state["balance.score"])
    switched = np.clip(_class_images(rng.integers(0, 4, 64), rng) * 0.5 + 0.4, 0.0, 1.0)  # a new domain
    score, after = detector.update(state, switched, np.log(2.0))
    assert score == before and float(after["balance.anchor_age"]) == 0.0
    scores = []
    for _ in range(6):
        x = np.clip(_class_images(rng.integers(0, 4, 64), rng) * 0.5 + 0.4, 0.0, 1.0)
        score, after = detector.update(after, x, np.log(2.0))
        scores.append(score)
    assert all(s < np.log(2.0) for s in scores)


def test_class_runs_after_a_balanced_stretch_leave_the_balanced_state() -> None:
    rng = np.random.default_rng(3)
    detector, state = _balanced_detector_state(rng)
    scores = []
    for i in range(12):  # runs of two batches per class
        score, state = detector.update(state, _class_images(np.full(64, (i // 2) % 4), rng), np.log(2.0))
        scores.append(score)
    assert scores[-1] > np.log(2.0) and all(s > np.log(2.0) for s in scores[6:])


def test_small_batches_are_pooled_into_one_test_per_window() -> None:
    rng = np.random.default_rng(4)
    detector, state = _balanced_detector_state(rng)
    state = {**state, "balance.anchor_age": np.array(0.0)}  # just re-anchored: a jump counts as evidence
    x = _class_images(np.zeros(64, int), rng)  # one class: evidence of imbalance
    whole, _ = detector.update(state, x, np.log(2.0))
    first, halfway = detector.update(state, x[:32], np.log(2.0))
    assert first == float(state["balance.score"])  # half a window: no test yet
    assert float(halfway["balance.pool_count"]) == 32.0
    second, after = detector.update(halfway, x[32:], np.log(2.0))
    assert second == pytest.approx(whole) and second > first
    assert float(after["balance.pool_count"]) == 0.0
