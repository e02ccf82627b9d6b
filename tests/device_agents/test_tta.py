"""TTA methods on tiny numpy models: registry, configs, and the conformance battery over every registered method.

The battery runs each method on a tiny adaptable model (the adaptable graph's exact BN math, with source
feature statistics so FOA's fitness has a target) and, for the methods that only read outputs, on a tiny
predictor: output validity, snapshot/restore round trip, reset and on_drift, episodic mode, bad input leaving the
state unchanged, roll-back of a batch that fails half-way, determinism under a seed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from device_agents.tta import (
    FOA,
    LAME,
    T3A,
    TTA_METHODS,
    AlphaBN,
    AlphaBNConfig,
    FOAConfig,
    LAMEConfig,
    ModelCapabilityError,
    SourceModel,
    T3AConfig,
    TTAConfig,
    TTAMethod,
    create_tta_method,
    normalized_entropy,
    register_tta_method,
)
from device_agents.tta.cma_search import CMASearch
from runtime.errors import InputError
from runtime.model import ForwardResult, softmax
from runtime.predictor import PredictResult
from tests.device_agents.conftest import TinyAdaptableModel, check_digit_batch

METHODS = sorted(TTA_METHODS)
OUTPUT_METHODS = sorted(name for name, cls in TTA_METHODS.items() if not cls.requires_adaptable)


class _Manifest:
    """The manifest fields the TTA methods read: source feature statistics (no adaptable layer list)."""

    def __init__(self, mean: np.ndarray, var: np.ndarray, features_output: str | None = "features") -> None:
        self.name, self.layers, self.features_output = "tiny", None, features_output
        self.raw = {"source_statistics": {"features": {"mean": mean.tolist(), "var": var.tolist()}}}

    def source_feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
        feats = self.raw["source_statistics"]["features"]
        return np.asarray(feats["mean"], np.float32), np.asarray(feats["var"], np.float32)


class TinyModel(TinyAdaptableModel):
    """The conftest's tiny adaptable model plus a manifest with source feature statistics (uniform inputs)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        source = np.random.default_rng(100).random((512, 1, 8, 8), dtype=np.float32)
        f = super().forward(source).features.astype(np.float64)
        self.calls.clear()
        self.manifest = _Manifest(f.mean(0), f.var(0))


class TinyPredictor:
    """A folded-model stand-in: ``predict`` and ``check_input`` like ``runtime.predictor.Predictor``."""

    def __init__(self, features: bool = True) -> None:
        self._model = TinyModel()
        self.manifest = _Manifest(*self._model.manifest.source_feature_stats(), "features" if features else None)

    def check_input(self, x: np.ndarray) -> np.ndarray:
        return check_digit_batch(x)

    def predict(self, x: np.ndarray) -> PredictResult:
        out = self._model.forward(self.check_input(x))
        features = out.features if self.manifest.features_output else None
        return PredictResult(out.logits, softmax(out.logits), features, "logits")


