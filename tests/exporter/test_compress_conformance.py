"""Conformance battery run over every registered compression pass (``exporter.compress.PASSES``).

Each pass must: keep the adaptable graph (same ``norm_layers``, ``functional_forward`` works), export to ONNX
with parity after ``finalize``, leave no parametrization behind, return a JSON-ready report naming itself,
refuse out-of-order lifecycle calls, name unsupported layers (path, type, pass) and honour ``exclude``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import exporter.compress  # noqa: F401  (registers every built-in pass)
from exporter.adaptable import functional_forward, norm_layers, source_params
from exporter.compress import PASSES, CompressionError, CompressionPass, UnsupportedLayerError
from exporter.models import ModelSpec, build_model
from exporter.onnx_export import export_adaptable_onnx
from exporter.train import torch_threads

SPEC = ModelSpec(1, 10, 8, (0.3,), (0.4,))
FIRST_CONV = {"small_cnn": "features.0", "smallcnn": "features.0", "resnet8": "stem"}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(params=sorted(PASSES))
def pass_class(request: pytest.FixtureRequest) -> type[CompressionPass]:
    return PASSES[request.param]


class WithConv1d(nn.Module):
    """A model with a layer no pass handles (Conv1d) next to supported ones."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.odd = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x).mean(dim=3)
        return self.head(self.odd(z).mean(dim=2))


class SharedLayer(nn.Module):
    """Weight sharing by aliasing: one ``Linear(16, 16)`` registered as ``mix`` and ``again`` and applied twice
    (its weight has rank 2, so low-rank factorizes it exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.mix = nn.Linear(16, 16)
        self.again = self.mix
        self.classifier = nn.Linear(16, 4)
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(16, 2) @ torch.randn(2, 16) / 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.again(torch.relu(self.mix(self.features(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def test_shared_module_is_compressed_once_under_every_path(
    pass_class: type[CompressionPass], tmp_path: Path
) -> None:
    """Low-rank used to factorize only the first name of a shared module and leave the second dense."""
    torch.manual_seed(0)
    model = SharedLayer().eval()
    x = torch.rand(8, 1, 8, 8)
    dense = sum(p.numel() for p in model.parameters())
    p = pass_class(pass_class.config_type(exclude=("features.0",)))
    model = p.finalize(p.prepare(model)).eval()
    assert model.again is model.mix  # still one module: every name refers to the compressed one
    assert type(model.mix) is not nn.Linear or bool((model.mix.weight == 0).any())  # and it was compressed
    assert sum(p.numel() for p in model.parameters()) <= dense
    report = p.report()
    assert report["layers"]["mix"]["aliases"] == ["again"] and "again" not in report["layers"]
    export_adaptable_onnx(model, tmp_path / "m.onnx", x, parity_x=x)


def test_exclude_must_name_every_path_of_a_shared_module(pass_class: type[CompressionPass]) -> None:
    with pytest.raises(ValueError, match=r"one module is registered as 'mix' and 'again'; exclude matches "
                                         r"\['again'\] but not \['mix'\]"):
        pass_class(pass_class.config_type(exclude=("features.0", "again"))).prepare(SharedLayer())
    model = SharedLayer()
    before = model.mix.weight.detach().clone()
    p = pass_class(pass_class.config_type(exclude=("features.0", "mix", "again")))
    model = p.finalize(p.prepare(model))
    assert p.report()["excluded"] == ["features.0", "mix"]
    assert type(model.mix) is nn.Linear and model.again is model.mix and torch.equal(model.mix.weight, before)


@pytest.mark.parametrize("arch", ["small_cnn", "smallcnn", "resnet8"])
def test_pass_keeps_adaptable_graph_and_exports(pass_class: type[CompressionPass], arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(arch, SPEC).eval()
    layers = norm_layers(model)
    x = torch.rand(8, 1, 8, 8)
    p = pass_class(pass_class.config_type(exclude=(FIRST_CONV[arch],)))
    model = p.finalize(p.prepare(model)).eval()
    assert norm_layers(model) == layers
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    logits, features, stats = functional_forward(model, x, source_params(model), 0.5)
    assert logits.shape == (8, 10) and features.shape == (8, 64) and len(stats) == 2 * len(layers)
    export_adaptable_onnx(model, tmp_path / "m.onnx", x)
    report = p.report()
    assert report["pass"] == pass_class.name and report["excluded"] and json.loads(json.dumps(report)) == report
    assert report["config"]["exclude"] == [FIRST_CONV[arch]]


def test_unsupported_layer_is_named_with_path_type_and_pass(pass_class: type[CompressionPass]) -> None:
    with pytest.raises(UnsupportedLayerError) as err:
        pass_class(pass_class.config_type()).prepare(WithConv1d())
    assert (err.value.path, err.value.layer_type, err.value.pass_name) == ("odd", "Conv1d", pass_class.name)
    message = str(err.value)
    assert all(part in message for part in ("'odd'", "Conv1d", pass_class.name, "exclude=('odd',)"))


def test_exclude_glob_leaves_layer_untouched(pass_class: type[CompressionPass]) -> None:
    model = WithConv1d()
    before = model.odd.weight.detach().clone()
    p = pass_class(pass_class.config_type(exclude=("od*",)))
    model = p.finalize(p.prepare(model))
    assert torch.equal(model.odd.weight, before) and type(model.odd) is nn.Conv1d
    assert p.report()["excluded"] == ["odd"]
    assert model(torch.rand(2, 4, 8, 8)).shape == (2, 4)


def test_lifecycle_order_is_enforced(pass_class: type[CompressionPass]) -> None:
    p = pass_class(pass_class.config_type(exclude=("features.0",)))
    model = build_model("small_cnn", SPEC)
    with pytest.raises(CompressionError, match="cannot finalize in state 'new'"):
        p.finalize(model)
    with pytest.raises(CompressionError, match="cannot report"):
        p.report()
    p.prepare(model)
    with pytest.raises(CompressionError, match="cannot prepare in state 'prepared'"):
        p.prepare(model)
    with pytest.raises(ValueError, match="progress"):
        p.step(1.5)
    p.step(0.5)
    p.finalize(model)
    with pytest.raises(CompressionError, match="cannot step"):
        p.step(0.5)
