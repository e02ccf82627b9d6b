"""Every drift detector: the shared contract battery, update_many ≡ update, and each algorithm's own checks."""

from __future__ import annotations

import doctest
import importlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agents import drift
from device_agents.drift import (
    ADWIN,
    KSWIN,
    FeatureDetector,
    MahalanobisDrift,
    MMDDrift,
    PageHinkley,
    ScalarDetector,
    create_detector,
    gumbel_threshold,
    ks_critical_count,
    ks_tail_probability,
)

MODULES = ["base", "page_hinkley", "adwin", "kswin", "windowed", "mmd", "mahalanobis", "signals"]


def _reference(seed: int = 0, n: int = 400, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, dim))


def _make(name: str) -> drift.DriftDetector:
    """A small, fast instance of every registered detector."""
    if name == "mmd":
        return MMDDrift(_reference(), window_size=16, ert=5000, n_features=32, n_runs=20, run_length=300)
    if name == "mahalanobis":
        return MahalanobisDrift(np.array([[0.0] * 4, [-3.0] * 4]), np.eye(4), window_size=16, ert=5000,
                                reference_size=300, n_runs=40, run_length=300)
    return create_detector(name)


ALL = sorted({**drift.SCALAR_DETECTORS, **drift.FEATURE_DETECTORS})