class FailingModel(TinyModel):
    """Raises on the ``fail_at``-th forward call (counted from 1), after earlier calls succeeded."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.count = fail_at, 0

    def forward(self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None
                ) -> ForwardResult:
        self.count += 1
        if self.count == self.fail_at:
            raise RuntimeError("session failed")
        return super().forward(x, alpha, params)


def _batches(seed: int, n: int = 4, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, 1, 8, 8)) * 0.5 + 0.4).astype(np.float32) for _ in range(n)]


def _same_state(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def tiny() -> TinyModel:
    return TinyModel()


@pytest.fixture(params=["adaptable", "predictor"])
def any_model(request: pytest.FixtureRequest) -> Any:
    return TinyModel() if request.param == "adaptable" else TinyPredictor()


def _pairs() -> list[tuple[str, str]]:
    return [(name, kind) for name in METHODS for kind in ("adaptable", "predictor")
            if kind == "adaptable" or name in OUTPUT_METHODS]


def _model(kind: str) -> Any:
    return TinyModel() if kind == "adaptable" else TinyPredictor()


# -- registry and configs ------------------------------------------------------------------------------------


def test_registry_holds_the_builtin_methods() -> None:
    expected = {"source": SourceModel, "alpha_bn": AlphaBN, "foa": FOA, "lame": LAME, "t3a": T3A}
    assert expected == TTA_METHODS


def test_registry_rejects_duplicates_bad_names_and_non_methods() -> None:
    for name, cls in TTA_METHODS.items():
        with pytest.raises(ValueError, match="already registered"):
            register_tta_method(name, cls)
    with pytest.raises(ValueError, match="must match"):
        register_tta_method("Bad Name", SourceModel)
    with pytest.raises(TypeError, match="TTAMethod subclass"):
        register_tta_method("not_a_method", dict)  # type: ignore[arg-type]
    assert "not_a_method" not in TTA_METHODS
    with pytest.raises(ValueError, match="unknown TTA method 'nope'"):
        create_tta_method("nope")


def test_config_type_is_checked() -> None:
    with pytest.raises(TypeError, match="AlphaBNConfig"):
        AlphaBN(TTAConfig())
    with pytest.raises(TypeError, match="AlphaBNConfig"):
        AlphaBN(FOAConfig())  # same statistics fields, still a different method's config


@pytest.mark.parametrize(("cls", "kwargs"), [
    (AlphaBNConfig, {"alpha": -0.1}), (AlphaBNConfig, {"alpha": float("nan")}), (AlphaBNConfig, {"ema_momentum": 1.0}),
    (AlphaBNConfig, {"ema_momentum": 0.0}), (AlphaBNConfig, {"batch_weight": 1.5}),
    (AlphaBNConfig, {"min_batch_for_batch_stats": 0}), (FOAConfig, {"population": 1}), (FOAConfig, {"generations": 0}),
    (FOAConfig, {"sigma0": 0.0}), (FOAConfig, {"fitness_lambda": -1.0}), (FOAConfig, {"layers": 0}),
    (FOAConfig, {"layers": ()}), (FOAConfig, {"variance_floor": float("inf")}),
    (FOAConfig, {"min_batch_for_search": 1}),
    (LAMEConfig, {"knn": 0}), (LAMEConfig, {"laplacian_weight": -1.0}), (LAMEConfig, {"max_steps": 0}),
    (T3AConfig, {"filter_k": 0}),
    # counts that are not integers, a negative seed and a repeated layer: refused when the config is built, not
    # with a numpy TypeError / "expected non-negative integer" at the first batch (or, for the layer, never)
    (AlphaBNConfig, {"min_batch_for_batch_stats": float("nan")}), (AlphaBNConfig, {"min_batch_for_balanced": 2.5}),
    (FOAConfig, {"generations": 1.5}), (FOAConfig, {"min_batch_for_search": float("nan")}), (FOAConfig, {"seed": -1}),
    (FOAConfig, {"seed": 0.5}), (FOAConfig, {"layers": ("bn1", "bn1")}),
    (LAMEConfig, {"knn": float("nan")}), (LAMEConfig, {"max_steps": 2.5}), (T3AConfig, {"filter_k": 2.5}),
])
def test_config_validation(cls: type, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cls(**kwargs)


@pytest.mark.parametrize(("cls", "field", "value", "allowed"), [
    (FOAConfig, "population", 10**9, r"an integer in \[2, 1024\]"),
    (FOAConfig, "population", 1025, r"an integer in \[2, 1024\]"),
    (FOAConfig, "sigma0", 1e30, r"a number in \(0, 10\.0\]"),
    (FOAConfig, "sigma0", 10.5, r"a number in \(0, 10\.0\]"),
    (FOAConfig, "sigma0", True, r"a number in \(0, 10\.0\]"),
    (T3AConfig, "filter_k", 10**9, r"an integer in \[1, 1000\]"),
    (T3AConfig, "filter_k", 1001, r"an integer in \[1, 1000\]"),
    (FOAConfig, "generations", 10**9, r"an integer in \[1, 1000\]"),
    (LAMEConfig, "max_steps", 10**12, r"an integer in \[1, 100000\]"),
])
def test_config_upper_bounds(cls: type, field: str, value: object, allowed: str) -> None:
    """Counts and step sizes had lower bounds only: a population of 10**9 allocated candidates for ever, a
    filter_k of 10**9 supports that were never allocated, σ0 = 1e30 candidates that overflow. Refused when the
    config is built, naming the field, the value and the allowed range; the bounds themselves are accepted."""
    with pytest.raises(ValueError, match=f"{field} must be {allowed}, got {re.escape(repr(value))}$"):
        cls(**{field: value})
    assert FOAConfig(population=1024, sigma0=10.0).passes_per_batch() == 1024
    assert T3AConfig(filter_k=1000).filter_k == 1000
    assert FOAConfig(generations=1000).generations == 1000
    assert LAMEConfig(max_steps=100_000).max_steps == 100_000
    with pytest.raises(ValueError, match=r"population must be an integer in \[2, 1024\], got 5000"):
        CMASearch(population=5000, sigma0=0.1, seed=0)
    with pytest.raises(ValueError, match=r"sigma0 must be a number in \(0, 10\.0\], got inf"):
        CMASearch(population=4, sigma0=float("inf"), seed=0)
    search = CMASearch(population=4, sigma0=0.1, seed=0)
    with pytest.raises(ValueError, match=r"population must be an integer in \[2, 1024\], got 0"):
        search.use_population(0)
    assert search.population == 4


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError):
        TTAMethod()  # type: ignore[abstract]


def test_normalized_entropy_bounds() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(normalized_entropy(probs), [0.0, 1.0], atol=1e-9)
    with pytest.raises(ValueError, match="2 classes"):
        normalized_entropy(np.ones((2, 1)))


# -- the conformance battery -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), _pairs())
def test_output_shapes_and_probabilities(name: str, kind: str) -> None:
    out = create_tta_method(name).predict(_model(kind), _batches(1, n=1)[0])
    assert out.logits.shape == (32, 3) and out.features is not None and out.features.shape == (32, 4)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out.probs, softmax(out.logits), atol=1e-6)
    ent = normalized_entropy(out.probs)
    assert np.all((ent >= -1e-9) & (ent <= 1 + 1e-9))


@pytest.mark.parametrize(("name", "kind"), _pairs())
@pytest.mark.parametrize("batch_size", [1, 32])
def test_snapshot_restore_round_trip(name: str, kind: str, batch_size: int) -> None:
    model, method = _model(kind), create_tta_method(name)
    for b in _batches(2, size=batch_size):
        method.predict(model, b)
    state = method.snapshot()
    after = [method.predict(model, b).logits for b in _batches(3, size=batch_size)]
    method.restore(state)
    again = [method.predict(model, b).logits for b in _batches(3, size=batch_size)]
    for a, b in zip(after, again, strict=True):
        np.testing.assert_array_equal(a, b)
    twin = create_tta_method(name)
    twin.restore(state)  # a snapshot moves to another instance
    np.testing.assert_array_equal(twin.predict(model, _batches(3, size=batch_size)[0]).logits, again[0])
    assert all(isinstance(v, np.ndarray) for v in state.values())


@pytest.mark.parametrize(("name", "kind"), _pairs())
def test_reset_and_on_drift_return_to_fresh_behaviour(name: str, kind: str) -> None:
    model = _model(kind)
    probe = _batches(9, n=1, size=16)[0]
    expected = create_tta_method(name).predict(model, probe).logits
    used = create_tta_method(name)
    for b in _batches(4, size=16):
        used.predict(model, b)
    used.on_drift()
    np.testing.assert_array_equal(used.predict(model, probe).logits, expected)
    used.reset()
    assert used.snapshot() == {}


@pytest.mark.parametrize(("name", "kind"), _pairs())
def test_episodic_ignores_history(name: str, kind: str) -> None:
    model = _model(kind)
    cfg = TTA_METHODS[name].config_class(episodic=True)
    method = create_tta_method(name, cfg)
    probe = _batches(9, n=1, size=16)[0]
    expected = create_tta_method(name, cfg).predict(model, probe).logits
    for b in _batches(5, size=16):
        method.predict(model, b)
    assert method.episodic
    np.testing.assert_array_equal(method.predict(model, probe).logits, expected)


def _bad_inputs() -> dict[str, Any]:
    good = _batches(0, n=1, size=8)[0]
    nan, inf = good.copy(), good.copy()
    nan[3, 0, 2, 2], inf[1, 0, 0, 0] = np.nan, np.inf
    return {"wrong_shape": good[:, :, :7], "wrong_rank": good.reshape(8, 64), "strings": np.full((8, 1, 8, 8), "a"),
            "complex": good.astype(np.complex64), "nan": nan, "inf": inf, "empty": good[:0]}


@pytest.mark.parametrize(("name", "kind"), _pairs())
@pytest.mark.parametrize("episodic", [False, True])
def test_bad_input_raises_and_leaves_the_state_unchanged(name: str, kind: str, episodic: bool) -> None:
    model = _model(kind)
    method = create_tta_method(name, TTA_METHODS[name].config_class(episodic=episodic))
    for b in _batches(5, n=3, size=16):
        method.predict(model, b)
    before = method.snapshot()
    for label, bad in _bad_inputs().items():
        with pytest.raises(InputError):
            method.predict(model, bad)
        assert _same_state(method.snapshot(), before), label
    probe = _batches(6, n=1, size=16)[0]
    twin = create_tta_method(name, method.config)
    twin.restore(before)
    np.testing.assert_array_equal(method.predict(model, probe).logits, twin.predict(model, probe).logits)


@pytest.mark.parametrize("name", sorted(n for n, c in TTA_METHODS.items() if c.requires_adaptable))
def test_a_batch_failing_half_way_is_rolled_back(name: str) -> None:
    clean, failing = TinyModel(), FailingModel(fail_at=0)
    method, reference = create_tta_method(name), create_tta_method(name)
    for b in _batches(7, n=2):
        method.predict(failing, b)
        reference.predict(clean, b)
    before = method.snapshot()
    reference.snapshot()  # snapshots re-anchor the search state: keep both sides alike
    failing.fail_at = failing.count + (3 if name == "foa" else 1)  # FOA: fail at the third candidate
    with pytest.raises(RuntimeError, match="session failed"):
        method.predict(failing, _batches(8, n=1)[0])
    assert _same_state(method.snapshot(), before)
    for b in _batches(9, n=2):
        np.testing.assert_array_equal(method.predict(failing, b).logits, reference.predict(clean, b).logits)


class OverflowedStatistics(TinyModel):
    """Finite logits, but an infinite batch variance of ``bn1`` while ``overflow`` is set: what a batch of huge
    finite values gives where the prediction did not normalise with the batch's own statistics."""

    overflow = False

    def forward(self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None
                ) -> ForwardResult:
        out = super().forward(x, alpha, params)
        if not self.overflow:
            return out
        mean, var = out.batch_stats["bn1"]
        return ForwardResult(out.logits, out.features, {"bn1": (mean, np.full_like(var, np.inf))})


