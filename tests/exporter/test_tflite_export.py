"""TFLite export with litert-torch: folded and adaptable smallcnn (28×28), fp32 parity with torch and with the
ONNX export at batch 1, 7 and 64 (resized), int8 static (subprocess) and dynamic variants, parity failures.

The model trains on real MNIST (4,000 samples) when ``../shared/data`` exists, else on sklearn digits
upsampled to 28×28; every conversion happens once per module.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from exporter.adaptable import AdaptableGraph
from exporter.onnx_export import (
    ExportParityError,
    export_adaptable_onnx,
    make_feeds,
    ort_session,
    params_numpy,
    torch_reference,
)
from exporter.tflite_export import (
    FoldedGraph,
    TFLiteExportReport,
    check_tflite_parity,
    export_tflite,
    tflite_key,
)
from runtime.litert import IO_NAMES_METADATA, LiteRTSession, read_io_names_metadata

N_TRAIN, N_TEST = 4000, 1000


def _upsampled_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.kron(digits.images / 16.0, np.ones((3, 3)))  # 24×24
    x = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:1200]], y[order[:1200]], x[order[1200:]], y[order[1200:]]


@pytest.fixture(scope="module")
def mnist_like() -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)``: (N, 1, 28, 28) float32 in [0, 1]."""
    from edgeloop.data import DatasetNotFoundError, load_dataset

    try:
        train, test = load_dataset("mnist", "train", limit=N_TRAIN), load_dataset("mnist", "test", limit=N_TEST)
    except DatasetNotFoundError:
        return _upsampled_digits()
    return np.array(train.x), np.array(train.y), np.array(test.x), np.array(test.y)


@pytest.fixture(scope="module")
def smallcnn(mnist_like: tuple[np.ndarray, ...]) -> torch.nn.Module:
    """The benchmark SmallCNN trained for two epochs (seeded, one thread)."""
    from exporter.train import TrainConfig, train_model

    torch.set_num_threads(1)
    model, _, _ = train_model("smallcnn", mnist_like[0], mnist_like[1],
                              TrainConfig(arch="smallcnn", epochs=2, threads=1, seed=0))
    return model.eval()


@pytest.fixture(scope="module")
def converted(
    smallcnn: torch.nn.Module, mnist_like: tuple[np.ndarray, ...], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, TFLiteExportReport]:
    """Every variant, converted once: quantized ones first (each runs in its own subprocess anyway)."""
    out = tmp_path_factory.mktemp("tflite")
    x_train, _, x_test, _ = mnist_like
    example = torch.from_numpy(x_test[:1])
    reports = {}
    for form, quant in [("folded", "int8_static"), ("folded", "int8_dynamic"), ("folded", None), ("adaptable", None)]:
        reports[f"{form}-{quant or 'fp32'}"] = export_tflite(
            smallcnn, out / f"{form}_{quant or 'fp32'}.tflite", form=form, example=example, quantization=quant,
            calibration_x=x_train[:256], parity_x=x_test[:64],
        )
    return reports


