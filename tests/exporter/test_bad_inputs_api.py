"""Bad input to the exporter's Python API gets a clear error naming the problem (not a numpy/torch traceback,
not a silently broken result)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from exporter.bundle import export_bundle
from exporter.bundle_models import BuildOptions
from exporter.compress import FineTuneConfig, LowRankConfig, NMPatternError, NMSparsity, NMSparsityConfig, fine_tune
from exporter.models import ModelSpec
from exporter.onnx_export import export_adaptable_onnx, params_numpy
from exporter.quantize import Int8Config, quantize_int8
from exporter.train import TrainConfig, train_model

SPEC = ModelSpec(1, 4, 8, (0.5,), (0.25,))
LABELS = ["a", "b", "c", "d"]


class TinyNet(nn.Module):
    """conv (fan-in 8·1·1 for the second one, so 2:4 applies) – BN – ReLU – pool – linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _data(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 4, n)


def _export(model: nn.Module, out: Path, **kwargs: Any) -> Path:
    x, y = _data()
    args: dict[str, Any] = {"labels": LABELS, "calibration_x": x, "golden_x": x[:2], "source_x": x,
                            "source_y": y, "int8": False}
    args.update(kwargs)
    return export_bundle((model.eval(), "tiny", SPEC, "0" * 64), out, **args)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    model = TinyNet()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'classifier\.weight' holds NaN"):
        _export(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_nm_without_a_sparsity_report_still_needs_sparse_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(NMPatternError, match="only 0 weights satisfy 2:4"):
        _export(TinyNet(), tmp_path / "b", nm=(2, 4))


def test_bad_tflite_int8_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="tflite_int8 must be one of"):
        BuildOptions(tflite_int8="nope")


def test_eval_x_of_another_sample_shape_is_named(tmp_path: Path) -> None:
    x, _ = _data()
    model = TinyNet().eval()
    export_adaptable_onnx(model, tmp_path / "f.onnx", torch.from_numpy(x[:2]), parity_x=x[:2])
    with pytest.raises(ValueError, match=r"eval_x has sample shape \(1, 4, 8\)"):
        quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", x, params_numpy(model), eval_x=x[:, :, :4])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_samples": 2.5}, "max_samples must be an integer"),
    ({"batch_size": "8"}, "batch_size must be an integer"),
    ({"float_convs_below_channels": "3"}, "float_convs_below_channels must be an integer"),
    ({"min_agreement": "0.5"}, "min_agreement"),
    ({"op_types": "Conv"}, "not the string 'Conv'"),
])
def test_int8_config_types_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Int8Config(**kwargs)


def test_a_single_sample_cannot_train_or_fine_tune() -> None:
    x, y = _data(1)
    with pytest.raises(ValueError, match="train_x needs at least 2 samples"):
        train_model("small_cnn", x, y, TrainConfig(epochs=1, threads=1))
    model = TinyNet()
    sparsity = NMSparsity(NMSparsityConfig(exclude=("features.0",)))
    sparsity.prepare(model)
    with pytest.raises(ValueError, match="fine-tune x needs at least 2 samples"):
        fine_tune(model, sparsity, x, y, FineTuneConfig(epochs=1, threads=1))


def test_augment_fn_returning_nan_is_refused() -> None:
    x, y = _data()
    config = TrainConfig(epochs=2, threads=1, augment=True, seed=1)
    with pytest.raises(ValueError, match="augment_fn returned NaN"):
        train_model("small_cnn", x, y, config, augment_fn=lambda b, rng: b * np.nan)


@pytest.mark.parametrize(("factory", "match"), [
    (lambda: TrainConfig(lr="1"), "lr must be positive"),
    (lambda: TrainConfig(weight_decay=None), "weight_decay must be"),
    (lambda: LowRankConfig.from_string("energy=1e"), "low-rank spec must look like"),
    (lambda: NMSparsityConfig(exclude=None), "exclude must be a sequence"),
    (lambda: LowRankConfig(exclude=3), "exclude must be a sequence"),
])
def test_config_type_errors_name_the_option(factory: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