def _stream(name: str, seed: int, n: int = 1500, shift: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n // 2,) if name in drift.SCALAR_DETECTORS else (n // 2, 4)
    return np.concatenate([rng.normal(0.0, 1.0, shape), rng.normal(shift, 1.0, shape)])


# -- the contract battery --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_contract_detects_shift_and_resets(name: str) -> None:
    det = _make(name)
    stream = _stream(name, 1)
    found = det.update_many(stream)
    assert found and 750 <= found[0] <= 1000, found
    assert det.update(stream[-1]) is det
    assert not det.drift_detected or det.n_seen == 1  # the update after a drift starts afresh
    with pytest.raises(AttributeError):
        det.drift_detected = True  # type: ignore[misc]
    assert math.isfinite(det.statistic) and math.isfinite(det.threshold)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("cut", [0, 1, 250, 299, 300, 301, 760, 1400])
def test_a_restored_snapshot_detects_exactly_where_the_original_does(name: str, cut: int) -> None:
    """What a restarted device relies on: a fresh detector given the snapshot signals drift at the same positions
    (both update paths) as the detector that never stopped, wherever the stream was cut (before, during and
    after a learnt reference, before and after the shift, after a drift)."""
    stream = _stream(name, 5)
    original = _make(name)
    original.update_many(stream[:cut])
    state = original.snapshot()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    twin, single = _make(name), _make(name)
    twin.restore(state)
    single.restore(state)
    assert twin.n_seen == original.n_seen and twin.statistic == original.statistic
    want = original.update_many(stream[cut:])
    assert twin.update_many(stream[cut:]) == want
    assert [i for i, x in enumerate(stream[cut:]) if single.update(x).drift_detected] == want
    uncut = _make(name).update_many(stream)  # and where one that saw the whole stream in one call does
    assert [p - cut for p in uncut if p >= cut] == want


@pytest.mark.parametrize("name", ALL)
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(name: str) -> None:
    det = _make(name)
    det.update_many(_stream(name, 6)[:400])
    good = det.snapshot()
    before = pickle.dumps(det)
    key = next(k for k, v in good.items() if v.dtype.kind == "f" and v.size and k != "statistic")
    broken = {**good, key: np.full_like(good[key], np.nan)}
    cases = [({k: v for k, v in good.items() if k != "n"}, "a saved state holds"),
             (broken, f"{key!r}"),
             ({**good, "n": np.asarray(-1)}, "'n' must be >= 0"),
             ({**good, "drift_detected": np.asarray(2.0)}, "'drift_detected' must be a bool scalar")]
    for bad, message in cases:
        with pytest.raises(ValueError) as info:
            det.restore(bad)
        assert message in str(info.value) and type(det).__name__ in str(info.value)
        assert pickle.dumps(det) == before
    other = next(n for n in ALL if n != name)
    with pytest.raises(ValueError, match=r"a saved state holds|does not fit"):
        _make(other).restore(good)


def test_structural_states_that_do_not_fit_are_named() -> None:
    adwin = ADWIN()
    adwin.update_many(_stream("adwin", 7)[:100])
    state = adwin.snapshot()
    ends = state["bucket_end"].copy()
    ends[0] += 1
    with pytest.raises(ValueError, match=r"level .* holds buckets ending at"):
        ADWIN().restore({**state, "bucket_end": ends})
    with pytest.raises(ValueError, match="does not partition"):
        ADWIN().restore({**state, "level_sizes": state["level_sizes"] + 1})
    kswin = KSWIN()
    kswin.update_many(_stream("kswin", 7)[:100])
    state = kswin.snapshot()
    with pytest.raises(ValueError, match="'window' holds 99 values, after 100 values it holds 100"):
        KSWIN().restore({**state, "window": state["window"][1:]})
    learner = _make("mahalanobis")  # learns its reference from the first 300 rows
    learner.update_many(_stream("mahalanobis", 7)[:320])
    state = learner.snapshot()
    assert state["reference"].shape == (300, 4)
    with pytest.raises(ValueError, match="'reference' holds 299 rows, a learnt reference 300"):
        _make("mahalanobis").restore({**state, "reference": state["reference"][1:]})
    with pytest.raises(ValueError, match="'ring' must have shape"):
        _make("mahalanobis").restore({**state, "ring": state["ring"][1:]})


@pytest.mark.parametrize("name", ALL)
def test_contract_pickle_repr_and_reset(name: str) -> None:
    det = _make(name)
    det.update_many(_stream(name, 2)[:300])
    clone = pickle.loads(pickle.dumps(det))
    assert repr(clone) == repr(det) and clone.n_seen == det.n_seen == 300
    tail = _stream(name, 2)[300:]
    assert clone.update_many(tail) == det.update_many(tail)
    det.reset()
    assert det.n_seen == 0 and not det.drift_detected


@pytest.mark.parametrize("name", ALL)
def test_contract_non_finite_input_raises_and_leaves_state(name: str) -> None:
    det = _make(name)
    stream = _stream(name, 3)[:200]
    det.update_many(stream)
    before = pickle.dumps(det)
    bad = stream[:10].copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        det.update_many(bad)
    with pytest.raises(ValueError, match="non-finite"):
        det.update(bad[4])
    assert pickle.dumps(det) == before


@pytest.mark.parametrize("name", ALL)
def test_update_many_equals_per_sample_updates(name: str) -> None:
    stream = np.concatenate([_stream(name, 4), _stream(name, 5, shift=-1.5)])
    single = _make(name)
    positions = [i for i, x in enumerate(stream) if single.update(x).drift_detected]
    batched = _make(name)
    chunked: list[int] = []
    for start in range(0, len(stream), 257):  # chunks that straddle drifts and checks
        chunked += [start + i for i in batched.update_many(stream[start : start + 257])]
    assert len(positions) >= (1 if name == "mahalanobis" else 2)  # a score above the source's: one-sided
    assert chunked == positions
    assert batched.statistic == single.statistic and batched.n_seen == single.n_seen


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), clock=st.integers(1, 40), buckets=st.integers(2, 6), cuts=st.lists(
    st.integers(0, 3000), max_size=4))