def _torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_folded_matches_torch_at_any_batch(converted: dict, smallcnn: Any, mnist_like: tuple, batch: int) -> None:
    session = LiteRTSession(converted["folded-fp32"].path, threads=1)
    x = mnist_like[2][100 : 100 + batch]
    out = session.run({"input": x})
    assert out["logits"].shape == (batch, 10) and out["features"].shape == (batch, 64)
    np.testing.assert_allclose(out["logits"], _torch_logits(smallcnn, x), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_adaptable_matches_torch_and_onnx(
    converted: dict, smallcnn: Any, mnist_like: tuple, batch: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    x = mnist_like[2][200 : 200 + batch]
    params = params_numpy(smallcnn)
    session = LiteRTSession(converted["adaptable-fp32"].path, threads=1)
    onnx_path = tmp_path_factory.getbasetemp() / "adaptable.onnx"
    if not onnx_path.exists():
        export_adaptable_onnx(smallcnn, onnx_path, torch.from_numpy(x[:2]))
    ort = ort_session(onnx_path)
    for alpha in (0.0, 0.5, 1.0):
        got = session.run(make_feeds(x, params, alpha))
        ref = torch_reference(smallcnn, x, params, alpha)
        names = [o.name for o in ort.get_outputs()]
        onnx_out = dict(zip(names, ort.run(names, make_feeds(x, params, alpha)), strict=True))
        assert set(got) == set(ref) == set(onnx_out)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=1e-3, err_msg=f"{name} alpha {alpha}")
            np.testing.assert_allclose(got[name], onnx_out[name], atol=1e-4, rtol=1e-3, err_msg=name)


def test_adaptable_interface_and_metadata(converted: dict, smallcnn: Any) -> None:
    report = converted["adaptable-fp32"]
    graph = AdaptableGraph(smallcnn)
    assert list(report.input_names) == graph.input_names() and list(report.output_names) == graph.output_names()
    assert report.io_names["inputs"]["bn1.weight"] == "bn1_weight" == tflite_key("bn1.weight")
    assert read_io_names_metadata(report.path.read_bytes()) == report.io_names
    session = LiteRTSession(report.path)
    assert session.input_names[:2] == ["input", "alpha"] and session.input_info("alpha").shape == ()
    assert session.static_batch == 1 and session.input_info("input").batched
    assert not session.input_info("bn2.mean").batched
    entry = report.manifest_entry("fp32_tflite", "model_fp32.tflite")
    assert entry["format"] == "tflite" and entry["graph"] == "adaptable" and entry["precision"] == "fp32"
    assert entry["io_names"] == report.io_names and entry["parity"]["top1_agreement"] == 1.0
    json.dumps(entry)
    assert report.parity.batch_sizes == (1, 64) and report.parity.alphas == (0.0, 0.5)
    assert max(report.parity.max_abs_diff.values()) < 1e-4


@pytest.mark.parametrize("variant", ["folded-int8_static", "folded-int8_dynamic"])
def test_int8_variants_agree_with_fp32(converted: dict, mnist_like: tuple, variant: str) -> None:
    x, y = mnist_like[2], mnist_like[3]
    fp32 = LiteRTSession(converted["folded-fp32"].path, threads=1).run({"input": x})["logits"]
    report = converted[variant]
    out = LiteRTSession(report.path, threads=1).run({"input": x})["logits"]
    assert out.dtype == np.float32  # quantized outputs come back dequantized
    agreement = float((out.argmax(1) == fp32.argmax(1)).mean())
    assert agreement >= 0.95, f"{variant}: top-1 agreement with fp32 {agreement:.3f}"
    assert float((out.argmax(1) == y).mean()) >= float((fp32.argmax(1) == y).mean()) - 0.02
    assert report.precision == "int8" and report.quantization is not None
    assert report.size_bytes < 0.4 * converted["folded-fp32"].size_bytes
    if variant.endswith("static"):
        assert report.quantization["samples"] == 256 and report.quantization["calibration"] == "histogram"
        assert LiteRTSession(report.path, dequantize_outputs=False).output_info("logits").quantized


def test_parity_failure_is_named(converted: dict, smallcnn: Any, mnist_like: tuple) -> None:
    broken = copy.deepcopy(smallcnn)
    with torch.no_grad():
        broken.classifier.bias += 0.5
    with pytest.raises(ExportParityError, match=r"'logits' at batch 1"):
        check_tflite_parity(broken, converted["folded-fp32"].path, "folded", mnist_like[2][:8])
    with pytest.raises(ExportParityError, match="top-1 agreement"):
        shuffled = copy.deepcopy(smallcnn)
        with torch.no_grad():
            shuffled.classifier.weight.copy_(shuffled.classifier.weight.roll(1, dims=0))
            shuffled.classifier.bias.copy_(shuffled.classifier.bias.roll(1))
        check_tflite_parity(shuffled, converted["folded-fp32"].path, "folded", mnist_like[2][:64], atol=None,
                            min_agreement=0.9)


def test_bad_arguments(smallcnn: Any, tmp_path: Path) -> None:
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="one"):
        export_tflite(smallcnn, tmp_path / "m.tflite", example=x)
    with pytest.raises(ValueError, match="form"):
        export_tflite(smallcnn, tmp_path / "m.tflite", example=x[:1], form="unfolded")
    with pytest.raises(ValueError, match="calibration_x"):
        export_tflite(smallcnn, tmp_path / "m.tflite", example=x[:1], quantization="int8_static")
    with pytest.raises(ValueError, match="quantization"):
        export_tflite(smallcnn, tmp_path / "m.tflite", example=x[:1], quantization="int4")
    assert not (tmp_path / "m.tflite").exists()


def test_folded_graph_without_features() -> None:
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    graph = FoldedGraph(plain)
    assert graph.output_names() == ["logits"]
    assert set(graph(input=torch.zeros(1, 1, 2, 2))) == {"logits"}
    assert IO_NAMES_METADATA == "edgeloop_io_names"


def _op_shapes(path: Path) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(operator name, output shapes) of every operator of the TFLite file's first subgraph."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    root = schema.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    sub = root.subgraphs[0]
    out = []
    for op in sub.operators:
        code = root.operatorCodes[op.opcodeIndex]
        out.append((names[max(code.builtinCode, code.deprecatedBuiltinCode)],
                    [tuple(int(d) for d in sub.tensors[i].shape) for i in op.outputs]))
    return out


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_tflite_norm_equals_the_torch_alpha_mix(offset: float) -> None:
    """The TFLite form of the normalisation computes the α-mix's values, also for activations whose mean is far
    from zero (the centring on the source mean keeps E[z²] − E[z]² well conditioned)."""
    from exporter.adaptable import NormLayer, _mixed_norm
    from exporter.tflite_export import tflite_norm

    g = torch.Generator().manual_seed(0)
    layer = NormLayer("bn1", "bn", 5, 1e-5)
    z = torch.randn(6, 5, 7, 3, generator=g) * 0.1 + offset + torch.arange(5.0).view(1, -1, 1, 1)
    p = {layer.param("weight"): torch.rand(5, generator=g) + 0.5, layer.param("bias"): torch.randn(5, generator=g),
         layer.param("mean"): z.mean(dim=(0, 2, 3)) + 0.05, layer.param("var"): torch.rand(5, generator=g) + 0.1}
    centre = p[layer.param("mean")].clone()
    for alpha in (0.0, 0.5, 1.0):
        a = torch.tensor(alpha)
        want = _mixed_norm(z.double(), {k: v.double() for k, v in p.items()}, layer, a.double())
        got = tflite_norm(z, p, layer, a, centre)
        for g_, w_ in zip(got, want, strict=True):
            assert g_.shape == w_.shape
            np.testing.assert_allclose(g_.double().numpy(), w_.numpy(), atol=1e-4, rtol=1e-4)


