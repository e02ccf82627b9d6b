"""Aggregation strategies on hand-computed examples, under Byzantine contributions, with DP; and in a round."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import handlers, updates
from server.aggregation import (
    AGGREGATORS,
    AggregationError,
    Contribution,
    DPConfig,
    FedAU,
    FedAvg,
    FedBuff,
    FedBuffConfig,
    Krum,
    KrumConfig,
    create_aggregator,
    register_aggregator,
    staleness_weight,
)
from server.broker import UpdateBroker
from server.errors import InvalidTensorError, NothingToAggregateError
from server.privacy import RdpAccountant, sampled_gaussian_rdp
from server.rounds import RoundRunner, fedavg
from server.state import Limits, ServerState
from server.storage import BlobStore, Registry
from tests.server.server_testkit import make_bundle_files

# Options that let every registered rule reproduce identical contributions (DP: huge clip, negligible noise).
BATTERY_OPTIONS: dict[str, dict[str, Any]] = {"dp_fedavg": {"clip_norm": 1e3, "noise_multiplier": 1e-12, "seed": 0}}


def _c(device: str, w: list[float] | np.ndarray, weight: float = 1.0, **kw: Any) -> Contribution:
    return Contribution(device, {"w": np.asarray(w, dtype=np.float64)}, weight, **kw)


def _zero(d: int = 1) -> dict[str, np.ndarray]:
    return {"w": np.zeros(d, np.float32)}


# --- conformance battery over every registered strategy -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_rule_reproduces_identical_contributions(name: str) -> None:
    base = {"w": np.zeros((2, 3), np.float32), "b": np.ones(2, np.float32)}
    params = {"w": np.arange(6.0).reshape(2, 3), "b": np.array([2.0, -1.0])}
    agg = create_aggregator(name, **BATTERY_OPTIONS.get(name, {}))
    out = agg.aggregate(base, [Contribution(f"d{i}", params, 3.0) for i in range(7)])
    assert set(out.params) == set(base) and all(v.dtype == np.float32 for v in out.params.values())
    for k in base:
        np.testing.assert_allclose(out.params[k], params[k], atol=1e-5)
    assert set(out.weights) == {f"d{i}" for i in range(7)}
    assert all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_rule_rejects_bad_contributions(name: str) -> None:
    agg = create_aggregator(name, **BATTERY_OPTIONS.get(name, {}))
    good = [_c(f"d{i}", [1.0, 2.0]) for i in range(6)]
    with pytest.raises(NothingToAggregateError):
        agg.aggregate(_zero(2), [])
    with pytest.raises(InvalidTensorError, match="non-finite"):
        agg.aggregate(_zero(2), [*good, _c("bad", [np.nan, 0.0])])
    with pytest.raises(InvalidTensorError, match=r"shape \(3,\)"):
        agg.aggregate(_zero(2), [*good, _c("bad", [1.0, 2.0, 3.0])])
    with pytest.raises(InvalidTensorError, match="unknown parameter 'v'"):
        agg.aggregate(_zero(2), [*good, Contribution("bad", {"v": np.zeros(2)})])


def test_registry_rejects_unknown_names_bad_options_and_duplicates() -> None:
    with pytest.raises(AggregationError, match="unknown aggregator 'fedsgd'"):
        create_aggregator("fedsgd")
    with pytest.raises(AggregationError, match="bad options for aggregator 'krum'"):
        create_aggregator("krum", beta=0.1)
    with pytest.raises(AggregationError, match=r"beta 0\.5"):
        create_aggregator("trimmed_mean", beta=0.5)
    with pytest.raises(AggregationError, match="clip_norm -1"):
        create_aggregator("dp_fedavg", clip_norm=-1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator(FedAvg, object)
    with pytest.raises(AggregationError, match="weight -1"):
        _c("a", [0.0], weight=-1.0)
    assert create_aggregator("fedau") is not create_aggregator("fedau")  # fresh state each time


# --- hand-computed examples ---------------------------------------------------------------------------------


def test_fedavg_weighted_mean_and_partial_names_match_the_function() -> None:
    base = {"w": np.zeros(2, np.float32), "b": np.ones(2, np.float32), "v": np.full(2, 5.0, np.float32)}
    given = [(1, {"w": np.array([4.0, 0.0]), "b": np.array([3.0, 3.0])}), (3, {"w": np.array([0.0, 8.0])})]
    out = create_aggregator("fedavg").aggregate(base, [Contribution(str(i), p, w) for i, (w, p) in enumerate(given)])
    np.testing.assert_allclose(out.params["w"], [1.0, 6.0])
    np.testing.assert_allclose(out.params["b"], [3.0, 3.0])  # carried by one contribution only
    np.testing.assert_array_equal(out.params["v"], base["v"])  # carried by none
    assert out.weights == {"0": 1.0, "1": 3.0}
    for k, v in fedavg(given, base).items():
        np.testing.assert_array_equal(v, out.params[k])


def test_deltas_are_added_to_the_base() -> None:
    base = {"w": np.array([10.0, 10.0], np.float32)}
    out = create_aggregator("fedavg").aggregate(base, [_c("a", [1.0, -1.0], is_delta=True), _c("b", [3.0, 1.0])])
    np.testing.assert_allclose(out.params["w"], [(11.0 + 3.0) / 2, (9.0 + 1.0) / 2])


def test_trimmed_mean_and_median_per_coordinate() -> None:
    cs = [_c(str(i), [v, -v]) for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 100.0])]
    trimmed = create_aggregator("trimmed_mean", beta=0.2).aggregate(_zero(2), cs).params["w"]
    np.testing.assert_allclose(trimmed, [3.0, -3.0])  # drop 1 and 100 (per coordinate), mean of 2, 3, 4
    np.testing.assert_allclose(create_aggregator("median").aggregate(_zero(2), cs).params["w"], [3.0, -3.0])
    even = create_aggregator("median").aggregate(_zero(2), cs[:4]).params["w"]
    np.testing.assert_allclose(even, [2.5, -2.5])
    untrimmed = create_aggregator("trimmed_mean", beta=0.1).aggregate(_zero(2), cs).params["w"]
    np.testing.assert_allclose(untrimmed, [22.0, -22.0])  # floor(0.1 * 5) = 0: plain mean


def test_krum_scores_selection_and_multi_krum() -> None:
    cs = [_c(str(i), [v]) for i, v in enumerate([0.0, 2.0, 3.0, 4.0, 100.0])]
    krum = Krum(KrumConfig(byzantine=1))
    # n - f - 2 = 2 nearest: 0 -> 4 + 9, 2 -> 1 + 4, 3 -> 1 + 1, 4 -> 1 + 4, 100 -> 96² + 97²
    np.testing.assert_allclose(krum.scores(np.array([[0.0], [2.0], [3.0], [4.0], [100.0]])),
                               [13.0, 5.0, 2.0, 5.0, 96.0 ** 2 + 97.0 ** 2])
    assert krum.aggregate(_zero(), cs).params["w"][0] == 3.0 and krum.selected == [2]
    multi = create_aggregator("krum", byzantine=1, multi=3).aggregate(_zero(), cs)
    assert multi.params["w"][0] == 3.0 and multi.metrics["selected"] == 3.0  # mean of 2, 3, 4
    with pytest.raises(AggregationError, match="krum needs at least 5 contributions, got 4"):
        krum.aggregate(_zero(), cs[:4])
    with pytest.raises(AggregationError, match="needs every contribution to carry"):
        krum.aggregate({"w": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)},
                       [*cs[:4], Contribution("x", {"w": np.zeros(1), "b": np.zeros(1)})])


@pytest.mark.parametrize(("name", "options"), [("trimmed_mean", {"beta": 0.2}), ("median", {}),
                                               ("krum", {"byzantine": 2}), ("krum", {"byzantine": 2, "multi": 4})])
def test_robust_rules_resist_twenty_percent_byzantine(name: str, options: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    true = np.linspace(-1.0, 1.0, 20)
    honest = [_c(f"h{i}", true + rng.normal(0.0, 0.05, 20), 10.0) for i in range(8)]
    flipped = [_c("b0", -10.0 * true, 1000.0), _c("b1", -10.0 * true, 1000.0)]  # 20 %, claiming many samples
    cs = honest + flipped
    naive = create_aggregator("fedavg").aggregate(_zero(20), cs).params["w"]
    robust = create_aggregator(name, **options).aggregate(_zero(20), cs).params["w"]
    assert np.linalg.norm(naive - true) > 5.0 * np.linalg.norm(true)
    assert np.linalg.norm(robust - true) < 0.1 * np.linalg.norm(true)


def test_fedau_weights_follow_participation_intervals() -> None:
    fedau = create_aggregator("fedau", cutoff=10)
    assert isinstance(fedau, FedAU)
    for t in range(12):  # "a" every round, "b" every 4th round, "c" once then never again
        cs = [_c("a", [1.0])] + ([_c("b", [1.0])] if t % 4 == 0 else []) + ([_c("c", [1.0])] if t == 0 else [])
        out = fedau.aggregate(_zero(), cs)
    s = fedau.stats
    assert s["a"].omega == 1.0 and s["b"].omega == 4.0 and (s["a"].rounds_seen, s["b"].rounds_participated) == (12, 3)
    assert s["c"].omega == 10.0 and s["c"].intervals == 1  # capped at K = 10 after vanishing
    both = fedau.aggregate(_zero(), [_c("a", [2.0]), _c("b", [6.0])])  # round 13: b's interval is 13 - 9 = 4
    assert both.weights == {"a": 1.0, "b": 4.0}
    np.testing.assert_allclose(both.params["w"], [(1.0 * 2.0 + 4.0 * 6.0) / 3])  # N = 3 devices seen
    assert both.metrics["population"] == 3.0 and out.metrics["population"] == 3.0
    with pytest.raises(AggregationError, match="one contribution per device"):
        fedau.aggregate(_zero(), [_c("a", [1.0]), _c("a", [1.0])])


def test_fedbuff_staleness_weights_and_buffer() -> None:
    assert [staleness_weight(s) for s in (0, 3, 8)] == [1.0, 0.5, 1.0 / 3.0]
    fedbuff = create_aggregator("fedbuff", buffer_size=3, server_lr=0.5)
    assert isinstance(fedbuff, FedBuff) and fedbuff.config == FedBuffConfig(3, 0.5)
    base = {"w": np.array([1.0], np.float32)}
    assert fedbuff.submit(base, _c("a", [3.0], is_delta=True, staleness=0)) is None
    assert fedbuff.submit(base, _c("b", [4.0], is_delta=True, staleness=3)) is None
    out = fedbuff.submit(base, _c("c", [6.0], is_delta=True, staleness=8))
    assert out is not None and fedbuff.buffer == [] and out.weights == {"a": 1.0, "b": 0.5, "c": 1.0 / 3.0}
    np.testing.assert_allclose(out.params["w"], [1.0 + 0.5 * (3.0 + 2.0 + 2.0) / 3.0], rtol=1e-6)


# --- differential privacy -----------------------------------------------------------------------------------


def test_dp_clipping_bounds_every_device() -> None:
    dp = create_aggregator("dp_fedavg", clip_norm=1.0, noise_multiplier=1e-9, seed=0)
    cs = [_c("big", [300.0, 400.0]), _c("small", [0.3, 0.4]), _c("neg", [0.0, -50.0])]
    out = dp.aggregate(_zero(2), cs)
    expected = (np.array([0.6, 0.8]) + np.array([0.3, 0.4]) + np.array([0.0, -1.0])) / 3
    np.testing.assert_allclose(out.params["w"], expected, atol=1e-6)
    assert out.metrics["clipped"] == 2.0 and out.weights == {"big": 1.0, "small": 1.0, "neg": 1.0}


def test_dp_noise_scale_is_sigma_c_over_denominator_and_seeded() -> None:
    options = {"clip_norm": 2.0, "noise_multiplier": 1.5, "expected_devices": 4, "seed": 7}
    cs = [_c(str(i), np.zeros(20_000)) for i in range(3)]
    first = create_aggregator("dp_fedavg", **options).aggregate(_zero(20_000), cs).params["w"]
    again = create_aggregator("dp_fedavg", **options).aggregate(_zero(20_000), cs).params["w"]
    np.testing.assert_array_equal(first, again)
    assert abs(float(np.std(first)) - 1.5 * 2.0 / 4) < 0.02 * 0.75 and abs(float(np.mean(first))) < 0.02


def test_gaussian_rdp_epsilon_by_hand() -> None:
    acc = RdpAccountant()
    acc.step(noise_multiplier=1.0)
    # ε = min_α α/(2σ²) + log(1/δ)/(α-1); at δ = 1e-5 the best integer order is α = 6
    assert acc.epsilon(1e-5) == pytest.approx(6 / 2 + math.log(1e5) / 5)
    assert acc.rounds == 1 and RdpAccountant().epsilon(1e-5) == 0.0


def test_sampled_gaussian_rdp_matches_numerical_integration() -> None:
    q, sigma, alpha = 0.05, 1.2, 8
    z = np.linspace(-40.0, 40.0, 400_001)
    mu0 = np.exp(-z ** 2 / (2 * sigma ** 2))
    mu1 = np.exp(-(z - 1.0) ** 2 / (2 * sigma ** 2))
    mix = (1 - q) * mu0 + q * mu1
    integral = np.trapezoid(mu0 * (mix / mu0) ** alpha, z) / np.trapezoid(mu0, z)
    assert sampled_gaussian_rdp(q, sigma, alpha) == pytest.approx(math.log(integral) / (alpha - 1), rel=1e-6)
    assert sampled_gaussian_rdp(1.0, sigma, alpha) == pytest.approx(alpha / (2 * sigma ** 2))


def test_dp_epsilon_falls_with_noise_rises_with_rounds_and_sampling() -> None:
    def eps(sigma: float, rounds: int, q: float = 1.0) -> float:
        acc = RdpAccountant()
        acc.step(sigma, q, rounds)
        return acc.epsilon(1e-5)

    assert eps(0.8, 10) > eps(1.0, 10) > eps(2.0, 10) > eps(4.0, 10)
    assert eps(1.0, 1) < eps(1.0, 10) < eps(1.0, 100)
    assert eps(1.0, 100, q=0.01) < eps(1.0, 100, q=0.1) < eps(1.0, 100)
    dp = create_aggregator("dp_fedavg", noise_multiplier=1.0, seed=0)
    reported = [dp.aggregate(_zero(), [_c("a", [1.0])]).metrics["epsilon"] for _ in range(3)]
    assert reported == pytest.approx([eps(1.0, 1), eps(1.0, 2), eps(1.0, 3)])
    with pytest.raises(AggregationError, match="sampling rate 0"):
        sampled_gaussian_rdp(0.0, 1.0, 2)
    with pytest.raises(AggregationError, match="delta 2"):
        RdpAccountant().epsilon(2.0)
    assert isinstance(dp.config, DPConfig)


# --- in a server round --------------------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ServerState]:
    """Handler state over a fresh registry and blob store."""
    reg = Registry(tmp_path / "reg.sqlite3")
    yield ServerState(reg, BlobStore(tmp_path / "blobs"), UpdateBroker(reg.latest_version()), Limits())
    reg.close()


def test_round_runner_uses_the_configured_aggregator(state: ServerState) -> None:
    bundle_id = handlers.publish_bundle(state, make_bundle_files()).bundle_id
    for i, value in enumerate([1.0, 2.0, 3.0, 4.0, 100.0]):
        handlers.register_device(state, f"dev-{i}", {}, "onnx")
        updates.submit_update(state, f"dev-{i}", bundle_id, 0, 1 + 1000 * (value == 100.0),
                              {"bn1.weight": np.full(4, value, np.float32)})
    runner = RoundRunner(state, aggregator=create_aggregator("median"))
    record = runner.wait(runner.start("fedavg").round_id, timeout=10.0)
    runner.shutdown()
    assert record.state == "done" and record.metrics["submissions"] == 5
    np.testing.assert_allclose(updates.current_params(state, bundle_id)[0]["bn1.weight"], np.full(4, 3.0))