def test_adwin_update_many_is_bit_identical(seed: int, clock: int, buckets: int, cuts: list[int]) -> None:
    rng = np.random.default_rng(seed)
    stream = np.concatenate([rng.normal(0, 1, 1000), rng.normal(rng.uniform(-2, 2), rng.uniform(0.1, 3), 2000)])
    kwargs = {"clock": clock, "max_buckets": buckets, "grace_period": int(rng.integers(0, 40))}
    a, b = ADWIN(**kwargs), ADWIN(**kwargs)
    single = [i for i, x in enumerate(stream) if a.update(x).drift_detected]
    many, prev = [], 0
    for cut in [*sorted(cuts), len(stream)]:
        many += [prev + i for i in b.update_many(stream[prev:cut])]
        prev = max(prev, cut)
    assert many == single
    assert a._levels == b._levels and a.statistic == b.statistic


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), window=st.integers(4, 80), alpha=st.floats(1e-6, 0.05), chunk=st.integers(1, 500))
def test_kswin_and_page_hinkley_update_many_are_identical(seed: int, window: int, alpha: float, chunk: int) -> None:
    rng = np.random.default_rng(seed)
    stream = np.concatenate([rng.normal(0, 1, 800), rng.normal(rng.uniform(-2, 2), 1, 800)])
    for make in (lambda: KSWIN(alpha, window, max(1, window // 3), seed=seed),
                 lambda: PageHinkley(threshold=float(rng.uniform(1, 20)), alpha=float(rng.uniform(0.99, 1.0)))):
        a, b = make(), make()
        if isinstance(a, PageHinkley):
            b = pickle.loads(pickle.dumps(a))
        single = [i for i, x in enumerate(stream) if a.update(x).drift_detected]
        many = [s + i for s in range(0, len(stream), chunk) for i in b.update_many(stream[s : s + chunk])]
        assert many == single and a.statistic == b.statistic


# -- ADWIN -----------------------------------------------------------------------------------------------------
def test_adwin_histogram_is_logarithmic_and_exact() -> None:
    det = ADWIN(max_buckets=5)
    stream = np.random.default_rng(0).normal(0, 1, 20_000)
    assert det.update_many(stream) == []
    assert det.width == 20_000
    assert det.n_buckets <= 5 * (int(math.log2(20_000)) + 1)
    sizes = [(end, i) for i, level in enumerate(det._levels) for end, _, _ in level]
    assert sum(2**i for _, i in sizes) == 20_000  # buckets of 2^i cover the window exactly
    assert all(len(level) <= 5 for level in det._levels)
    assert det.estimation == pytest.approx(stream.mean(), abs=1e-9)


def test_adwin_detects_variance_free_mean_shift_and_fewer_with_small_delta() -> None:
    stream = np.r_[np.zeros(1000), np.ones(1000)] * 0.5
    assert 1000 <= ADWIN().update_many(stream)[0] <= 1040
    noisy = np.random.default_rng(1).normal(0, 1, 50_000)
    assert len(ADWIN(delta=1e-5).update_many(noisy)) <= len(ADWIN(delta=0.5).update_many(noisy))


# -- KSWIN -----------------------------------------------------------------------------------------------------
def test_ks_tail_probability_matches_exact_values() -> None:
    # scipy.stats.ks_2samp(..., method="exact") for two samples of 30
    assert ks_tail_probability(16, 30) == pytest.approx(0.0002933405491362055, rel=1e-12)
    assert ks_tail_probability(8, 30) == pytest.approx(0.23907300248018645, rel=1e-12)
    assert ks_tail_probability(0, 30) == 1.0
    assert ks_critical_count(0.005, 30) == 14
    assert ks_critical_count(1e-30, 30) == 31  # unreachable: never alarms


# -- windowed feature detectors ----------------------------------------------------------------------------------
def test_gumbel_threshold_recovers_exponential_tail() -> None:
    rng = np.random.default_rng(0)
    maxima = rng.exponential(1.0, (4000, 200)).max(axis=1)  # max of 200 Exp(1): Gumbel(ln 200, 1)
    h = gumbel_threshold(maxima, run_length=200, ert=200 * 1000)
    assert h == pytest.approx(math.log(200 * 1000), abs=0.15)  # P(Exp(1) > h) = 1/ERT


def test_mmd_false_alarms_follow_the_expected_run_time() -> None:
    ref = _reference(1, 1000, 4)
    det = MMDDrift(ref, window_size=16, ert=2000, n_features=64, n_runs=60, run_length=1000)
    alarms = det.update_many(np.random.default_rng(9).normal(0, 1, (40_000, 4)))
    assert 2 <= len(alarms) <= 60  # ERT 2000 over 40,000 updates: about 20
    assert MMDDrift(ref, window_size=16, ert=1e7, n_features=64, n_runs=60,
                    run_length=1000).threshold > det.threshold


def test_mmd_learns_reference_from_stream_after_each_reset() -> None:
    det = MMDDrift(None, dim=4, window_size=16, ert=1e5, reference_size=300, n_features=32, n_runs=20,
                   run_length=300)
    assert not det.fitted
    stream = _stream("mmd", 6, 1400)
    found = det.update_many(stream)
    assert found and 700 <= found[0] <= 760
    det.reset()
    assert det.update_many(stream[: found[0] + 1]) == found[:1] and det.fitted
    det.update(np.zeros(4))
    assert not det.fitted and det.n_seen == 1


def test_mahalanobis_from_bundle_statistics(bundle_dir: Path, digits_test: tuple[np.ndarray, np.ndarray]) -> None:
    from edgeloop.data import corrupt
    from runtime.bundle import load_bundle
    from runtime.model import AdaptableModel

    bundle = load_bundle(bundle_dir)
    det = MahalanobisDrift.from_bundle(bundle, window_size=16, ert=1e5, reference_size=200, n_runs=20,
                                       run_length=300)
    x = digits_test[0][:300]
    model = AdaptableModel(bundle)
    clean = model.forward(x).features
    noisy = model.forward(corrupt(x, "gaussian_noise", 5, seed=0)).features
    assert det.update_many(clean[:250]) == []
    scores = det.scorer(np.concatenate([clean, noisy]))
    assert scores[300:].mean() > 1.5 * scores[:300].mean()


def test_feature_detectors_reject_wrong_shapes() -> None:
    det = _make("mmd")
    assert isinstance(det, FeatureDetector)
    with pytest.raises(ValueError, match="shape"):
        det.update(np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        det.update_many(np.zeros((5, 3)))


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ADWIN, {"delta": 0.0}, "delta"), (ADWIN, {"clock": 0}, "clock"), (ADWIN, {"max_buckets": 1}, "max_buckets"),
        (KSWIN, {"alpha": 1.5}, "alpha"), (KSWIN, {"window_size": 10, "stat_size": 6}, "stat_size"),
        (KSWIN, {"seed": -1}, "seed"), (PageHinkley, {"threshold": -1.0}, "threshold"),
    ],
)
def test_invalid_hyperparameters_raise(cls: type[ScalarDetector], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_invalid_feature_detector_arguments_raise() -> None:
    with pytest.raises(ValueError, match="dim is required"):
        MMDDrift(None)
    with pytest.raises(ValueError, match="ert"):
        MMDDrift(_reference(), window_size=64, ert=10)
    with pytest.raises(ValueError, match="positive definite"):
        MahalanobisDrift(np.zeros((2, 2)), np.array([[1.0, 2.0], [2.0, 1.0]]), shrinkage=0.0)
    with pytest.raises(ValueError, match="shrinkage"):
        MahalanobisDrift(np.zeros((2, 2)), np.eye(2), shrinkage=2.0)
    with pytest.raises(ValueError, match="unknown drift detector"):
        create_detector("cusum")


# -- signals ---------------------------------------------------------------------------------------------------
def test_signals_from_probabilities_and_layers() -> None:
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert drift.prediction_entropy(probs, normalized=True) == pytest.approx([1.0, 0.0], abs=1e-9)
    assert drift.max_softmax(probs).tolist() == [0.5, 1.0]
    assert drift.feature_norm(np.array([[3.0, 4.0]])).tolist() == [5.0]
    same = {"l": (np.zeros(3), np.ones(3))}
    assert drift.layer_shift(same, same) == {"l": pytest.approx(0.0)}
    assert drift.layer_shift({"l": (np.ones(3), np.ones(3))}, same)["l"] == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="no source statistics"):
        drift.layer_shift({"x": (np.zeros(1), np.ones(1))}, same)


