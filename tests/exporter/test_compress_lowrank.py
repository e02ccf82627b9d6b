"""SVD low-rank pass: rank selection by energy and by budget, exact factor shapes, adaptable graph and export."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from exporter.adaptable import functional_forward, norm_layers, source_params
from exporter.compress import FineTuneConfig, LowRank, LowRankConfig, UnsupportedLayerError, compose, fine_tune
from exporter.compress.lowrank import energy_rank, reconstruction_error
from exporter.models import ModelSpec, build_model
from exporter.onnx_export import export_adaptable_onnx
from exporter.train import evaluate, torch_threads


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Single-threaded torch: on the shared 2-core CPUs this is far faster for these small models."""
    with torch_threads(1):
        yield


SINGULAR = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # energy 16, 9, 4, 1, 0.25 of 30.25


def _with_spectrum(out_dim: int, in_dim: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_dim, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_dim, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.8, 2), (0.83, 3), (0.95, 3), (0.96, 4), (0.99, 4),
                                              (0.995, 5), (1.0, 5)])
def test_energy_threshold_picks_smallest_sufficient_rank(energy: float, rank: int) -> None:
    assert energy_rank(SINGULAR, energy) == rank
    layer = nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight.copy_(_with_spectrum(16, 32, SINGULAR))
    dense = layer.weight.detach().numpy().copy()
    model = nn.Sequential(layer)
    p = LowRank(LowRankConfig(energy=energy))
    compose(model, [p])
    entry = p.report()["layers"]["0"]
    assert entry["rank"] == rank and entry["full_rank"] == 16
    kept = float((SINGULAR[:rank] ** 2).sum() / (SINGULAR**2).sum())
    assert entry["energy"] == pytest.approx(kept, abs=1e-6)
    # Eckart–Young: the relative Frobenius error of the best rank-r approximation is sqrt(1 - kept energy)
    assert reconstruction_error(dense, model[0]) == pytest.approx(math.sqrt(1 - kept), abs=1e-5)
    assert entry["params_after"] == rank * (16 + 32) and entry["params_before"] == 16 * 32


def test_rank_multiple_rounds_ranks_up() -> None:
    layer = nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight.copy_(_with_spectrum(16, 32, SINGULAR))
    p = LowRank(LowRankConfig(energy=0.95, rank_multiple=4))
    compose(nn.Sequential(layer), [p])
    assert p.report()["layers"]["0"]["rank"] == 4


def test_conv_factorization_keeps_stride_padding_dilation_and_is_exact_at_its_rank() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(_with_spectrum(12, 54, SINGULAR[:4]).reshape(12, 6, 3, 3))
    model = nn.Sequential(conv)
    x = torch.randn(2, 6, 11, 11)
    ref = model(x).detach()
    p = LowRank(LowRankConfig(energy=1.0))
    compose(model, [p])
    first, second = model[0]
    assert (first.kernel_size, first.stride, first.padding, first.dilation) == ((3, 3), (2, 2), (2, 2), (2, 2))
    assert first.out_channels == 4 and first.bias is None and second.kernel_size == (1, 1)
    assert torch.allclose(model(x), ref, atol=1e-5)
    assert p.report()["layers"]["0"]["params_after"] == 4 * 54 + 12 * 4


def test_layers_that_would_not_shrink_are_skipped_and_recorded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10))  # random: rank ~10 needed, 10·74 > 640
    before = model[0].weight.detach().clone()
    p = LowRank(LowRankConfig(energy=0.95))
    compose(model, [p])
    report = p.report()
    assert report["layers"] == {} and "would not reduce its 640 weights" in report["skipped"]["0"]
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_budget_is_respected_across_layers(budget: float) -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", ModelSpec(3, 10, 16, (0.5,) * 3, (0.25,) * 3))
    targets = {p: m.weight.numel() for p, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    p = LowRank(LowRankConfig(budget=budget))
    compose(model, [p])
    report = p.report()
    assert report["params_before"] == sum(targets.values())
    after = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    assert after == report["params_after"] <= budget * report["params_before"]
    assert report["params_after"] > (budget - 0.1) * report["params_before"]  # greedy uses the budget


def test_budget_below_rank_one_everywhere_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"budget 0\.001 allows"):
        compose(build_model("small_cnn", ModelSpec(1, 10, 8, (0.3,), (0.4,))), [LowRank(LowRankConfig(budget=0.001))])


