"""Training on numpy arrays: accuracy on digits, determinism, derived spec, augmentation hook, validation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from exporter.models import ModelSpec
from exporter.train import TrainConfig, evaluate, predict_logits, spec_from_data, torch_threads, train_model


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Two threads on two shared, busy cores made these tests 10x slower."""
    with torch_threads(1):
        yield


def test_digits_training_is_accurate_and_fast(digits_model: tuple, digits_arrays: tuple) -> None:
    model, spec, metrics = digits_model
    _, _, x_test, y_test = digits_arrays
    assert evaluate(model, x_test, y_test) > 0.9
    assert not model.training
    assert set(metrics) == {"train_loss", "train_acc", "epochs", "steps", "seconds"}
    assert metrics["steps"] == 200 and metrics["train_acc"] > 0.95 and metrics["seconds"] < 30
    assert (spec.in_channels, spec.num_classes, spec.image_size) == (1, 10, 8)


def test_spec_is_derived_from_data(digits_arrays: tuple) -> None:
    x_train, y_train, _, _ = digits_arrays
    spec = spec_from_data(x_train, y_train)
    assert spec.mean[0] == pytest.approx(float(x_train.mean()), rel=1e-6)
    assert spec.std[0] == pytest.approx(float(x_train.std()), rel=1e-5)


def _tiny(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 48)
    x = rng.random((48, 3, 8, 8), dtype=np.float32) * 0.5
    x[np.arange(48), y] += 0.5  # class k brightens channel k
    return x, y.astype(np.int64)


def test_training_is_deterministic() -> None:
    x, y = _tiny()
    config = TrainConfig(epochs=2, batch_size=16, seed=3)
    a, _, _ = train_model("small_cnn", x, y, config)
    b, _, _ = train_model("small_cnn", x, y, config)
    c, _, _ = train_model("small_cnn", x, y, TrainConfig(epochs=2, batch_size=16, seed=4))
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), name
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    np.testing.assert_array_equal(predict_logits(a, x), predict_logits(b, x))


def test_augment_fn_is_called_on_about_half_of_the_batches() -> None:
    x, y = _tiny()
    calls: list[tuple[int, ...]] = []

    def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        calls.append(batch.shape)
        return np.clip(batch + rng.normal(0, 0.1, batch.shape), 0, 1).astype(np.float32)

    config = TrainConfig(epochs=10, batch_size=8, augment=True)
    train_model("small_cnn", x, y, config, augment_fn=augment)
    assert 15 <= len(calls) <= 45 and all(s[1:] == (3, 8, 8) for s in calls)  # 60 batches in all
    calls.clear()
    train_model("small_cnn", x, y, TrainConfig(epochs=1, batch_size=8), augment_fn=augment)
    assert calls == []  # augmentation is off unless config.augment


def test_threads_are_restored() -> None:
    x, y = _tiny()
    with torch_threads(2):
        train_model("small_cnn", x, y, TrainConfig(epochs=1, batch_size=16, threads=1))
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1


def test_given_spec_is_used() -> None:
    x, y = _tiny()
    spec = ModelSpec(3, 5, 8, (0.5, 0.5, 0.5), (0.3, 0.3, 0.3))
    model, got, _ = train_model("small_cnn", x, y, TrainConfig(epochs=1, batch_size=16), spec=spec)
    assert got is spec and predict_logits(model, x[:2]).shape == (2, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "nope"}, "unknown architecture"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"seed": -2}, "seed"),
        ({"threads": 0}, "threads"),
    ],
)
def test_train_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_bad_training_inputs_are_rejected() -> None:
    x, y = _tiny()
    config = TrainConfig(epochs=1)
    with pytest.raises(ValueError, match=r"differs from config\.arch"):
        train_model("wide_cnn", x, y, config)
    with pytest.raises(ValueError, match="augment_fn"):
        train_model("small_cnn", x, y, TrainConfig(augment=True))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_model("small_cnn", x * 255, y, config)
    with pytest.raises(ValueError, match="shape"):
        train_model("small_cnn", x, y[:-1], config)
    with pytest.raises(ValueError, match="integers"):
        train_model("small_cnn", x, y.astype(np.float32), config)
    with pytest.raises(ValueError, match="changed the batch shape"):
        train_model("small_cnn", x, y, TrainConfig(epochs=3, batch_size=8, augment=True), augment_fn=lambda b, r: b[:1])