@pytest.mark.parametrize("name", sorted(n for n in TTA_METHODS if n != "source"))
def test_non_finite_batch_statistics_are_refused_and_commit_nothing(name: str) -> None:
    """Folded in, an infinite batch variance made the running estimate infinite, and every later batch was
    refused ("parameter 'bn1.var' contains NaN or infinite values") until a reset."""
    model, method, twin = OverflowedStatistics(), create_tta_method(name), create_tta_method(name)
    for b in _batches(12, n=2):
        method.predict(model, b)
        twin.predict(model, b)
    before = method.snapshot()
    twin.snapshot()  # snapshots re-anchor the search state: keep both sides alike
    model.overflow = True
    with pytest.raises(FloatingPointError, match="non-finite batch statistics for layer 'bn1'"):
        method.predict(model, _batches(13, n=1)[0])
    model.overflow = False
    assert _same_state(method.snapshot(), before)
    for b in _batches(14, n=2):
        np.testing.assert_array_equal(method.predict(model, b).logits, twin.predict(model, b).logits)


@pytest.mark.parametrize(("name", "kind"), _pairs())
def test_deterministic_under_seed(name: str, kind: str) -> None:
    runs = []
    for _ in range(2):
        model, method = _model(kind), create_tta_method(name)
        runs.append([method.predict(model, b).logits for b in _batches(11, n=4)])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_restore_rejects_non_arrays() -> None:
    with pytest.raises(TypeError, match="numpy array"):
        AlphaBN().restore({"bn1.ema_mean": [1.0]})  # type: ignore[dict-item]


