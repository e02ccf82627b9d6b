"""The opt-in lean graph whose batch statistics come from the first k samples (``LeanOptions(stats_samples=k)``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from exporter.adaptable import AdaptableGraph, functional_forward
from exporter.onnx_export import check_parity, export_adaptable_onnx, make_feeds, params_numpy
from exporter.onnx_graph import STATS_SAMPLES_KEY, LeanOptions, build_lean_adaptable, stats_samples_of
from exporter.quantize import Int8Config, quantize_int8
from tests.exporter.test_adaptable_lean import SIZE, inputs, random_model

K = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path, Path]]:
    """smallcnn (pool-first layers under an ``If``) and resnet8 (residual adds), each exact and split at K."""
    out = {}
    for arch, channels in (("smallcnn", 1), ("resnet8", 3)):
        model = random_model(arch, channels)
        root = tmp_path_factory.mktemp(arch)
        example = torch.from_numpy(inputs(2, channels, 0))
        build_lean_adaptable(model, root / "exact.onnx", example)
        build_lean_adaptable(model, root / "split.onnx", example, LeanOptions(stats_samples=K))
        out[arch] = (model, root / "exact.onnx", root / "split.onnx")
    return out


def _run(path: Path, x: np.ndarray, params: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, make_feeds(x, params, alpha)), strict=True))


def _reference(model: nn.Module, x: np.ndarray, params: dict[str, np.ndarray], alpha: float,
               samples: int | None) -> dict[str, np.ndarray]:
    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    with torch.no_grad():
        logits, features, stats = functional_forward(model, torch.from_numpy(x), tparams, alpha, stats_samples=samples)
    names = AdaptableGraph(model).output_names()
    return {n: t.numpy() for n, t in zip(names, [logits, features, *stats], strict=True)}


@pytest.mark.parametrize("arch", ["smallcnn", "resnet8"])
@pytest.mark.parametrize("batch", [1, K, K + 1, 13])
def test_split_graph_matches_torch_with_the_first_k_samples(built: dict, arch: str, batch: int) -> None:
    model, _, split = built[arch]
    params = params_numpy(model)
    x = inputs(batch, 3 if arch == "resnet8" else 1, seed=batch)
    for alpha in (0.0, 0.5, 1.0):
        got, ref = _run(split, x, params, alpha), _reference(model, x, params, alpha, K)
        assert list(got) == list(ref)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=1e-4, err_msg=f"{name} α={alpha}")
    if batch > K:  # the statistics really are those of the first K samples, not of the whole batch
        whole = _reference(model, x, params, 1.0, None)
        assert np.abs(_run(split, x, params, 1.0)["bn1.batch_mean"] - whole["bn1.batch_mean"]).max() > 1e-4


@pytest.mark.parametrize("arch", ["smallcnn", "resnet8"])
def test_a_batch_of_at_most_k_is_the_exact_graph(built: dict, arch: str) -> None:
    model, exact, split = built[arch]
    params = params_numpy(model)
    x = inputs(K, 3 if arch == "resnet8" else 1, seed=11)
    got, want = _run(split, x, params, 0.5), _run(exact, x, params, 0.5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_split_graph_keeps_the_interface_and_records_k(built: dict) -> None:
    for arch, (model, exact, split) in built.items():
        proto = onnx.load(str(split))
        onnx.checker.check_model(proto, full_check=True)
        graph = AdaptableGraph(model)
        assert [i.name for i in proto.graph.input] == graph.input_names(), arch
        assert [o.name for o in proto.graph.output] == graph.output_names(), arch
        assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert stats_samples_of(proto) == K and stats_samples_of(onnx.load(str(exact))) is None
        assert {p.key: p.value for p in proto.metadata_props}[STATS_SAMPLES_KEY] == str(K)
        stats = [o for o in proto.graph.output if o.name.endswith(".batch_var")]
        assert stats and all(f"first {K} samples" in o.doc_string for o in stats)
        # the rest of the batch computes no statistics: one GlobalAveragePool pair per layer, as in the exact graph
        ops = [n.op_type for n in proto.graph.node]
        exact_ops = [n.op_type for n in onnx.load(str(exact)).graph.node]
        assert ops.count("GlobalAveragePool") == exact_ops.count("GlobalAveragePool") == 2 * len(graph.layers)
        assert ops.count("Conv") == 2 * exact_ops.count("Conv")


def test_negative_gamma_in_the_rest_of_the_batch(built: dict) -> None:
    """Both streams take the exact (pool-last) branch of the sign guard when a γ is negative."""
    model, _, split = built["smallcnn"]
    params = params_numpy(model)
    params["bn2.weight"] = -params["bn2.weight"]
    x = inputs(9, 1, seed=4)
    got, ref = _run(split, x, params, 0.5), _reference(model, x, params, 0.5, K)
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4, rtol=1e-4)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="stats_samples must be >= 1"):
        LeanOptions(stats_samples=0)
    with pytest.raises(ValueError, match="needs statistics=True"):
        LeanOptions(stats_samples=8, statistics=False)
    with pytest.raises(ValueError, match="stats_samples must be >= 1"):
        functional_forward(random_model("smallcnn", 1), torch.zeros(2, 1, SIZE, SIZE), {}, 0.0, stats_samples=0)


def test_split_graph_quantizes_to_int8(built: dict, tmp_path: Path) -> None:
    model, _, split = built["resnet8"]
    params = params_numpy(model)
    x = inputs(32, 3, seed=2)
    report = quantize_int8(split, tmp_path / "int8.onnx", x, params, Int8Config(min_agreement=0.0))
    got = _run(tmp_path / "int8.onnx", x, params, 0.5)
    ref = _reference(model, x, params, 0.5, K)
    assert report is not None and got["logits"].shape == ref["logits"].shape
    assert np.corrcoef(got["logits"].ravel(), ref["logits"].ravel())[0, 1] > 0.95


def test_exporter_checks_a_split_graph_against_the_matching_torch_reference(tmp_path: Path) -> None:
    """``export_adaptable_onnx`` with ``stats_samples`` verifies parity with the first-k-sample torch forward."""
    model = random_model("smallcnn", 1)
    path = tmp_path / "split.onnx"
    x = inputs(24, 1, seed=6)
    names = export_adaptable_onnx(model, path, torch.from_numpy(x[:2]), parity_x=x, lean=LeanOptions(stats_samples=K))
    assert names == AdaptableGraph(model).output_names() and stats_samples_of(onnx.load(str(path))) == K
    report = check_parity(model, path, x, params_numpy(model), [0.5])
    assert report.top1_agreement == 1.0
