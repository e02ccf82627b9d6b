"""Output/feature methods through a ``Predictor`` on a folded bundle (BatchNorm folded into the convolutions),
refusals on models without features or without an adaptable graph, and the device side without torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from device_agents.tta import LAMEConfig, ModelCapabilityError, T3AConfig, create_tta_method
from runtime import AdaptableModel, load_bundle
from runtime.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("gaussian_noise@5", "contrast@5", "defocus_blur@5", "pixelate@5")


@pytest.fixture(scope="module")
def folded_bundle(digits_checkpoint: tuple[Path, str], digits_arrays: tuple[np.ndarray, ...],
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits checkpoint exported with a folded fp32 model beside the adaptable one (no int8)."""
    from exporter.bundle import export_bundle

    x_train, y_train, x_test, _ = digits_arrays
    return export_bundle(digits_checkpoint[0], tmp_path_factory.mktemp("folded") / "bundle",
                         labels=[str(i) for i in range(10)], calibration_x=x_train[:64], golden_x=x_test[:8],
                         source_x=x_train, source_y=y_train, int8=False, folded=True, name="digits-folded")


@pytest.fixture(scope="module")
def predictor(folded_bundle: Path) -> Predictor:
    bundle = load_bundle(folded_bundle, model="folded_fp32", threads=1)
    assert bundle.model.graph == "folded"
    return Predictor(bundle)


@pytest.fixture(scope="module")
def class_sorted(digits_test: tuple[np.ndarray, np.ndarray]) -> Any:
    from edgeloop.data import Dataset, build_stream

    x, y = digits_test
    return build_stream(Dataset(x, y, [str(i) for i in range(10)], "digits"), DOMAINS, len(y), seed=0,
                        order="class_sorted")


def _accuracy(name: str, model: Any, stream: Any, batch: int = 64) -> float:
    method, hits = create_tta_method(name), 0
    for i in range(0, len(stream.y), batch):
        hits += int((method.predict(model, stream.x[i : i + batch]).probs.argmax(1) == stream.y[i : i + batch]).sum())
    return hits / len(stream.y)


@pytest.mark.parametrize("name", ["source", "lame", "t3a"])
def test_output_methods_agree_on_the_folded_and_the_adaptable_graph(name: str, predictor: Predictor,
                                                                    folded_bundle: Path, class_sorted: Any) -> None:
    adaptable = AdaptableModel(load_bundle(folded_bundle, model="fp32", threads=1))
    # on the source pass (statistics=None) both graphs serve the same outputs; by default an adaptable graph
    # gets the α-BN pass instead (see test_tta_methods)
    config = {"source": None, "lame": LAMEConfig(statistics=None), "t3a": T3AConfig(statistics=None)}[name]
    folded_method, adaptable_method = create_tta_method(name, config), create_tta_method(name, config)
    agree = total = 0
    for i in range(0, 640, 64):
        x = class_sorted.x[i : i + 64]
        a, b = folded_method.predict(predictor, x), adaptable_method.predict(adaptable, x)
        np.testing.assert_allclose(a.features, b.features, atol=1e-3)
        agree += int((a.probs.argmax(1) == b.probs.argmax(1)).sum())
        total += len(x)
    assert agree / total >= 0.99


