"""Predictor: adaptable bundles at α = 0 (ONNX and an added TFLite model verified through its golden vectors),
input validation per the manifest's spec (shape, dtype incl. uint8, range, NaN), chunking, probabilities."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime import AdaptableModel, InputError, load_bundle, softmax
from runtime.bundle import golden_feeds, golden_input, read_golden
from runtime.manifest import parse_manifest
from runtime.predictor import Predictor, probabilities


def test_adaptable_bundle_predicts_at_alpha_zero(digits_bundle: Path, digits_arrays: tuple) -> None:
    bundle = load_bundle(digits_bundle, threads=1)
    x = digits_arrays[2][:50]
    result = Predictor(bundle).predict(x)
    ref = AdaptableModel(bundle).forward(x, alpha=0.0)
    np.testing.assert_allclose(result.scores, ref.logits, rtol=1e-6)
    np.testing.assert_allclose(result.features, ref.features, rtol=1e-6)  # type: ignore[arg-type]
    np.testing.assert_allclose(result.probs, softmax(ref.logits))
    assert result.kind == "logits" and result.predictions.shape == (50,)
    chunked = Predictor(bundle, max_batch=7).predict(x)
    np.testing.assert_allclose(chunked.scores, result.scores, atol=1e-5)


def test_input_validation(digits_bundle: Path, digits_arrays: tuple) -> None:
    predictor = Predictor(load_bundle(digits_bundle, threads=1))
    x = digits_arrays[2][:4]
    bad = [
        (x[:, :, :4], "shape \\(4, 1, 4, 8\\).*\\(N, 1, 8, 8\\) NCHW"),
        (x[:0], "N >= 1"),
        ((x * 16).astype(np.int64), "int64.*floating"),
        (np.where(x > 0.5, np.nan, x), "NaN"),
        (x + 2.0, "leave the model's range \\[0.0, 1.0\\]"),
    ]
    for arr, message in bad:
        with pytest.raises(InputError, match=message):
            predictor.predict(arr)
    assert predictor.predict(x.astype(np.float64)).scores.dtype == np.float32
    with pytest.raises(ValueError, match="max_batch"):
        Predictor(predictor.bundle, max_batch=0)


def test_probabilities_of_dequantized_scores() -> None:
    scores = np.array([[0.5, 0.49, -0.01], [0.0, 0.0, 0.0]], np.float32)
    p = probabilities(scores, "probabilities")
    np.testing.assert_allclose(p, [[0.5 / 0.99, 0.49 / 0.99, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(probabilities(scores, "logits"), softmax(scores))


def _uint8_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3) / 255, "w")
    shape = numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["xf", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])]
    graph = helper.make_graph(nodes, "u8", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", 2, 2, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_uint8_nhwc_input(tmp_path: Path) -> None:
    from exporter.foreign import wrap_onnx

    spec = {"name": "x", "shape": [-1, 2, 2, 1], "dtype": "uint8", "layout": "NHWC", "value_range": [0, 255]}
    x = np.random.default_rng(0).integers(0, 256, (6, 2, 2, 1)).astype(np.uint8)
    bundle_dir = wrap_onnx(_uint8_model(tmp_path / "u8.onnx"), tmp_path / "b", labels=["a", "b", "c"],
                           input_spec=spec, output_kind="logits", golden_x=x)
    predictor = Predictor(load_bundle(bundle_dir, backend="auto"))
    assert predictor.layout == "NHWC" and predictor.static_batch is None
    result = predictor.predict(x)
    expected = x.reshape(6, 4).astype(np.float32) @ (np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3) / 255)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.features, x.reshape(6, 4))  # "auto": the MatMul's input, as float
    with pytest.raises(InputError, match="float32; the model takes uint8"):
        predictor.predict(x.astype(np.float32))
    with pytest.raises(InputError, match="shape"):
        predictor.predict(x.transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def bundle_with_tflite(
    digits_bundle: Path, digits_model: tuple, digits_arrays: tuple, signing_key: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The digits bundle plus an adaptable TFLite model entry, its golden vectors, re-signed."""
    pytest.importorskip("litert_torch")
    import torch

    from exporter.signing import sign_bundle
    from exporter.tflite_export import export_tflite
    from runtime.litert import LiteRTSession

    root = Path(shutil.copytree(digits_bundle, tmp_path_factory.mktemp("tfl") / "bundle"))
    x_test = digits_arrays[2]
    report = export_tflite(digits_model[0], root / "model_fp32.tflite", form="adaptable",
                           example=torch.from_numpy(x_test[:1]), parity_x=x_test[:16])
    manifest = json.loads((root / "manifest.json").read_text())
    x = golden_input(read_golden(root, "golden_fp32.bin"), "golden_fp32.bin")
    golden = {"input_u8": np.round(x * 255).astype(np.uint8), "input_denominator": np.float32(255)}  # an .npz: read too
    manifest["models"].append(report.manifest_entry("fp32_tflite"))
    manifest["golden"]["models"]["fp32_tflite"] = {"file": "golden_fp32_tflite.npz", "atol": 1e-4, "rtol": 1e-3}
    manifest["files"]["model_fp32.tflite"] = hashlib.sha256(report.path.read_bytes()).hexdigest()
    manifest["files"]["golden_fp32_tflite.npz"] = "0" * 64  # replaced below, once written

    parsed = parse_manifest(manifest, root=root)
    outs = LiteRTSession(report.path, 1).run(golden_feeds(parsed, parsed.model("fp32_tflite"), x))
    golden.update({f"fp32_tflite/{k}": v for k, v in outs.items()})
    np.savez(root / "golden_fp32_tflite.npz", **golden)  # type: ignore[arg-type]
    written = (root / "golden_fp32_tflite.npz").read_bytes()
    manifest["files"]["golden_fp32_tflite.npz"] = hashlib.sha256(written).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    sign_bundle(root, signing_key)
    return root


def test_tflite_model_in_a_bundle_matches_onnx(bundle_with_tflite: Path, digits_arrays: tuple) -> None:
    tfl = load_bundle(bundle_with_tflite, model="fp32_tflite", backend="auto", threads=1)  # golden verified
    ort = load_bundle(bundle_with_tflite, model="fp32", threads=1)
    x = digits_arrays[2][:64]
    a, b = Predictor(tfl).predict(x), Predictor(ort).predict(x)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(a.features, b.features, atol=1e-4, rtol=1e-3)  # type: ignore[arg-type]
    adapted = AdaptableModel(tfl).forward(x, alpha=1.0)
    reference = AdaptableModel(ort).forward(x, alpha=1.0)
    for layer, (mean, var) in reference.batch_stats.items():
        np.testing.assert_allclose(adapted.batch_stats[layer][0], mean, atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(adapted.batch_stats[layer][1], var, atol=1e-4, rtol=1e-3)