def test_adaptable_graph_stays_nhwc(converted: dict) -> None:
    """Beyond the folded graph's, the adaptable graph has no full-size TRANSPOSE (the normalisation stays NHWC
    behind each convolution), no BROADCAST_TO (not delegated to XNNPACK) and broadcasts the affine over (W, C)."""
    folded = _op_shapes(converted["folded-fp32"].path)
    adaptable = _op_shapes(converted["adaptable-fp32"].path)
    assert sum(n == "TRANSPOSE" for n, _ in adaptable) == sum(n == "TRANSPOSE" for n, _ in folded)
    assert not any(n == "BROADCAST_TO" for n, _ in adaptable)
    convs = [s[0] for n, s in adaptable if n in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert any(n == "MUL" and s[0] in convs for n, s in adaptable), "no full-size MUL behind a convolution"
    tiles = [s[0] for n, s in adaptable if n == "RESHAPE" and len(s[0]) == 4 and s[0][:2] == (1, 1) and s[0][2] > 1]
    assert tiles, "the affine parameters are not tiled to (1, 1, W, C)"
    centre_subs = [s[0] for n, s in adaptable if n == "SUB" and s[0] in convs]
    assert not centre_subs, "the centring SUB was not folded into the convolution bias"


def test_pool_first_scales_after_the_pool_for_nonnegative_gamma(converted: dict) -> None:
    """The trained SmallCNN's γ are all ≥ 0: both BN → ReLU → MaxPool runs pool before the scale as well (its
    MUL, the shift and the ReLU run on the pooled tensor), and the two scales are listed as needing ≥ 0."""
    report = converted["adaptable-fp32"]
    assert report.nonnegative_params == ("bn1.weight", "bn2.weight")
    assert report.manifest_entry()["nonnegative_params"] == ["bn1.weight", "bn2.weight"]
    ops = _op_shapes(report.path)
    pooled = [s[0] for n, s in ops if n == "MAX_POOL_2D"]
    assert len(pooled) == 2
    for kind in ("MUL", "ADD"):
        assert all(shape in [s[0] for n, s in ops if n == kind] for shape in pooled), f"no pooled {kind}"
    assert "nonnegative_params" not in converted["folded-fp32"].manifest_entry()


def test_pool_first_is_exact_for_negative_gamma(smallcnn: Any, mnist_like: tuple, tmp_path: Path) -> None:
    """A layer trained with negative γ keeps the scale before the pool, which stays exact for fed γ of either
    sign (the scale's sign turns the pool's max into the min it must be), and is not listed; the other layer
    pools first and is listed, because it would be wrong for a negative γ (what the runtime refuses)."""
    model = copy.deepcopy(smallcnn)
    with torch.no_grad():
        model.features[1].weight[::2] *= -1.0  # bn1: every other channel trained negative
    x = mnist_like[2][:32]
    report = export_tflite(model, tmp_path / "neg.tflite", form="adaptable", example=torch.from_numpy(x[:1]),
                           parity_x=x)
    assert report.nonnegative_params == ("bn2.weight",)
    session = LiteRTSession(report.path, threads=1)
    params = params_numpy(model)
    flipped = {k: v.copy() for k, v in params.items()}
    flipped["bn1.weight"] *= np.where(np.arange(16) % 3 == 0, -1.0, 1.0).astype(np.float32)  # any sign
    for alpha in (0.0, 0.5):
        got = session.run(make_feeds(x, flipped, alpha))
        ref = torch_reference(model, x, flipped, alpha)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=1e-3, err_msg=f"{name} alpha {alpha}")
    wrong = {**params, "bn2.weight": -params["bn2.weight"]}
    got, ref = session.run(make_feeds(x, wrong, 0.5)), torch_reference(model, x, wrong, 0.5)
    assert np.abs(got["logits"] - ref["logits"]).max() > 1e-2  # the listed layer is not exact for γ < 0


def test_pool_first_leaves_the_model_alone(smallcnn: Any) -> None:
    """The pool-first graph edits a copy: the model keeps its ReLU and MaxPool modules."""
    from exporter.tflite_export import AdaptableKwargsGraph

    before = [type(m).__name__ for m in smallcnn.features]
    graph = AdaptableKwargsGraph(smallcnn)
    assert [type(m).__name__ for m in smallcnn.features] == before
    assert set(graph.pools) == {"bn1", "bn2"}
    assert not AdaptableKwargsGraph(smallcnn, pool_first=False).pools