def test_lame_and_t3a_through_the_predictor_on_a_class_sorted_stream(predictor: Predictor, class_sorted: Any) -> None:
    results = {name: _accuracy(name, predictor, class_sorted) for name in ("source", "lame", "t3a")}
    print(f"\nfolded digits model, {' + '.join(DOMAINS)}, class-sorted, batch 64:",
          ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    assert results["lame"] >= results["source"] + 0.03
    assert results["t3a"] >= results["source"]


@pytest.fixture(scope="module")
def shuffled(digits_test: tuple[np.ndarray, np.ndarray]) -> Any:
    """One domain (gaussian noise, severity 3), shuffled, four passes over the test set (about 2200 samples):
    a domain of the four-domain stream is too short for the class-balance detector to settle."""
    from edgeloop.data import Dataset, build_stream

    x, y = digits_test
    passes = [build_stream(Dataset(x, y, [str(i) for i in range(10)], "digits"), ("gaussian_noise@3",), len(y),
                           seed=seed, order="shuffled") for seed in range(4)]
    return SimpleNamespace(x=np.concatenate([p.x for p in passes]), y=np.concatenate([p.y for p in passes]))


def _unchanged_batches(method: Any, model: Predictor, stream: Any, batch: int = 64) -> tuple[int, int]:
    """``(batches whose output is the source model's, batches)`` over the stream."""
    same = total = 0
    for i in range(0, len(stream.y), batch):
        x = stream.x[i : i + batch]
        out, source = method.predict(model, x).probs, create_tta_method("source").predict(model, x).probs
        same += int(np.allclose(out, source, rtol=1e-6, atol=1e-9))
        total += 1
    return same, total


def test_lame_leaves_balanced_batches_to_the_model_and_corrects_class_runs(predictor: Predictor, shuffled: Any,
                                                                          class_sorted: Any) -> None:
    """The class-balance detector gates LAME's Laplacian term: a shuffled stream, once found balanced, gets
    the model's own prediction; a class-sorted one never does. ``balanced_laplacian_weight=None``: every batch
    corrected (the earlier behaviour)."""
    same, total = _unchanged_batches(create_tta_method("lame"), predictor, shuffled)
    assert same >= total // 2, f"{same} of {total} shuffled batches left to the model"
    assert _unchanged_batches(create_tta_method("lame"), predictor, class_sorted)[0] == 0
    always = create_tta_method("lame", LAMEConfig(balanced_laplacian_weight=None))
    assert _unchanged_batches(always, predictor, shuffled)[0] == 0
    state = create_tta_method("lame")
    state.predict(predictor, shuffled.x[:64])
    assert {"stats.balance.score", "stats.balance.input_mean"} <= set(state.snapshot())
    assert always.snapshot() == {}  # ungated on a predictor: no state at all
    with pytest.raises(ValueError, match="balanced_laplacian_weight"):
        LAMEConfig(balanced_laplacian_weight=-1.0)


def test_t3a_aligns_features_to_the_source_statistics(predictor: Predictor, shuffled: Any) -> None:
    """T3A keeps running feature moments (starting at the manifest's source feature statistics) and scores the
    features moved to the source statistics; ``align_features=False`` keeps no moments."""
    from device_agents.tta.models import source_feature_stats
    from device_agents.tta.t3a import align_features

    mean_s, var_s = source_feature_stats(predictor)
    method, plain = create_tta_method("t3a"), create_tta_method("t3a", T3AConfig(align_features=False))
    x = shuffled.x[:64]
    out = method.predict(predictor, x)
    features = create_tta_method("source").predict(predictor, x).features
    np.testing.assert_allclose(out.features, features, rtol=1e-6)  # the pass's own features are returned
    state = method.snapshot()
    keep = method.config.imbalanced_feature_momentum ** 64  # a fresh detector: imbalanced until shown otherwise
    np.testing.assert_allclose(state["feature_mean"], keep * mean_s + (1 - keep) * features.mean(0), rtol=1e-5)
    assert "feature_mean" not in plain.snapshot() and plain.predict(predictor, x).probs.shape == out.probs.shape
    with pytest.raises(ValueError, match="feature_momentum"):
        T3AConfig(feature_momentum=1.0)
    # a stream whose features are the source's shifted and scaled: once the running moments have caught up,
    # the aligned features have the source mean and variance
    rng = np.random.default_rng(0)
    moments: dict[str, np.ndarray] = {}
    for _ in range(400):
        f = (rng.normal(size=(64, len(mean_s))) * np.sqrt(var_s) * 3.0 + mean_s + 2.0).astype(np.float32)
        aligned, moments = align_features(f, moments, (mean_s, var_s), 0.99)
    live = var_s > 1e-6
    np.testing.assert_allclose(aligned.mean(0)[live], mean_s[live], atol=0.5 * np.sqrt(var_s[live]).max())
    ratio = aligned.var(0)[live] / var_s[live]
    assert 0.6 < np.median(ratio) < 1.6


def test_t3a_reads_class_means_through_the_predictor(predictor: Predictor, class_sorted: Any) -> None:
    method = create_tta_method("t3a")
    method.predict(predictor, class_sorted.x[:64])
    means, _, _ = predictor.manifest.class_gaussians(predictor.bundle.root)
    np.testing.assert_array_equal(method.snapshot()["supports"][:, 0], means)


@pytest.mark.parametrize("name", ["lame", "t3a"])
def test_a_model_without_features_is_refused_by_name(name: str, predictor: Predictor, class_sorted: Any) -> None:
    bundle = predictor.bundle
    blind = Predictor(dataclasses.replace(bundle, manifest=dataclasses.replace(bundle.manifest, features_output=None)))
    method = create_tta_method(name)
    with pytest.raises(ModelCapabilityError, match=r"model 'folded_fp32' \(folded graph, onnx\) of bundle "
                                                   r"'digits-folded' declares no features output"):
        method.predict(blind, class_sorted.x[:64])
    assert method.snapshot() == {}
    assert create_tta_method("source").predict(blind, class_sorted.x[:64]).features is None


@pytest.mark.parametrize("name", ["alpha_bn", "foa"])
def test_batch_statistics_methods_refuse_a_folded_model(name: str, predictor: Predictor, class_sorted: Any) -> None:
    with pytest.raises(ModelCapabilityError, match=r"needs an adaptable graph.*'folded_fp32' \(folded graph"):
        create_tta_method(name).predict(predictor, class_sorted.x[:64])


NO_TORCH = """
import importlib, importlib.abc, pkgutil, sys

class NoTorch(importlib.abc.MetaPathFinder):  # any `import torch` raises, as in a device venv without torch
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"{name} is not installed on a device")

sys.meta_path.insert(0, NoTorch())
import numpy as np
import device_agents.tta as tta
for info in pkgutil.iter_modules(tta.__path__):
    importlib.import_module(f"device_agents.tta.{info.name}")
from runtime import AdaptableModel, load_bundle
from runtime.predictor import Predictor

adaptable = AdaptableModel(load_bundle(sys.argv[1]))
predictor = Predictor(load_bundle(sys.argv[2], model="folded_fp32"))
x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
for name in sorted(tta.TTA_METHODS):
    out = tta.create_tta_method(name).predict(adaptable, x)
    assert out.probs.shape == (32, 10), name
for name in ("source", "lame", "t3a"):
    assert tta.create_tta_method(name).predict(predictor, x).probs.shape == (32, 10), name
assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
print("ok", len(tta.TTA_METHODS))
"""


def test_every_tta_module_runs_without_torch(digits_bundle: Path, folded_bundle: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(digits_bundle), str(folded_bundle)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok 5"
