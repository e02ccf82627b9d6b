"""PageHinkley: detection delay, false alarms, reset, update_many and its River contract."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from device_agents.drift import PageHinkley


def _shifted(seed: int, n: int = 600, shift_at: int = 300, low: float = 0.2, high: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(low, 0.05, shift_at), rng.normal(high, 0.05, n - shift_at)])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_detects_mean_increase_with_small_delay(seed: int) -> None:
    detections = PageHinkley(threshold=5.0, mode="up").update_many(_shifted(seed))
    assert detections, "no drift found"
    assert 300 <= detections[0] <= 330
    assert len(detections) == 1


@pytest.mark.parametrize("seed", range(10))
def test_no_false_alarm_on_stationary_stream(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    assert PageHinkley(threshold=5.0).update_many(rng.normal(0.3, 0.05, 3000)) == []


def test_mode_down_detects_decrease_and_up_ignores_it() -> None:
    stream = _shifted(5, low=0.5, high=0.2)
    down = PageHinkley(threshold=5.0, mode="down").update_many(stream)
    assert down and 300 <= down[0] <= 330
    assert PageHinkley(threshold=5.0, mode="up").update_many(stream) == []
    both = PageHinkley(threshold=5.0, mode="both").update_many(stream)
    assert both[:1] == down[:1]


def test_update_many_matches_per_sample_updates() -> None:
    stream = np.concatenate([_shifted(7), _shifted(8, low=0.5, high=0.1)])
    ph = PageHinkley(threshold=3.0, min_instances=10)
    singles = [i for i, v in enumerate(stream) if ph.update(v).drift_detected]
    assert len(singles) >= 2
    assert PageHinkley(threshold=3.0, min_instances=10).update_many(stream) == singles


def test_state_resets_after_drift() -> None:
    ph = PageHinkley(threshold=5.0, mode="up")
    stream = _shifted(9)
    first = ph.update_many(stream)[0]
    assert ph.n_seen == len(stream) - first - 1
    fresh = PageHinkley(threshold=5.0, mode="up")
    fresh.update_many(stream[first + 1 :])
    assert fresh.statistic == pytest.approx(ph.statistic)


def test_min_instances_blocks_early_alarm() -> None:
    stream = np.r_[np.zeros(5), np.ones(20)]
    assert PageHinkley(threshold=1.0, min_instances=30, mode="up").update_many(stream) == []
    assert PageHinkley(threshold=1.0, min_instances=3, mode="up").update_many(stream) != []


def test_drift_detected_is_read_only_and_object_is_picklable() -> None:
    ph = PageHinkley()
    with pytest.raises(AttributeError):
        ph.drift_detected = True  # type: ignore[misc]
    ph.update_many([0.1] * 10)
    clone = pickle.loads(pickle.dumps(ph))
    assert clone.n_seen == 10 and repr(clone) == repr(ph)


@pytest.mark.parametrize(
    "kwargs",
    [{"min_instances": 0}, {"delta": -1.0}, {"threshold": 0.0}, {"alpha": 0.0}, {"alpha": 1.5}, {"mode": "x"}],
)
def test_invalid_hyperparameters_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PageHinkley(**kwargs)


def test_non_finite_value_raises() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        PageHinkley().update(float("nan"))