def test_budget_spends_rank_where_energy_is_concentrated() -> None:
    a, b = nn.Linear(32, 16), nn.Linear(32, 16)
    with torch.no_grad():
        a.weight.copy_(_with_spectrum(16, 32, SINGULAR, seed=1))  # energy in 5 directions
        b.weight.copy_(_with_spectrum(16, 32, torch.ones(16, dtype=torch.float64), seed=2))  # flat spectrum
    p = LowRank(LowRankConfig(budget=0.25))  # 256 of 1024 weights: 5 ranks of 48 each
    compose(nn.Sequential(a, b), [p])
    layers = p.report()["layers"]
    # gains per rank: a 16/30.25, 9/30.25, 4/30.25, 1/30.25 …; b 1/16 each: a gets ranks 1–3, b ranks 1–2
    assert layers["0"]["rank"] == 3 and layers["1"]["rank"] == 2


@pytest.mark.parametrize("arch", ["smallcnn", "resnet8"])
def test_lifecycle_keeps_adaptable_graph_and_exports_with_parity(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(1, 10, 8, (0.3,), (0.4,))
    model = build_model(arch, spec).eval()
    with torch.no_grad():  # a low-rank head, so the budget certainly factorizes the classifier too
        model.classifier.weight.copy_(_with_spectrum(10, 64, SINGULAR[:2]).float())
    layers = norm_layers(model)
    x = torch.rand(16, 1, 8, 8)
    with torch_threads(1):
        p = LowRank(LowRankConfig(budget=0.5))
        model = p.prepare(model)
        model = p.finalize(model).eval()
        assert norm_layers(model) == layers
        assert any(isinstance(m, nn.Sequential) and "classifier" in path for path, m in model.named_modules())
        logits, features, stats = functional_forward(model, x, source_params(model), 0.5)
        assert logits.shape == (16, 10) and features.shape == (16, 64) and len(stats) == 2 * len(layers)
        names = export_adaptable_onnx(model, tmp_path / f"{arch}.onnx", x)
    assert names[:2] == ["logits", "features"]
    assert p.report()["params_after"] <= 0.5 * p.report()["params_before"]


def test_fine_tune_recovers_accuracy_on_digits(digits_model: tuple, digits_arrays: tuple) -> None:
    x_train, y_train, x_test, y_test = digits_arrays
    dense = evaluate(digits_model[0], x_test, y_test)
    with torch_threads(1):
        model = copy.deepcopy(digits_model[0])
        p = LowRank(LowRankConfig(budget=0.3, exclude=("features.0",)))
        model = p.prepare(model)
        factored = evaluate(model, x_test, y_test)
        fine_tune(model, p, x_train, y_train, FineTuneConfig(epochs=4, lr=2e-3))
        model = p.finalize(model)
    tuned = evaluate(model, x_test, y_test)
    print(f"digits small_cnn low-rank budget 0.3: dense {dense:.4f} factored {factored:.4f} fine-tuned {tuned:.4f}")
    assert factored < dense - 0.02 and tuned >= dense - 0.02
    assert p.report()["fine_tune"]["steps"] == 4 * math.ceil(len(x_train) / 64)
    assert not np.isnan(p.report()["fine_tune"]["loss"])


class _TiedPair(nn.Module):
    """Two Linear layers holding one weight ``nn.Parameter`` (tied weights: distinct modules, shared tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        with torch.no_grad():
            self.a.weight.copy_(_with_spectrum(16, 16, SINGULAR[:2]).float())
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_are_refused_naming_both_layers() -> None:
    """Factorizing replaces the shared parameter: the two layers used to get separate factors (untied)."""
    model = _TiedPair()
    with pytest.raises(UnsupportedLayerError, match=r"low_rank: layer 'a' \(Linear\).*its weight is tied to 'b' "
                                                    r"\(the same nn.Parameter\).*\(also unsupported: b\)"):
        LowRank().prepare(model)
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear and model.b.weight is model.a.weight
    p = LowRank(LowRankConfig(exclude=("a", "b")))
    compose(model, [p])
    assert p.report()["excluded"] == ["a", "b"] and model.b.weight is model.a.weight
