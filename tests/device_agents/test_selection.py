"""EntropyBandSelector: the entropy band, the dynamic upper bound, the byte budget and the counters."""

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


@pytest.mark.parametrize(
    "kwargs",
    [{"low": 0.5, "high": 0.4}, {"high": 1.5}, {"min_band": 0.9}, {"high_scale": 0.0},
     {"mean_momentum": 1.0}, {"bytes_per_window": 0}, {"window_seconds": 0.0}],
)
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SelectorConfig(**kwargs)


def test_rejects_non_finite_entropy() -> None:
    with pytest.raises(ValueError, match="finite"):
        EntropyBandSelector().select(np.array([0.1, np.nan]), 1)
