"""The folded ONNX form: BatchNorm folded away, logits and features, dynamic batch, parity with eval mode."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.onnx_export import ExportParityError
from exporter.onnx_fold import FOLDED_OUTPUTS, check_folded_parity, export_folded_onnx, torch_eval_outputs
from tests.exporter.test_adaptable_lean import ARCHS, inputs, random_model


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Every architecture (random weights) exported folded once."""
    out = {}
    for arch in ARCHS:
        channels = 3 if arch == "resnet8" else 1
        model = random_model(arch, channels)
        path = tmp_path_factory.mktemp("folded") / f"{arch}.onnx"
        assert export_folded_onnx(model, path, torch.from_numpy(inputs(2, channels))) == list(FOLDED_OUTPUTS)
        out[arch] = (model, path)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_no_batchnorm_and_interface(folded: dict, arch: str) -> None:
    _, path = folded[arch]
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") >= 2
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    assert proto.opset_import[0].version == 17
    assert all(v.type.tensor_type.shape.dim[0].dim_param == "batch" for v in [*proto.graph.input, *proto.graph.output])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_matches_eval_mode(folded: dict, arch: str, batch: int) -> None:
    model, path = folded[arch]
    channels = 3 if arch == "resnet8" else 1
    report = check_folded_parity(model, path, inputs(batch, channels, seed=batch), atol=1e-4, rtol=1e-4)
    assert report.samples == batch and report.top1_agreement == 1.0
    assert max(report.max_abs_diff.values()) < 1e-4


def test_trained_digits_model(digits_model: tuple, digits_arrays: tuple, tmp_path: Path) -> None:
    model = digits_model[0]
    x_test, y_test = digits_arrays[2], digits_arrays[3]
    export_folded_onnx(model, tmp_path / "digits.onnx", torch.from_numpy(x_test[:2]), parity_x=x_test)
    report = check_folded_parity(model, tmp_path / "digits.onnx", x_test)
    assert report.top1_agreement == 1.0
    assert (torch_eval_outputs(model, x_test)["logits"].argmax(1) == y_test).mean() > 0.9
    assert not model.training


def test_changed_weights_fail_parity(folded: dict) -> None:
    model, path = folded["smallcnn"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.weight[0, 0] += 1.0
    with pytest.raises(ExportParityError, match=r"folded output 'logits' differs from torch eval mode"):
        check_folded_parity(other, path, inputs(8))


def test_example_must_be_nchw(folded: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        export_folded_onnx(folded["small_cnn"][0], tmp_path / "m.onnx", torch.zeros(1, 8, 8))


def test_training_mode_is_restored(tmp_path: Path) -> None:
    model = random_model("small_cnn").train()
    export_folded_onnx(model, tmp_path / "m.onnx", torch.from_numpy(inputs(2)))
    assert model.training
    assert np.isfinite(torch_eval_outputs(model, inputs(3))["features"]).all() and model.training
