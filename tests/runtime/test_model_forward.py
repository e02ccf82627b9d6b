"""AdaptableModel.forward: per-call parameter overrides checked without copies, feeds run through the session's
checked fast path, the same outputs as a plain session run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import AdaptableModel, InputError, load_bundle
from runtime.session import OrtSession


@pytest.fixture(scope="module")
def model(digits_bundle: Path) -> AdaptableModel:
    return AdaptableModel(load_bundle(digits_bundle, threads=1))


def _batch(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def test_forward_equals_a_checked_session_run(model: AdaptableModel) -> None:
    x = _batch()
    overrides = {name: (value + 0.1).astype(np.float64) for name, value in model.params.items()
                 if name.endswith(".mean")}  # float64 overrides are cast to float32
    got = model.forward(x, alpha=0.3, params=overrides)
    m = model.manifest
    feeds = {**model.params, **{k: v.astype(np.float32) for k, v in overrides.items()},
             m.input.name: x, m.alpha_input: np.asarray(0.3, np.float32)}
    session = model.bundle.session
    assert isinstance(session, OrtSession)
    want = session.run(feeds)
    np.testing.assert_array_equal(got.logits, want[m.logits_output])
    np.testing.assert_array_equal(got.features, want[m.features_output])
    for layer in m.layers:
        np.testing.assert_array_equal(got.batch_stats[layer.name][1], want[layer.batch_var])
    for name, value in session.run_checked(feeds).items():
        np.testing.assert_array_equal(value, want[name])


def test_overrides_are_checked_and_named(model: AdaptableModel) -> None:
    name = next(n for n in model.params if n.endswith(".var"))
    channels = model.params[name].shape
    for bad, message in [
        ({name: np.full(channels, np.nan, np.float32)}, f"'{name}' contains NaN"),
        ({name: np.ones(channels[0] + 1, np.float32)}, f"'{name}' has shape"),
        ({name: np.array(["x"] * channels[0])}, f"'{name}' has non-numeric dtype"),
        ({"bn99.var": np.ones(channels, np.float32)}, "unknown adaptable parameter"),
    ]:
        with pytest.raises(InputError, match=message):
            model.forward(_batch(), alpha=0.5, params=bad)


def test_forward_leaves_the_parameters_and_overrides_alone(model: AdaptableModel) -> None:
    before = model.params
    name = next(n for n in before if n.endswith(".mean"))
    override = {name: np.full(before[name].shape, 0.25, np.float32)}
    model.forward(_batch(), alpha=1.0, params=override)
    after = model.params
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert np.all(override[name] == 0.25)


@pytest.mark.parametrize("scale", [1000.0, -1.0])
def test_forward_refuses_values_outside_the_input_range(model: AdaptableModel, scale: float) -> None:
    """The manifest's value_range holds for the adaptable model as for a Predictor: a batch far outside it (a
    0-255 image fed to a 0-1 model) would be normalised into the running statistics of a TTA method."""
    with pytest.raises(InputError, match=r"leave the model's range \[0\.0, 1\.0\]"):
        model.forward(_batch() * scale)
    edge = _batch()
    edge[0, 0, 0, :2] = (0.0, 1.0)  # the bounds themselves are in range
    assert np.isfinite(model.forward(edge).logits).all()
