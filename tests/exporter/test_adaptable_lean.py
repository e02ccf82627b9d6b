"""The lean adaptable ONNX graph: parity with torch on every architecture, the sign guard, interface, fallback."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from exporter import onnx_export
from exporter.adaptable import AdaptableGraph
from exporter.models import ModelSpec, build_model
from exporter.onnx_export import check_parity, export_adaptable_onnx, make_feeds, params_numpy, torch_reference
from exporter.onnx_graph import MARKER_DOMAIN, GraphBuildError, LeanOptions, build_lean_adaptable, expand_alpha_norms

ARCHS = ("small_cnn", "wide_cnn", "smallcnn", "resnet8")
SIZE = 8


def random_model(arch: str, channels: int = 1, seed: int = 0) -> nn.Module:
    """A seeded random-weight model (8×8 inputs) with γ, β drawn at random and BN statistics calibrated."""
    torch.manual_seed(seed)
    spec = ModelSpec(channels, 10, SIZE, (0.3,) * channels, (0.4,) * channels)
    model = build_model(arch, spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(3):
            model(torch.rand(32, channels, SIZE, SIZE))
    return model.eval()


def inputs(n: int, channels: int = 1, seed: int = 1) -> np.ndarray:
    """``n`` random [0, 1] images."""
    return np.random.default_rng(seed).random((n, channels, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module")
def lean_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """Every architecture, random weights (resnet8 with 3 input channels), exported lean once."""
    out: dict[str, tuple[nn.Module, Path]] = {}
    for arch in ARCHS:
        channels = 3 if arch == "resnet8" else 1
        model = random_model(arch, channels)
        path = tmp_path_factory.mktemp("lean") / f"{arch}.onnx"
        export_adaptable_onnx(model, path, torch.from_numpy(inputs(2, channels)), parity_x=inputs(16, channels))
        out[arch] = (model, path)
    return out


def _channels(model: nn.Module) -> int:
    return int(model.spec.in_channels)  # type: ignore[union-attr]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_parity_every_arch_alpha_and_batch(lean_models: dict, arch: str, batch: int) -> None:
    model, path = lean_models[arch]
    x = inputs(batch, _channels(model), seed=batch)
    report = check_parity(model, path, x, params_numpy(model), [0.0, 0.5, 1.0], atol=1e-4, rtol=1e-4)
    assert report.top1_agreement == 1.0 and max(report.max_abs_diff.values()) < 1e-4


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_trained_digits_model_parity(digits_model: tuple, digits_arrays: tuple, tmp_path: Path, batch: int) -> None:
    model = digits_model[0]
    x = digits_arrays[2][:batch]
    path = tmp_path / "digits.onnx"
    export_adaptable_onnx(model, path, torch.from_numpy(x[:2]), parity_x=x)
    report = check_parity(model, path, x, params_numpy(model), [0.0, 0.5, 1.0], atol=1e-4, rtol=1e-4)
    assert report.top1_agreement == 1.0


def _train_mode(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits of torch train-mode BatchNorm and the biased batch statistics of each BN layer's input."""
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


@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_one_is_train_mode_batchnorm(lean_models: dict, arch: str) -> None:
    model, path = lean_models[arch]
    x = inputs(32, _channels(model), seed=5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, make_feeds(x, params_numpy(model), 1.0)), strict=True))
    logits, stats = _train_mode(model, x)
    np.testing.assert_allclose(got["logits"], logits, atol=1e-5, rtol=1e-5)
    for name, ref in zip(names[2:], stats, strict=True):
        np.testing.assert_allclose(got[name], ref, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_negative_gamma_takes_the_exact_branch(lean_models: dict, alpha: float) -> None:
    """smallcnn's BN → ReLU → MaxPool layers pool first only when γ ≥ 0; a negative γ must still be exact."""
    model, path = lean_models["smallcnn"]
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["If"] == 2  # both pooled layers are guarded
    params = params_numpy(model)
    params["bn1.weight"] = params["bn1.weight"] * np.where(np.arange(16) % 3 == 0, -1.0, 1.0).astype(np.float32)
    params["bn2.weight"] = -params["bn2.weight"]
    x = inputs(16, seed=7)
    report = check_parity(model, path, x, params, [alpha], atol=1e-4, rtol=1e-4)
    assert report.top1_agreement == 1.0
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pooled_first = plain.run(["logits"], make_feeds(x, params_numpy(model), alpha))[0]
    assert np.abs(pooled_first - torch_reference(model, x, params, alpha)["logits"]).max() > 1e-3


def test_graph_interface_is_the_adaptable_graph(lean_models: dict) -> None:
    for arch, (model, path) in lean_models.items():
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        graph = AdaptableGraph(model)
        assert [i.name for i in proto.graph.input] == graph.input_names(), arch
        assert [o.name for o in proto.graph.output] == graph.output_names(), arch
        assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)], arch
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), arch
        assert not any(n.domain == MARKER_DOMAIN for n in proto.graph.node), arch
        dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*proto.graph.input, *proto.graph.output]}
        assert dims["input"][0] == "batch" and dims["logits"][0] == "batch" and dims["alpha"] == []