def _adapted(name: str, seed: int) -> TTAMethod:
    """Method ``name`` after two batches on the tiny adaptable model (a stateful method holds a state then)."""
    method, model = create_tta_method(name), TinyModel()
    for b in _batches(seed, n=2):
        method.predict(model, b)
    return method


def _continues_like(method: TTAMethod, twin: TTAMethod) -> None:
    """``method`` predicts the next batches as ``twin`` (the same method, never handed anything) does."""
    model = TinyModel()
    for b in _batches(31, n=2):
        np.testing.assert_array_equal(method.predict(model, b).logits, twin.predict(model, b).logits)


@pytest.mark.parametrize(("taken_by", "name"), [(a, b) for a in METHODS for b in METHODS if a != b])
def test_restore_refuses_another_methods_snapshot(taken_by: str, name: str) -> None:
    """A snapshot of one method restored into another (an α-BN state into LAME or FOA) raised a bare KeyError
    at the next batch or mixed the two methods' states silently: refused at restore, naming both methods —
    as a snapshot, and as a plain dict of its arrays, by its keys — and the state stays as it was."""
    foreign = _adapted(taken_by, 21).snapshot()
    method, twin = _adapted(name, 22), _adapted(name, 22)
    before = method.snapshot()
    twin.snapshot()  # snapshots re-anchor FOA's search state: keep both sides alike
    with pytest.raises(ValueError, match=f"a snapshot of TTA method '{taken_by}' cannot be restored into TTA "
                                         f"method '{name}'"):
        method.restore(foreign)
    # untagged, only the keys tell: no state (a reset one) is every method's, and LAME's (the running statistics
    # alone) one that FOA and T3A hold too; any other is refused, naming the method it looks like
    if foreign and not (taken_by == "lame" and name in ("foa", "t3a")):
        with pytest.raises(ValueError, match=f"not a state of TTA method '{name}': .*looks like the state of "
                                             f"TTA method .*'{taken_by}'"):
            method.restore(dict(foreign))
    else:
        create_tta_method(name).restore(dict(foreign))
    assert _same_state(method.snapshot(), before)
    twin.snapshot()
    _continues_like(method, twin)