def test_signals_from_forward(bundle_dir: Path, digits_test: tuple[np.ndarray, np.ndarray]) -> None:
    from runtime.bundle import load_bundle
    from runtime.model import AdaptableModel

    model = AdaptableModel(load_bundle(bundle_dir))
    out = model.forward(digits_test[0][:32])
    sig = drift.signals_from_forward(out, drift.source_layer_stats(model.manifest))
    assert sig.entropy.shape == sig.confidence.shape == (32,)
    assert np.all((sig.entropy >= 0) & (sig.entropy <= 1)) and set(sig.layer_shift) == {
        layer.name for layer in model.manifest.layers}


# -- doctests ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", MODULES)
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"device_agents.drift.{module}"), raise_on_error=False)
    assert result.failed == 0


# -- magnitude bound: the state stays finite -------------------------------------------------------------------
def _floats(value: object) -> list[float]:
    """Every float held by ``value`` (a detector's attributes, recursively through containers and arrays)."""
    if isinstance(value, float | np.floating):
        return [float(value)]
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.ravel().tolist()
    if isinstance(value, list | tuple):
        return [f for item in value for f in _floats(item)]
    if isinstance(value, dict):
        return [f for item in value.values() for f in _floats(item)]
    if isinstance(value, drift.DriftDetector):
        return _floats(vars(value))
    return []


