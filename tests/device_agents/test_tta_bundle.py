"""TTA methods on the real exported digits bundle (onnxruntime): gaussian noise, and continual corrupted streams
in shuffled and class-sorted order (classes arriving in runs, where batch statistics collapse)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agents.tta import TTA_METHODS, AlphaBN, AlphaBNConfig, SourceModel, TTAMethod, create_tta_method
from runtime import AdaptableModel, load_bundle

SEEDS = (0, 1, 2)
DOMAINS = ("gaussian_noise@5", "contrast@5", "defocus_blur@5", "pixelate@5")
ORDERS = ("shuffled", "class_sorted")
BATCH = 64


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


@pytest.fixture(scope="module")
def streams(digits_test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Four corruptions at severity 5, 540 samples each, switching without warning; both orders."""
    from edgeloop.data import Dataset, build_stream

    x, y = digits_test
    dataset = Dataset(x, y, [str(i) for i in range(10)], "digits")
    return {order: build_stream(dataset, DOMAINS, len(y), seed=0, order=order) for order in ORDERS}


def _stream_accuracy(method: TTAMethod, model: AdaptableModel, stream: Any, batch: int = BATCH) -> float:
    hits = 0
    for i in range(0, len(stream.y), batch):
        hits += int((method.predict(model, stream.x[i : i + batch]).probs.argmax(1) == stream.y[i : i + batch]).sum())
    return hits / len(stream.y)


@pytest.fixture(scope="module")
def stream_results(model: AdaptableModel, streams: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Top-1 of every registered method (default config) and of classic α-BN on both streams, continual."""
    methods = {name: lambda name=name: create_tta_method(name) for name in TTA_METHODS}
    methods["classic_bn"] = lambda: AlphaBN(AlphaBNConfig(alpha=1.0, batch_weight=1.0))
    results = {(name, order): _stream_accuracy(make(), model, streams[order])
               for name, make in methods.items() for order in ORDERS}
    print(f"\ndigits, {' + '.join(DOMAINS)}, continual, batch {BATCH}")
    for name in methods:
        print(f"  {name:11s}", "  ".join(f"{order} {results[name, order]:.3f}" for order in ORDERS))
    return results


def test_no_forward_only_method_falls_below_source_on_the_class_sorted_stream(stream_results: dict) -> None:
    source = stream_results["source", "class_sorted"]
    assert stream_results["classic_bn", "class_sorted"] < source - 0.05  # the collapse the methods must withstand
    for name in TTA_METHODS:
        assert stream_results[name, "class_sorted"] >= source, name
    assert stream_results["alpha_bn", "class_sorted"] >= source + 0.08
    assert stream_results["foa", "class_sorted"] >= source + 0.08
    assert stream_results["lame", "class_sorted"] >= source + 0.03


def test_batch_statistics_methods_gain_on_the_shuffled_stream(stream_results: dict) -> None:
    source = stream_results["source", "shuffled"]
    assert stream_results["alpha_bn", "shuffled"] >= source + 0.15
    assert stream_results["foa", "shuffled"] >= stream_results["alpha_bn", "shuffled"] - 0.02
    assert stream_results["alpha_bn", "shuffled"] >= stream_results["classic_bn", "shuffled"] - 0.05


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


def test_classic_alpha_bn_is_one_graph_pass(model: AdaptableModel, noisy) -> None:
    x, _ = noisy[0]
    out = AlphaBN(AlphaBNConfig(alpha=0.7, batch_weight=1.0)).predict(model, x[:64])
    np.testing.assert_array_equal(out.logits, model.forward(x[:64], alpha=0.7).logits)


@pytest.mark.parametrize("name", sorted(TTA_METHODS))
def test_forward_passes_per_batch(name: str, bundle_dir: Path, noisy) -> None:
    model = AdaptableModel(load_bundle(bundle_dir, threads=1))
    calls: list[int] = []
    forward, validated = model.forward, model.forward_validated

    def counting(x: np.ndarray, alpha: float = 0.0, params: Any = None) -> Any:
        calls.append(len(x))
        return forward(x, alpha, params)

    def counting_validated(x: np.ndarray, alpha: float = 0.0, params: Any = None) -> Any:
        calls.append(len(x))
        return validated(x, alpha, params)

    model.forward = counting  # type: ignore[method-assign]
    model.forward_validated = counting_validated  # type: ignore[method-assign]
    method = create_tta_method(name)
    x, _ = noisy[0]
    for i in range(0, 192, 64):
        method.predict(model, x[i : i + 64])
    expected = method.passes_per_batch(model) if name == "foa" else 1  # type: ignore[attr-defined]
    assert calls == [64] * (3 * expected)


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


def test_t3a_starts_from_the_bundles_class_means(model: AdaptableModel, noisy) -> None:
    from device_agents.tta import T3A

    method = T3A()
    method.predict(model, noisy[0][0][:64])
    means, _, _ = model.manifest.class_gaussians(model.bundle.root)
    state = method.snapshot()
    np.testing.assert_array_equal(state["supports"][:, 0], means)
    assert np.all(state["support_entropy"][:, 0] == 0.0)


class PoisonedOutputs:
    """A real :class:`AdaptableModel` whose passes return NaN logits while ``poisoned`` (a broken model or
    parameters on a finite batch); everything else is the real model's."""

    def __init__(self, model: AdaptableModel) -> None:
        self.model = model
        self.poisoned = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.model.params

    def _out(self, result: Any) -> Any:
        import dataclasses

        return dataclasses.replace(result, logits=np.full_like(result.logits, np.nan)) if self.poisoned else result

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._out(self.model.forward(*args, **kwargs))

    def forward_validated(self, *args: Any, **kwargs: Any) -> Any:
        return self._out(self.model.forward_validated(*args, **kwargs))


@pytest.mark.parametrize("name", sorted(TTA_METHODS))
def test_non_finite_outputs_raise_and_commit_nothing(name: str, bundle_dir: Path, noisy) -> None:
    """NaN outputs on a finite batch raise FloatingPointError naming the method (FOA's fitness check sees them
    first), and the state stays as it was: the next batch gives exactly what a twin that never saw the bad
    batch gives."""
    model = PoisonedOutputs(AdaptableModel(load_bundle(bundle_dir, threads=1)))
    method, twin = create_tta_method(name), create_tta_method(name)
    x, _ = noisy[0]
    method.predict(model, x[:32])
    twin.predict(model, x[:32])
    before = method.snapshot()
    twin.snapshot()  # a snapshot rebuilds FOA's live CMA-ES from the state's arrays, as a rollback does
    model.poisoned = True
    with pytest.raises(FloatingPointError, match=r"non-finite|FOA fitness is nan"):
        method.predict(model, x[32:64])
    model.poisoned = False
    after = method.snapshot()
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
    np.testing.assert_array_equal(method.predict(model, x[64:96]).logits, twin.predict(model, x[64:96]).logits)