def test_lean_graph_is_smaller_than_the_traced_one(lean_models: dict, tmp_path: Path) -> None:
    model, lean_path = lean_models["resnet8"]
    traced = tmp_path / "traced.onnx"
    export_adaptable_onnx(model, traced, torch.from_numpy(inputs(2, 3)), lean=False)
    lean_ops = Counter(n.op_type for n in onnx.load(str(lean_path)).graph.node)
    traced_ops = Counter(n.op_type for n in onnx.load(str(traced)).graph.node)
    assert sum(lean_ops.values()) < 0.8 * sum(traced_ops.values())
    assert lean_ops["BatchNormalization"] == 9 and lean_ops["Pow"] == 0 and traced_ops["Pow"] == 9
    assert lean_ops["Conv"] == traced_ops["Conv"] == 9  # the statistics never add a convolution by default


def test_statistics_are_well_conditioned_far_from_zero(tmp_path: Path) -> None:
    """Activations with a large mean: E[z²] − E[z]² in float32 loses the variance unless z is first shifted by
    the source mean (through the convolution bias), which the lean graph does."""
    model = random_model("small_cnn")
    with torch.no_grad():
        model.features[0].bias = nn.Parameter(torch.full((16,), 50.0))
        model.features[1].running_mean += 50.0
    x = inputs(64, seed=3)
    _, stats = _train_mode(model, x)  # float64 statistics of the float32 activations
    errors = {}
    for shift in (True, False):
        path = tmp_path / f"shift_{shift}.onnx"
        build_lean_adaptable(model, path, torch.from_numpy(x[:2]), LeanOptions(shift=shift))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["bn1.batch_var"], make_feeds(x, params_numpy(model), 1.0))[0]
        errors[shift] = float(np.abs(got / stats[1] - 1).max())
    assert errors[True] < 1e-5 < errors[False]


def test_statistics_free_graph_is_eval_mode(lean_models: dict, tmp_path: Path) -> None:
    model, _ = lean_models["smallcnn"]
    path = tmp_path / "nostats.onnx"
    build_lean_adaptable(model, path, torch.from_numpy(inputs(2)), LeanOptions(statistics=False))
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = inputs(9)
    got = sess.run(["logits"], make_feeds(x, params_numpy(model), 0.7))[0]
    np.testing.assert_allclose(got, torch_reference(model, x, params_numpy(model), 0.0)["logits"], atol=1e-4)


def test_unsupported_graph_falls_back_to_tracing(lean_models: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = lean_models["small_cnn"]

    def refuse(*args: object, **kwargs: object) -> None:
        raise GraphBuildError("not this one")

    monkeypatch.setattr(onnx_export, "build_lean_adaptable", refuse)
    path = tmp_path / "fallback.onnx"
    names = export_adaptable_onnx(model, path, torch.from_numpy(inputs(2)), parity_x=inputs(8))
    assert names == AdaptableGraph(model).output_names()
    assert "Pow" in {n.op_type for n in onnx.load(str(path)).graph.node}  # the traced α-mix


def test_expand_refuses_a_graph_without_markers(lean_models: dict) -> None:
    _, path = lean_models["small_cnn"]
    with pytest.raises(GraphBuildError, match="no normalisation marker"):
        expand_alpha_norms(onnx.load(str(path)), {})