def _huge(name: str, value: float) -> float | np.ndarray:
    return value if name in drift.SCALAR_DETECTORS else np.full(4, value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("value", [1e308, -1e308, 1.5e100, -1e200])
def test_huge_values_are_refused_and_leave_state(name: str, value: float) -> None:
    det, twin = _make(name), _make(name)
    stream = _stream(name, 3)
    det.update_many(stream[:400])
    twin.update_many(stream[:400])
    before = pickle.dumps(det)
    cls = type(det).__name__
    with pytest.raises(ValueError, match=rf"{cls}.*magnitude.*1e\+?100") as err:
        det.update(_huge(name, value))
    assert f"{value:g}".replace("+", "") in str(err.value).replace("+", "")
    batch = np.array(stream[400:420])
    batch[7] = _huge(name, value)
    with pytest.raises(ValueError, match=rf"{cls}.*position 7.*magnitude"):
        det.update_many(batch)
    assert pickle.dumps(det) == before
    assert det.update_many(stream[400:]) == twin.update_many(stream[400:])  # still detects, as if never fed


@pytest.mark.parametrize("name", ALL)
def test_values_at_the_bound_keep_every_state_number_finite(name: str) -> None:
    det = _make(name)
    extreme = np.resize([drift.MAX_ABS_VALUE, -drift.MAX_ABS_VALUE, drift.MAX_ABS_VALUE * 0.999], 3000)
    stream = extreme if name in drift.SCALAR_DETECTORS else np.repeat(extreme[:, None], 4, axis=1)
    det.update_many(stream)
    for x in stream[:500]:
        det.update(x)
    held = _floats(det)
    assert held and all(math.isfinite(f) for f in held)
    assert math.isfinite(det.statistic)


def test_adwin_and_page_hinkley_state_is_finite_after_alternating_extremes() -> None:
    for det in (ADWIN(), PageHinkley()):
        det.update_many(np.resize([drift.MAX_ABS_VALUE, -drift.MAX_ABS_VALUE], 20_000))
        assert all(math.isfinite(f) for f in _floats(det)), type(det).__name__
        assert math.isfinite(det.statistic)
        det.reset()
        assert det.update_many(np.r_[np.zeros(1000), np.ones(1000) * 5.0]), type(det).__name__


def test_feature_row_within_bound_that_overflows_the_state_is_refused() -> None:
    # a near-singular covariance: whitening multiplies by 1e100, so a row of 1e99 scores ~4e398 (inf)
    rng = np.random.default_rng(0)
    det = MahalanobisDrift(np.zeros((1, 4)), np.eye(4) * 1e-200, window_size=32, ert=5000,
                           reference=rng.normal(0, 1e-100, (200, 4)), n_runs=20, run_length=100)
    det.update_many(rng.normal(0, 1e-100, (150, 4)))
    before = pickle.dumps(det)
    batch = rng.normal(0, 1e-100, (20, 4))
    batch[5] = 1e99
    with pytest.raises(ValueError, match=r"MahalanobisDrift.*position 5.*non-finite"):
        det.update_many(batch)
    assert pickle.dumps(det) == before
    # huge but finite scores (~1.6e307 each): the row whose score would overflow the window sum is refused
    det.reset()
    big = np.full(4, 2e53)  # whitened to 2e153
    accepted = 0
    with pytest.raises(ValueError, match=r"MahalanobisDrift.*non-finite"):
        for _ in range(det.window_size):
            det.update(big)
            accepted += 1
    assert 5 < accepted < det.window_size and det.n_seen == accepted
    assert all(math.isfinite(f) for f in _floats(det))


def test_feature_batch_refused_after_a_drift_restores_the_state_before_the_batch() -> None:
    det = _make("mahalanobis")
    stream = _stream("mahalanobis", 1)
    det.update_many(stream[:700])
    before = pickle.dumps(det)
    batch = np.array(stream[700:1500])
    assert det.update_many(batch.copy())  # the batch holds a drift
    det = pickle.loads(before)
    batch[-1] = 1e101
    with pytest.raises(ValueError, match="magnitude"):
        det.update_many(batch)
    assert pickle.dumps(det) == before


def test_reference_that_gives_a_non_finite_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match=r"MMDDrift.*non-finite threshold"):
        MMDDrift(_reference(), window_size=16, ert=5000, n_features=32, n_runs=20, run_length=300,
                 bandwidth=1e-310)
    with pytest.raises(ValueError, match=r"reference.*magnitude"):
        MMDDrift(_reference() * 1e200, window_size=16, ert=5000, n_features=32, n_runs=20, run_length=300)


