"""Fleet scenarios: reproducible under a seed, with the drift, label skew, dropout and byzantine flags asked for."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from device_agents.fleet.byzantine import attack_params
from device_agents.fleet.contribution import TTAStatisticsContributor
from device_agents.fleet.engine import split
from device_agents.fleet.report import restart_summary, score_drift
from device_agents.fleet.scenarios import (
    SCENARIOS,
    Scenario,
    generate_fleet,
    get_scenario,
    participation,
    restart_draws,
    scenario_help,
)
from device_agents.fleet.streams import DeviceStream

LABELS = np.repeat(np.arange(10), 54)  # the digits test split's size, balanced
ROUNDS, BATCH = 6, 16


def fleet(name: str = "mixed", n: int = 40, seed: int = 0, **overrides: object) -> list:
    return generate_fleet(get_scenario(name).with_overrides(**overrides), n, LABELS, rounds=ROUNDS,
                          batch_size=BATCH, seed=seed)


def test_fleet_is_reproducible_under_its_seed() -> None:
    a, b, c = fleet(seed=3), fleet(seed=3), fleet(seed=4)
    assert [s.summary() for s in a] == [s.summary() for s in b]
    assert all(np.array_equal(x.pool, y.pool) for x, y in zip(a, b, strict=True))
    assert [s.summary() for s in a] != [s.summary() for s in c]
    assert np.array_equal(participation(a, ROUNDS, 3), participation(b, ROUNDS, 3))


def test_drift_points_follow_each_kind() -> None:
    for kind in ("abrupt", "gradual", "recurring"):
        for spec in fleet(kind, n=20):
            length = spec.samples(ROUNDS, BATCH)
            points = spec.drift_points
            assert spec.drift_kind == kind
            assert len(points) == len(spec.schedule) - 1 >= 1
            assert points == sorted(points) and all(0 < p < length for p in points)
            domains = [s.domain for s in spec.schedule]
            assert all(x != y for x, y in itertools.pairwise(domains))
            if kind == "recurring":
                assert len(set(domains)) == 2 and domains[0] == domains[2]
            assert all((s.ramp > 0) == (kind == "gradual") for s in spec.schedule[1:])
    assert all(s.drift_points == [] and s.drift_kind == "none" for s in fleet("stationary"))


def test_stream_positions_match_the_schedule() -> None:
    from edgeloop.data import load_dataset

    test = load_dataset("digits", "test")
    spec = next(s for s in fleet("gradual", n=10) if s.batches_per_round >= 2)
    stream = DeviceStream(spec, test.x, test.y, ROUNDS, BATCH)
    assert len(stream) == spec.samples(ROUNDS, BATCH)
    span = spec.schedule[1]
    before, during, after = (stream.domain[: span.start], stream.domain[span.start : span.start + span.ramp],
                             stream.domain[span.start + span.ramp : spec.schedule[2].start])
    assert np.all(before == 0) and np.all(after == 1)
    assert 0 < np.mean(during == 1) < 1  # a blend of the old and the new domain
    assert set(stream.index.tolist()) <= set(spec.pool.tolist())
    x1, y1 = stream.images(*stream.round_bounds(2))
    x2, y2 = stream.images(*stream.round_bounds(2))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)  # the same pixels every time
    assert np.array_equal(y1, test.y[stream.index[slice(*stream.round_bounds(2))]])
    batches = stream.round_batches(2)
    assert [b[0] for b in batches] == list(range(stream.round_bounds(2)[0], stream.round_bounds(2)[1], BATCH))


def test_dirichlet_label_skew_and_its_concentration() -> None:
    def top_share(specs: list) -> float:
        return float(np.mean([np.bincount(LABELS[s.pool], minlength=10).max() / s.pool.size for s in specs]))

    skewed, iid = fleet(n=50, dirichlet_alpha=0.1), fleet(n=50, dirichlet_alpha=100.0)
    assert top_share(skewed) > 0.5 > 0.25 > top_share(iid)
    assert all(s.pool.size >= 4 for s in fleet(n=1000))  # tiled labels: every device holds samples


def test_dropout_and_byzantine_fractions() -> None:
    specs = fleet("stragglers", n=200)
    assert all(0 <= s.dropout <= 0.6 for s in specs)
    online = participation(specs, 50, seed=0)
    expected = 1 - np.mean([s.dropout for s in specs])
    assert abs(online.mean() - expected) < 0.03
    assert online.shape == (200, 50)
    assert all(1 <= s.batches_per_round <= 6 for s in specs)
    assert sum(s.late for s in specs) == 60 and not any(s.late for s in fleet("mixed"))
    labelled = fleet("labelled", n=50)
    assert sum(s.labelled for s in labelled) == 15
    byz = fleet("byzantine", n=50)
    flagged = [s for s in byz if s.byzantine is not None]
    assert len(flagged) == 10 and {s.byzantine for s in flagged} <= {"sign_flip", "scaled", "random"}
    only = fleet("byzantine", n=50, attack="scaled", byzantine=0.5)
    assert sum(s.byzantine == "scaled" for s in only) == 25
    assert all(s.byzantine is None for s in fleet("mixed"))



def test_restart_draws_are_reproducible_and_independent_of_participation() -> None:
    specs = fleet("reboots", n=200)
    assert get_scenario("reboots").restarts == 0.25
    draws = restart_draws(specs, 50, 0.25, seed=0)
    assert draws.shape == (200, 50) and abs(draws.mean() - 0.25) < 0.02
    np.testing.assert_array_equal(draws, restart_draws(specs, 50, 0.25, seed=0))
    assert not np.array_equal(draws, restart_draws(specs, 50, 0.25, seed=1))
    online = participation(specs, 50, seed=0)
    assert abs(np.corrcoef(draws.ravel(), online.ravel())[0, 1]) < 0.05
    assert not restart_draws(specs, 5, 0.0).any() and restart_draws(specs, 5, 1.0).all()
    with pytest.raises(ValueError, match=r"restarts must be a fraction in \[0, 1\], got 1.5"):
        restart_draws(specs, 5, 1.5)


@pytest.mark.parametrize(("changes", "message"), [
    ({"byzantine": 1.5}, "byzantine must be a fraction in [0, 1]"),
    ({"dropout_max": -0.1}, "dropout_max must be a fraction in [0, 1]"),
    ({"dropout_max": 1.0}, "dropout must be below 1"),
    ({"drift_mix": (("sideways", 1.0),)}, "unknown drift kinds ['sideways']"),
    ({"dirichlet_alpha": 0.0}, "dirichlet_alpha must be a positive number"),
    ({"severity": (0, 3)}, "severity range"),
    ({"speed": (0, 2)}, "speed (batches per round)"),
    ({"attack": "nice"}, "unknown byzantine attack 'nice'"),
    ({"restarts": 2.0}, "restarts must be a fraction in [0, 1]"),
])
def test_bad_scenarios_are_named(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        get_scenario("mixed").with_overrides(**changes)
    assert message in str(info.value)


def test_unknowns_and_sizes() -> None:
    with pytest.raises(ValueError, match="unknown scenario 'nope'; known: mixed"):
        get_scenario("nope")
    with pytest.raises(ValueError, match="unknown corruptions"):
        generate_fleet(Scenario("x", "x", corruptions=("warp",)), 4, LABELS, rounds=2, batch_size=4)
    with pytest.raises(ValueError, match="devices must be a positive integer"):
        generate_fleet(get_scenario("mixed"), 0, LABELS, rounds=2, batch_size=4)
    assert all(name in scenario_help() for name in SCENARIOS)
    groups = split(list(range(10)), 4)
    assert sorted(len(g) for g in groups) == [2, 2, 3, 3] and [x for g in groups for x in g] == list(range(10))
    assert [len(g) for g in split(list(range(3)), 8)] == [1, 1, 1]


def test_drift_scoring_against_known_points() -> None:
    score = score_drift([100, 300], [20, 130, 140, 305, 390], length=400, window=150)
    assert score["delays"] == [30, 5] and score["detected_true"] == 2 and score["missed"] == 0
    assert score["false_alarms"] == 3  # 20 (before any drift), 140 (second hit), 390 (late)
    late = score_drift([100, 200], [250], length=400, window=500)
    assert late["delays"] == [50] and late["missed"] == 1  # a detection belongs to the drift it follows
    assert score_drift([], [10, 20], length=100)["false_alarms"] == 2  # a stationary stream: all false alarms


def test_byzantine_attack_applies_to_the_delta() -> None:
    base = {"bn1.mean": np.zeros(3, np.float32), "bn1.var": np.ones(3, np.float32)}
    honest = {"bn1.mean": np.array([0.1, -0.2, 0.3], np.float32), "bn1.var": np.array([1.5, 1.0, 0.5], np.float32)}
    out = attack_params(honest, base, "sign_flip", np.random.default_rng(0), scale=4.0)
    assert np.allclose(out["bn1.mean"], -4 * honest["bn1.mean"])
    assert np.allclose(out["bn1.var"][1], 1.0) and out["bn1.var"].min() > 0  # clipped, never negative


def test_statistics_contributor_reads_the_running_estimate(digits_bundle: Path) -> None:
    from device_agents.agent import Agent, AgentConfig
    from device_agents.drift import PageHinkley
    from device_agents.tta import AlphaBNConfig, create_tta_method
    from edgeloop.data import corrupt, load_dataset
    from runtime import AdaptableModel, load_bundle

    bundle = load_bundle(digits_bundle, threads=1)
    model = AdaptableModel(bundle)
    method = create_tta_method("alpha_bn", AlphaBNConfig(alpha=0.6))
    agent = Agent(model, method, PageHinkley(), None, None, None, AgentConfig("d", bundle.bundle_id))
    assert TTAStatisticsContributor().contribution(agent, 16) is None  # nothing adapted yet
    x = corrupt(load_dataset("digits", "test").x[:64], "contrast", 5, seed=0)
    for s in range(0, 64, 16):
        agent.process_batch(x[s : s + 16])
    got = TTAStatisticsContributor().contribution(agent, 64)
    assert got is not None and got.num_samples == 64
    ref, state = model.params, method.snapshot()
    layers = sorted(k[: -len(".mean")] for k in ref if k.endswith(".mean"))
    assert sorted(got.params) == sorted([f"{layer}.mean" for layer in layers] + [f"{layer}.var" for layer in layers])
    for layer in layers:
        ema, sq = state[f"{layer}.ema_mean"], state[f"{layer}.ema_sq"]
        assert np.allclose(got.params[f"{layer}.mean"], 0.4 * ref[f"{layer}.mean"] + 0.6 * ema, atol=1e-6)
        assert np.allclose(got.params[f"{layer}.var"], 0.4 * ref[f"{layer}.var"] + 0.6 * (sq - ema**2), atol=1e-5)
        assert not np.allclose(got.params[f"{layer}.mean"], ref[f"{layer}.mean"])  # contrast moved the statistics
    assert TTAStatisticsContributor().contribution(agent, 0) is None


def test_a_failed_boot_and_its_retry_are_one_power_loss() -> None:
    held = {"round": 1, "version": 2, "active_version": 2, "outbox_pending": 5, "drift_reports": 1,
            "rollback_reports": 0}
    restored = {"restored_version": 2, "restored_active_version": 2, "restored_tta": False, "restored_detector": True,
                "restored_selector": True, "restored_outbox_pending": 5, "restored_drift_reports": 1,
                "restored_rollback_reports": 0}
    rows = [{**held, "booted": False}, {**held, "round": 2, "retry": True, "booted": True, **restored},
            {"round": 0, "version": 0, "active_version": 0, "outbox_pending": 3, "booted": True,
             **restored, "restored_version": None, "restored_active_version": None, "restored_outbox_pending": 3}]
    summary = restart_summary(rows)
    # the v0 boot restored no parameters (none saved yet) and holds v0 as before: resumed
    assert (summary["count"], summary["booted"], summary["failed_boots"], summary["resumed"]) == (2, 2, 1, 2)
    assert summary["outbox_samples"] == {"before": 8, "after": 8}  # the failed boot's samples counted once
    assert summary["detector_restored"] == 2 and summary["not_resumed"] == []
