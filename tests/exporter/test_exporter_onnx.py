"""Adaptable ONNX export: interface, dynamic batch, parity with torch at α 0/0.5/1, parity failures."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from exporter import onnx_export
from exporter.adaptable import AdaptableGraph
from exporter.onnx_export import (
    ExportParityError,
    check_parity,
    export_adaptable_onnx,
    make_feeds,
    params_numpy,
    torch_reference,
)


@pytest.fixture(scope="module")
def exported(digits_model: tuple, digits_arrays: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model exported once for this module (traced at batch 2, checked on 32 test samples)."""
    model = digits_model[0]
    x_test = digits_arrays[2]
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    names = export_adaptable_onnx(model, path, torch.from_numpy(x_test[:2]), parity_x=x_test[:32])
    assert names == AdaptableGraph(model).output_names()
    return path


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graph_interface_and_dynamic_batch(exported: Path, digits_model: tuple) -> None:
    graph = AdaptableGraph(digits_model[0])
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == 17
    assert [i.name for i in proto.graph.input] == graph.input_names()
    assert [o.name for o in proto.graph.output] == graph.output_names()
    assert graph.output_names()[:2] == ["logits", "features"] and "bn3.batch_var" in graph.output_names()

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    shapes = {v.name: dims(v) for v in [*proto.graph.input, *proto.graph.output]}
    assert shapes["input"] == ["batch", 1, 8, 8] and shapes["alpha"] == []
    assert shapes["logits"] == ["batch", 10] and shapes["features"] == ["batch", 64]
    assert shapes["bn1.weight"] == [16] and shapes["bn2.mean"] == [32] and shapes["bn3.batch_var"] == [64]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in proto.graph.input)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_parity_with_torch(exported: Path, digits_model: tuple, digits_arrays: tuple, alpha: float, batch: int
                           ) -> None:
    model = digits_model[0]
    x = digits_arrays[2][:batch]
    report = check_parity(model, exported, x, params_numpy(model), [alpha], atol=1e-4, rtol=1e-4)
    assert report.samples == batch and report.top1_agreement == 1.0
    assert max(report.max_abs_diff.values()) < 1e-4


def _train_mode_reference(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits of torch train-mode BatchNorm and the biased batch statistics each BN layer saw."""
    net = copy.deepcopy(model).train()
    seen: list[np.ndarray] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        z = args[0].detach().double()
        seen.extend((z.mean((0, 2, 3)).numpy(), z.var((0, 2, 3), unbiased=False).numpy()))

    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(hook)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    return logits, seen


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_alpha_one_equals_train_mode_batchnorm(exported: Path, digits_model: tuple, digits_arrays: tuple,
                                               batch: int) -> None:
    model = digits_model[0]
    x = digits_arrays[2][:batch]
    sess = _session(exported)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, make_feeds(x, params_numpy(model), 1.0)), strict=True))
    logits, stats = _train_mode_reference(model, x)
    np.testing.assert_allclose(got["logits"], logits, atol=1e-5, rtol=1e-5)
    for name, ref in zip(names[2:], stats, strict=True):
        np.testing.assert_allclose(got[name], ref, atol=1e-5, rtol=1e-5, err_msg=name)


def test_fed_parameters_are_live_inputs(exported: Path, digits_model: tuple, digits_arrays: tuple) -> None:
    """Changing the fed γ/β/μ/σ² changes the output exactly as the torch functional forward does."""
    model = digits_model[0]
    x = digits_arrays[2][:16]
    rng = np.random.default_rng(1)
    params = {k: (v * rng.uniform(0.5, 1.5, v.shape) + (0 if k.endswith("var") else 0.1)).astype(np.float32)
              for k, v in params_numpy(model).items()}
    sess = _session(exported)
    got = sess.run(["logits", "features"], make_feeds(x, params, 0.3))
    ref = torch_reference(model, x, params, 0.3)
    base = sess.run(["logits"], make_feeds(x, params_numpy(model), 0.3))[0]
    assert np.abs(got[0] - base).max() > 1e-2
    np.testing.assert_allclose(got[0], ref["logits"], atol=1e-4)
    np.testing.assert_allclose(got[1], ref["features"], atol=1e-4)


def test_corrupted_weight_raises_parity_error(exported: Path, digits_model: tuple, digits_arrays: tuple) -> None:
    other = copy.deepcopy(digits_model[0])
    with torch.no_grad():
        other.classifier.weight[0, 0] += 0.5
    with pytest.raises(ExportParityError, match=r"'logits' at alpha=0\.0 .*max \|diff\| [0-9.e+-]+"):
        check_parity(other, exported, digits_arrays[2][:8], params_numpy(other))


def test_zero_tolerance_makes_export_fail(digits_model: tuple, digits_arrays: tuple, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "PARITY_ATOL", 0.0)
    monkeypatch.setattr(onnx_export, "PARITY_RTOL", 0.0)
    x = torch.from_numpy(digits_arrays[2][:8])
    with pytest.raises(ExportParityError, match="differs from torch"):
        export_adaptable_onnx(digits_model[0], tmp_path / "m.onnx", x)


def test_example_must_be_nchw(digits_model: tuple, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        export_adaptable_onnx(digits_model[0], tmp_path / "m.onnx", torch.zeros(1, 8, 8))