def test_page_hinkley_delta_is_bounded() -> None:
    with pytest.raises(ValueError, match="delta"):
        PageHinkley(delta=1e300)


def test_saved_states_no_stream_reaches_are_refused() -> None:
    """Crafted states that pass the shape checks but that no stream within the input bound reaches (they would
    make the restored detector signal false drifts, or refuse every later update) are refused by name."""
    ph = PageHinkley()
    ph.update_many(_stream("page_hinkley", 8)[:50])
    state = ph.snapshot()
    fresh = PageHinkley().snapshot()
    for bad, message in (({**state, "n": np.asarray(2**64 - 1, np.uint64)}, "'n' must lie within"),
                         ({**fresh, "sum": np.asarray(3.0)}, "n = 0 must be the fresh state"),
                         ({**state, "sums": np.array([1e300, -1e300])}, "sums beyond what 50 values")):
        with pytest.raises(ValueError, match=message):
            PageHinkley().restore(bad)
    adwin = ADWIN()
    adwin.update_many(_stream("adwin", 8)[:100])
    state = adwin.snapshot()
    for bad in ({**state, "sum": state["sum"] + 1.0}, {**state, "bucket_sq": -state["bucket_sq"]}):
        with pytest.raises(ValueError, match="prefix sums disagree"):
            ADWIN().restore(bad)
    kswin = KSWIN()
    kswin.update_many(_stream("kswin", 8)[:100])
    rng = kswin.snapshot()["rng"].copy()
    rng[2] -= np.uint64(1)  # an even increment: no PCG64 has one
    with pytest.raises(ValueError, match="increment must be odd"):
        KSWIN().restore({**kswin.snapshot(), "rng": rng})
    mmd = _make("mmd")
    mmd.update_many(_stream("mmd", 8)[:40])
    state = mmd.snapshot()
    with pytest.raises(ValueError, match="window sums would overflow"):
        _make("mmd").restore({**state, "cum": np.full_like(state["cum"], 1e308)})
    learner = _make("mahalanobis")
    learner.update_many(_stream("mahalanobis", 8)[:40])  # still learning its reference
    state = learner.snapshot()
    with pytest.raises(ValueError, match="'buffer' holds values of magnitude above"):
        _make("mahalanobis").restore({**state, "buffer": np.full_like(state["buffer"], 1e200)})
