"""TTA methods on a tiny numpy model: registry, conformance battery over every method, α-BN specifics."""

from __future__ import annotations

import numpy as np
import pytest

from device_agents.tta import (
    TTA_METHODS,
    AlphaBN,
    AlphaBNConfig,
    SourceModel,
    TTAConfig,
    TTAMethod,
    create_tta_method,
    normalized_entropy,
    register_tta_method,
)

METHODS = sorted(TTA_METHODS)


def _batches(seed: int, n: int = 4, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, 1, 8, 8)) * 0.5 + 0.4).astype(np.float32) for _ in range(n)]


def test_registry_holds_the_builtin_methods() -> None:
    assert TTA_METHODS["source"] is SourceModel and TTA_METHODS["alpha_bn"] is AlphaBN


def test_registry_rejects_duplicates_bad_names_and_non_methods() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_tta_method("source", SourceModel)
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


@pytest.mark.parametrize("kwargs", [{"alpha": -0.1}, {"alpha": 1.5}, {"alpha": float("nan")},
                                    {"min_batch_for_batch_stats": 0}, {"ema_momentum": 1.0}])
def test_alpha_bn_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AlphaBNConfig(**kwargs)


@pytest.mark.parametrize("name", METHODS)
def test_output_shapes_and_probabilities(name: str, tiny_model, tiny_batch) -> None:
    out = create_tta_method(name).predict(tiny_model, tiny_batch)
    assert out.logits.shape == (32, 3) and out.features.shape == (32, 4) and out.probs.shape == (32, 3)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-9)
    ent = normalized_entropy(out.probs)
    assert np.all((ent >= 0) & (ent <= 1 + 1e-9))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("batch_size", [1, 32])
def test_snapshot_restore_round_trip(name: str, batch_size: int, tiny_model) -> None:
    method = create_tta_method(name)
    first, second = _batches(2, size=batch_size), _batches(3, size=batch_size)
    for b in first:
        method.predict(tiny_model, b)
    state = method.snapshot()
    after = [method.predict(tiny_model, b).logits for b in second]
    method.restore(state)
    again = [method.predict(tiny_model, b).logits for b in second]
    for a, b in zip(after, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for key, value in state.items():  # the snapshot is a copy, untouched by later batches
        assert isinstance(value, np.ndarray), key


@pytest.mark.parametrize("name", METHODS)
def test_reset_and_on_drift_return_to_fresh_behaviour(name: str, tiny_model) -> None:
    fresh = create_tta_method(name)
    probe = _batches(9, n=1, size=1)[0]
    expected = fresh.predict(tiny_model, probe).logits
    used = create_tta_method(name)
    for b in _batches(4, size=1):
        used.predict(tiny_model, b)
    used.on_drift()
    np.testing.assert_array_equal(used.predict(tiny_model, probe).logits, expected)
    used.reset()
    assert used.snapshot() == {}


@pytest.mark.parametrize("name", METHODS)
def test_episodic_ignores_history(name: str, tiny_model) -> None:
    cfg = TTA_METHODS[name].config_class(episodic=True)
    method = create_tta_method(name, cfg)
    probe = _batches(9, n=1, size=2)[0]
    expected = create_tta_method(name, cfg).predict(tiny_model, probe).logits
    for b in _batches(5, size=2):
        method.predict(tiny_model, b)
    assert method.episodic
    np.testing.assert_array_equal(method.predict(tiny_model, probe).logits, expected)


def test_restore_rejects_non_arrays() -> None:
    with pytest.raises(TypeError, match="numpy array"):
        AlphaBN().restore({"bn1.ema_mean": [1.0]})  # type: ignore[dict-item]


def test_source_uses_alpha_zero_and_current_params(tiny_model, tiny_batch) -> None:
    before = SourceModel().predict(tiny_model, tiny_batch).logits
    assert tiny_model.calls[-1] == (32, 0.0)
    tiny_model.set_params({"bn1.bias": np.full(4, 0.5, np.float32)})
    after = SourceModel().predict(tiny_model, tiny_batch).logits
    assert not np.allclose(before, after)


def test_alpha_bn_large_batch_feeds_alpha_in_one_pass(tiny_model, tiny_batch) -> None:
    method = AlphaBN(AlphaBNConfig(alpha=0.3, min_batch_for_batch_stats=16))
    out = method.predict(tiny_model, tiny_batch)
    assert tiny_model.calls == [(32, 0.3)]
    np.testing.assert_array_equal(out.logits, tiny_model.forward(tiny_batch, alpha=0.3).logits)


def test_alpha_bn_zero_equals_source(tiny_model, tiny_batch) -> None:
    for size in (1, 32):
        method = AlphaBN(AlphaBNConfig(alpha=0.0))
        got = [method.predict(tiny_model, tiny_batch[i : i + size]).logits for i in range(0, 32, size)]
        want = [SourceModel().predict(tiny_model, tiny_batch[i : i + size]).logits for i in range(0, 32, size)]
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-6)


def test_alpha_bn_small_batches_estimate_pooled_target_statistics(tiny_model) -> None:
    rng = np.random.default_rng(0)
    stream = (rng.random((400, 1, 8, 8)) * 0.5 + 0.4).astype(np.float32)
    stream += rng.normal(0, 0.1, (400, 1, 1, 1)).astype(np.float32)  # per-sample offsets: between-sample variance
    method = AlphaBN(AlphaBNConfig(alpha=1.0, min_batch_for_batch_stats=16, ema_momentum=0.99))
    for i in range(400):
        method.predict(tiny_model, stream[i : i + 1])
    assert all(n == 1 and a == 0.0 for n, a in tiny_model.calls)
    _, (mu_all, var_all) = next(iter(tiny_model.forward(stream, alpha=1.0).batch_stats.items()))
    state = method.snapshot()
    est_var = state["bn1.ema_sq"] - state["bn1.ema_mean"] ** 2
    np.testing.assert_allclose(state["bn1.ema_mean"], mu_all, rtol=0.05, atol=0.02)
    np.testing.assert_allclose(est_var, var_all, rtol=0.25)
    one_sample_var = tiny_model.forward(stream[:1], alpha=1.0).batch_stats["bn1"][1]
    assert np.all(est_var > one_sample_var)  # pooled, not the spatial variance of one sample
    full = tiny_model.forward(stream[-50:], alpha=1.0).logits
    small = np.concatenate([method.predict(tiny_model, stream[i : i + 1]).logits for i in range(350, 400)])
    assert np.mean(full.argmax(1) == small.argmax(1)) >= 0.9


def test_alpha_bn_follows_cloud_params(tiny_model, tiny_batch) -> None:
    method = AlphaBN(AlphaBNConfig(alpha=0.5, min_batch_for_batch_stats=4))
    before = method.predict(tiny_model, tiny_batch).logits
    tiny_model.set_params({"bn1.weight": np.full(4, 2.0, np.float32)})
    method.on_params_changed()
    after = method.predict(tiny_model, tiny_batch).logits
    np.testing.assert_array_equal(after, tiny_model.forward(tiny_batch, alpha=0.5).logits)
    assert not np.allclose(before, after)


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError):
        TTAMethod()  # type: ignore[abstract]


def test_normalized_entropy_bounds() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(normalized_entropy(probs), [0.0, 1.0], atol=1e-9)
    with pytest.raises(ValueError, match="2 classes"):
        normalized_entropy(np.ones((2, 1)))