@pytest.mark.parametrize(("name", "dropped", "message"), [
    ("alpha_bn", "bn1.ema_sq", "'bn1.ema_mean' without 'bn1.ema_sq'"),
    ("lame", "stats.bn1.ema_mean", "'stats.bn1.ema_sq' without 'stats.bn1.ema_mean'"),
    ("t3a", "support_entropy", "'supports' without 'support_entropy'"),
    ("foa", "cma.sigma", "'cma.mean', 'cma.stds', 'cma.rng' without 'cma.sigma'"),
])
def test_restore_refuses_what_is_not_a_snapshot(name: str, dropped: str, message: str) -> None:
    """Not a snapshot — not a mapping, keys that are not names, values that are not numeric arrays, a state
    missing keys that come together — is refused with the problem named, and the state stays as it was."""
    method, twin = _adapted(name, 23), _adapted(name, 23)
    before = method.snapshot()
    twin.snapshot()
    incomplete = {k: v for k, v in before.items() if k != dropped}
    for bad, error, match in [
        (None, TypeError, "restores a snapshot .*got NoneType"),
        (list(before.items()), TypeError, "got list"),
        ({**before, 3: np.zeros(2)}, TypeError, "state keys must be strings, got 3"),
        ({**before, dropped: np.array(["x"])}, TypeError, f"{dropped!r} must be a numeric numpy array"),
        (incomplete, ValueError, f"not a state of TTA method '{name}': it holds {message}"),
        ({**before, "bogus": np.zeros(2)}, ValueError, "it holds 'bogus', which this method's state never holds"),
    ]:
        with pytest.raises(error, match=match):
            method.restore(bad)  # type: ignore[arg-type]
        assert _same_state(method.snapshot(), before)
    twin.snapshot()
    _continues_like(method, twin)
    SourceModel().restore({})  # an empty state is every method's (after a reset)
    with pytest.raises(ValueError, match="'bogus', which this method's state never holds"):
        SourceModel().restore({"bogus": np.zeros(2)})


@pytest.mark.parametrize("name", sorted(n for n, c in TTA_METHODS.items() if c.requires_adaptable))
def test_adaptable_methods_refuse_a_predictor(name: str) -> None:
    method = create_tta_method(name)
    with pytest.raises(ModelCapabilityError, match=f"{name}.*needs an adaptable graph.*TinyPredictor"):
        method.predict(TinyPredictor(), _batches(0, n=1)[0])
    assert method.snapshot() == {}


@pytest.mark.parametrize("name", ["lame", "t3a"])
def test_feature_methods_refuse_a_model_without_features(name: str) -> None:
    with pytest.raises(ModelCapabilityError, match=r"needs penultimate features.*outputs\.features is null"):
        create_tta_method(name).predict(TinyPredictor(features=False), _batches(0, n=1)[0])
    source = SourceModel().predict(TinyPredictor(features=False), _batches(0, n=1)[0])
    assert source.features is None and source.probs.shape == (32, 3)
