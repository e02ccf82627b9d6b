"""TTA methods on the real exported digits bundle (onnxruntime), under gaussian noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agents.tta import TTA_METHODS, AlphaBN, AlphaBNConfig, SourceModel, TTAMethod, create_tta_method
from runtime import AdaptableModel, load_bundle

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def model(bundle_dir: Path) -> AdaptableModel:
    return AdaptableModel(load_bundle(bundle_dir, threads=1))


@pytest.fixture(scope="module")
def noisy(digits_test: tuple[np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The test split under gaussian noise at severity 5, three seeds, shuffled."""
    from edgeloop.data import corrupt

    x, y = digits_test
    order = np.random.default_rng(0).permutation(len(x))
    return [(corrupt(x[order], "gaussian_noise", 5, seed=s), y[order]) for s in SEEDS]


def _accuracy(method: TTAMethod, model: AdaptableModel, data: list[tuple[np.ndarray, np.ndarray]],
              batch: int) -> float:
    hits = total = 0
    for x, y in data:
        method.reset()
        for i in range(0, len(x), batch):
            hits += int((method.predict(model, x[i : i + batch]).probs.argmax(1) == y[i : i + batch]).sum())
        total += len(y)
    return hits / total


def test_alpha_bn_default_improves_on_gaussian_noise(model: AdaptableModel, noisy) -> None:
    source = _accuracy(SourceModel(), model, noisy, 64)
    adapted = _accuracy(AlphaBN(), model, noisy, 64)
    print(f"gaussian_noise s5, batch 64: source {source:.3f}, alpha_bn(α={AlphaBNConfig().alpha}) {adapted:.3f}")
    assert adapted >= source + 0.01


def test_alpha_bn_small_batches_do_not_collapse(model: AdaptableModel, noisy) -> None:
    source = _accuracy(SourceModel(), model, noisy[:1], 1)
    adapted = _accuracy(AlphaBN(), model, noisy[:1], 1)
    print(f"gaussian_noise s5, batch 1: source {source:.3f}, alpha_bn {adapted:.3f}")
    assert adapted >= source - 0.02


def test_alpha_zero_matches_source_on_the_bundle(model: AdaptableModel, noisy) -> None:
    x, _ = noisy[0]
    a = AlphaBN(AlphaBNConfig(alpha=0.0)).predict(model, x[:64]).logits
    np.testing.assert_allclose(a, SourceModel().predict(model, x[:64]).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TTA_METHODS))
def test_methods_follow_cloud_params(name: str, bundle_dir: Path, noisy) -> None:
    model = AdaptableModel(load_bundle(bundle_dir, threads=1))
    method = create_tta_method(name)
    x, _ = noisy[0]
    before = method.predict(model, x[:32]).logits
    params = model.params
    model.set_params({k: v * 0.5 for k, v in params.items() if k.endswith(".weight")})
    method.on_params_changed()
    after = method.predict(model, x[:32]).logits
    assert not np.allclose(before, after)
    snapshot = method.snapshot()
    twin = create_tta_method(name)
    twin.restore(snapshot)
    np.testing.assert_array_equal(method.predict(model, x[32:64]).logits, twin.predict(model, x[32:64]).logits)
