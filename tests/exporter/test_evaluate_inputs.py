"""``exporter.train.evaluate`` validates images and labels before it runs the model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from exporter.models import ModelSpec, build_model
from exporter.train import evaluate, torch_threads

SPEC = ModelSpec(1, 3, 8, (0.5,), (0.25,))


@pytest.fixture
def counted() -> Iterator[tuple[nn.Module, list[int]]]:
    """A real small_cnn whose forward passes are counted (a forward pre-hook)."""
    model = build_model("small_cnn", SPEC).eval()
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    with torch_threads(1):
        yield model, calls
    handle.remove()


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 1.0, (n, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (np.zeros(9, np.int64), r"y must have shape \(10,\) \(one label per sample\), got \(9,\)"),
        (np.zeros((10, 1), np.int64), r"y must have shape \(10,\).*got \(10, 1\)"),
        (np.zeros(10, np.float32), "y must be integers, got dtype float32"),
        (np.full(10, 0.5), "y must be integers, got dtype float64"),
        (np.zeros(10, bool), "y must be integers, got dtype bool"),
        (np.array(["a"] * 10), "y must be integers"),
        (np.r_[np.zeros(9, np.int64), -1], r"y must lie in \[0, 3\), got range \[-1, 0\]"),
        (np.r_[np.zeros(9, np.int64), 3], r"y must lie in \[0, 3\), got range \[0, 3\]"),
    ],
)
def test_bad_labels_are_refused_before_the_forward(counted: tuple[nn.Module, list[int]], y: np.ndarray,
                                                   match: str) -> None:
    model, calls = counted
    with pytest.raises(ValueError, match=match):
        evaluate(model, _images(10), y, batch_size=4)
    assert calls == []


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((0, 1, 8, 8), np.float32), r"x must be a non-empty \(N, C, H, W\) array, got shape \(0, 1, 8, 8\)"),
        (np.zeros((10, 64), np.float32), r"x must be a non-empty \(N, C, H, W\) array"),
        (np.zeros((10, 1, 8, 8), np.uint8), "x must be floating point"),
        (np.full((10, 1, 8, 8), 2.0, np.float32), r"x must lie in \[0, 1\]"),
    ],
)
def test_bad_images_are_refused_before_the_forward(counted: tuple[nn.Module, list[int]], x: np.ndarray,
                                                   match: str) -> None:
    model, calls = counted
    with pytest.raises(ValueError, match=match):
        evaluate(model, x, np.zeros(10, np.int64))
    assert calls == []


def test_labels_beyond_a_model_without_spec_are_refused_after_the_forward(
        counted: tuple[nn.Module, list[int]]) -> None:
    model, _ = counted
    bare = nn.Sequential(model)  # no .spec: the class count comes from the logits
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\)"):
        evaluate(bare, _images(6), np.array([0, 1, 2, 3, 0, 1]))


def test_good_inputs_give_the_accuracy(counted: tuple[nn.Module, list[int]]) -> None:
    model, calls = counted
    x = _images(10)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(1).numpy()
    calls.clear()
    assert evaluate(model, x, predicted.astype(np.int32), batch_size=4) == 1.0
    assert calls == [4, 4, 2]
    assert evaluate(model, x, (predicted + 1) % 3) == 0.0
