"""EntropyBandSelector: the entropy band, the dynamic upper bound, the byte budget, the drift boost, counters."""

from __future__ import annotations

import numpy as np
import pytest

from device_agents.selection import EntropyBandSelector, SelectorConfig


class FakeClock:
    """A settable clock in seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_band_excludes_confident_and_uncertain() -> None:
    sel = EntropyBandSelector(SelectorConfig(low=0.1, high=0.5, bytes_per_window=None))
    ent = np.array([0.05, 0.2, 0.6, 0.3, 0.09, 0.5])
    assert sel.select(ent, 10).tolist() == [1, 3, 5]
    c = sel.counters
    assert (c.considered, c.selected, c.too_confident, c.too_uncertain, c.over_budget) == (6, 3, 2, 1, 0)
    assert c.bytes_selected == 30


def test_dynamic_high_tightens_as_entropy_drops_and_relaxes_after_shift() -> None:
    cfg = SelectorConfig(low=0.02, high=0.4, min_band=0.05, high_scale=2.0, mean_momentum=0.5,
                         bytes_per_window=None)
    sel = EntropyBandSelector(cfg)
    assert sel.high == 0.4
    sel.select(np.full(8, 0.1), 1)
    assert sel.high == pytest.approx(0.2)
    sel.select(np.full(8, 0.02), 1)  # m = 0.5*0.1 + 0.5*0.02 = 0.06
    assert sel.high == pytest.approx(0.12)
    for _ in range(10):
        sel.select(np.full(8, 0.0), 1)
    assert sel.high == pytest.approx(cfg.low + cfg.min_band)
    assert sel.select(np.array([0.06, 0.08]), 1).tolist() == [0]
    for _ in range(10):
        sel.select(np.full(8, 0.5), 1)
    assert sel.high == pytest.approx(0.4)


def test_byte_budget_token_bucket_refills_with_clock() -> None:
    clock = FakeClock()
    cfg = SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=1000, window_seconds=10.0)
    sel = EntropyBandSelector(cfg, clock=clock)
    ent = np.full(15, 0.3)
    assert sel.select(ent, 100).tolist() == list(range(10))
    assert sel.counters.over_budget == 5
    clock.now = 2.5  # refills 250 bytes
    assert sel.select(ent[:5], 100).tolist() == [0, 1]
    clock.now = 1000.0  # capped at the window
    assert sel.tokens == pytest.approx(1000)
    assert len(sel.select(ent, 100)) == 10
    c = sel.counters
    assert c.considered == 35 and c.selected == 22 and c.over_budget == 13 and c.bytes_selected == 2200


def test_per_sample_sizes_skip_large_but_keep_small() -> None:
    cfg = SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=100, window_seconds=1.0)
    sel = EntropyBandSelector(cfg, clock=FakeClock())
    assert sel.select(np.full(3, 0.5), np.array([60, 50, 40])).tolist() == [0, 2]


def test_counters_partition_considered() -> None:
    rng = np.random.default_rng(0)
    clock = FakeClock()
    sel = EntropyBandSelector(SelectorConfig(bytes_per_window=5000, window_seconds=1.0), clock=clock)
    for step in range(20):
        clock.now = step * 0.1
        sel.select(rng.uniform(0, 1, 32), 300)
    c = sel.counters
    assert c.considered == 640
    assert c.selected + c.too_confident + c.too_uncertain + c.over_budget == c.considered
    assert c.over_budget > 0 and c.selected > 0


def test_drift_boost_tops_up_raises_capacity_and_expires() -> None:
    clock = FakeClock()
    cfg = SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=1000, window_seconds=10.0,
                         drift_boost=3.0, drift_boost_seconds=5.0)
    sel = EntropyBandSelector(cfg, clock=clock)
    ent = np.full(50, 0.3)
    assert len(sel.select(ent, 100)) == 10 and sel.tokens == 0
    sel.on_drift()
    assert sel.boosted and sel.tokens == pytest.approx(2000)  # (3 - 1) windows at once
    assert len(sel.select(ent, 100)) == 20
    clock.now = 2.0  # boosted refill: 3 × 100 bytes/s
    assert sel.tokens == pytest.approx(600)
    clock.now = 4.0
    assert len(sel.select(ent, 100)) == 12
    clock.now = 100.0  # boost over: capacity back to one window
    assert not sel.boosted and sel.tokens == pytest.approx(1000)
    c = sel.counters
    assert c.drift_boosts == 1 and c.selected == 42 and c.bytes_selected == 4200


def test_drift_boost_spans_expiry_with_both_rates() -> None:
    clock = FakeClock()
    cfg = SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=1000, window_seconds=10.0,
                         drift_boost=2.0, drift_boost_seconds=4.0)
    sel = EntropyBandSelector(cfg, clock=clock)
    sel.select(np.full(10, 0.3), 100)  # empty the bucket
    sel.on_drift()
    sel.select(np.full(10, 0.3), 100)  # spend the 1000-byte top-up
    assert sel.tokens == 0
    clock.now = 6.0  # 4 s boosted at 200 B/s, then 2 s at 100 B/s
    assert sel.tokens == pytest.approx(1000)
    sel.select(np.full(10, 0.3), 100)
    clock.now = 1.0  # a clock that steps back refills nothing
    assert sel.tokens == 0


def test_drift_reanchors_the_upper_bound() -> None:
    cfg = SelectorConfig(low=0.02, high=0.4, min_band=0.05, high_scale=2.0, mean_momentum=0.5,
                         bytes_per_window=None)
    sel = EntropyBandSelector(cfg)
    for _ in range(5):
        sel.select(np.full(8, 0.05), 1)
    assert sel.high == pytest.approx(0.1)
    assert sel.select(np.array([0.3]), 1).size == 0  # unreliable for the adapted model
    sel.on_drift()
    assert sel.high == 0.4 and sel.running_mean_entropy is None
    assert sel.select(np.array([0.3]), 1).tolist() == [0]
    kept = EntropyBandSelector(SelectorConfig(reanchor_on_drift=False, mean_momentum=0.5, bytes_per_window=None))
    kept.select(np.full(8, 0.05), 1)
    kept.on_drift()
    assert kept.high == pytest.approx(0.1)


def test_boost_without_budget_only_counts() -> None:
    sel = EntropyBandSelector(SelectorConfig(bytes_per_window=None))
    sel.on_drift()
    assert not sel.boosted and sel.counters.drift_boosts == 1 and sel.tokens == float("inf")


@pytest.mark.parametrize(
    "kwargs",
    [{"low": 0.5, "high": 0.4}, {"high": 1.5}, {"min_band": 0.9}, {"high_scale": 0.0},
     {"mean_momentum": 1.0}, {"bytes_per_window": 0}, {"window_seconds": 0.0}, {"drift_boost": 0.5},
     {"drift_boost": float("inf")}, {"drift_boost_seconds": -1.0}],
)
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SelectorConfig(**kwargs)


def test_rejects_non_finite_entropy() -> None:
    with pytest.raises(ValueError, match="finite"):
        EntropyBandSelector().select(np.array([0.1, np.nan]), 1)


def _selector(capacity: int = 1000, wall: float = 1000.0) -> tuple[EntropyBandSelector, FakeClock, FakeClock]:
    clock, wall_clock = FakeClock(), FakeClock()
    wall_clock.now = wall
    cfg = SelectorConfig(low=0.1, high=0.5, bytes_per_window=capacity, window_seconds=60.0)
    return EntropyBandSelector(cfg, clock=clock, wall_clock=wall_clock), clock, wall_clock


def test_a_restored_budget_is_not_full_again_and_refills_for_the_time_between() -> None:
    sel, _, _ = _selector()
    sel.select(np.full(8, 0.3), 100)  # 800 of 1000 bytes spent
    saved = sel.snapshot()
    assert float(saved["tokens"]) == 800.0 - 600.0 and float(saved["mean_entropy"]) == pytest.approx(0.3)

    fresh, _, _ = _selector(wall=1030.0)  # 30 s of wall time later, on a new monotonic clock
    assert fresh.tokens == 1000.0  # a fresh selector starts full
    fresh.restore(saved)
    assert fresh.tokens == pytest.approx(200.0 + 30.0 * 1000 / 60)
    assert fresh.running_mean_entropy == pytest.approx(0.3) and fresh.high == pytest.approx(0.5)
    back, _, _ = _selector(wall=900.0)  # a wall clock that stepped back refills nothing
    back.restore(saved)
    assert back.tokens == pytest.approx(200.0)
    small, _, _ = _selector(capacity=100, wall=1000.0)  # a smaller budget now: clipped to it
    small.restore(saved)
    assert small.tokens == 100.0


def test_a_drift_boost_carries_over_a_restart() -> None:
    sel, clock, _ = _selector()
    sel.on_drift()  # +1000 tokens, boosted capacity 2000 for 60 s
    clock.now = 20.0
    saved = sel.snapshot()
    assert float(saved["boost_left_seconds"]) == pytest.approx(40.0)
    fresh, clock2, _ = _selector(wall=1010.0)
    fresh.restore(saved)
    assert fresh.boosted and fresh.tokens == 2000.0
    clock2.now = 31.0  # the boost ends 40 s after the snapshot, 30 s after the restore
    assert not fresh.boosted and fresh.tokens == 1000.0


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens": None}, "must hold exactly"),
    ({"tokens": np.zeros(2)}, "'tokens' must be a float scalar"),
    ({"tokens": np.float64(-1.0)}, "'tokens' must be a finite number >= 0"),
    ({"wall_time": np.float64(np.inf)}, "'wall_time' must be a finite number >= 0"),
    ({"mean_entropy": np.float64(1.5)}, "'mean_entropy' must lie in [0, 1]"),
    ({"boost_left_seconds": np.int64(3)}, "must be a float scalar"),
])
def test_a_bad_selector_state_is_refused_and_changes_nothing(change: dict, message: str) -> None:
    sel, _, _ = _selector()
    sel.select(np.full(4, 0.3), 100)
    state = {**sel.snapshot(), **change}
    state = {k: v for k, v in state.items() if v is not None}
    before = sel.snapshot()
    with pytest.raises(ValueError) as info:
        sel.restore(state)
    assert message in str(info.value)
    after = sel.snapshot()
    assert {k: float(v) for k, v in after.items()} == {k: float(v) for k, v in before.items()}


def test_charge_takes_bytes_from_the_budget_and_never_below_zero() -> None:
    sel, _, _ = _selector()
    sel.charge(300)
    assert sel.tokens == 700.0
    sel.charge(5000)
    assert sel.tokens == 0.0
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        sel.charge(-1)
