"""Foreign models wrapped into bundles: the ONNX Model Zoo MNIST (98.9 % on the full MNIST test set), the MLPerf
Tiny ResNet-8 float and int8 TFLite (75.5 % / 75.4 % on the full CIFAR-10-JPEG test set), schema 2 (a lean device
download, golden inputs stored exactly), spec mismatches, static-batch fallback, tampering refused. Shared-data
tests skip with a reason when ``../shared/data`` is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop.data import default_data_dir
from exporter.foreign import (
    REPORT_FILE,
    ForeignInputSpec,
    ForeignModelError,
    golden_input_arrays,
    wrap_onnx,
    wrap_tflite,
)
from runtime import BundleIntegrityError, SignatureError, load_bundle
from runtime.blocks import encode_block
from runtime.bundle import golden_input, read_golden
from runtime.manifest import read_manifest
from runtime.predictor import Predictor

DATA = default_data_dir()
MODELS = DATA / "models"
ZOO = MODELS / "onnx_zoo_mnist8.onnx"
RESNET = MODELS / "mlperf_tiny_resnet8_cifar10.tflite"
RESNET_INT8 = MODELS / "mlperf_tiny_resnet8_cifar10_int8.tflite"
DIGITS = [str(i) for i in range(10)]


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"shared data absent (see ../shared/data/README.md): {missing}")


ZOO_SPEC = {"name": "Input3", "shape": [1, 1, 28, 28], "dtype": "float32", "layout": "NCHW", "value_range": [0, 255]}


@pytest.fixture(scope="module")
def mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """The full MNIST test set as float32 (N, 1, 28, 28) raw 0–255, and labels."""
    _need(DATA / "mnist" / "mnist_test.npz", ZOO)
    with np.load(DATA / "mnist" / "mnist_test.npz") as npz:
        return npz["x"].astype(np.float32)[:, None], npz["y"].astype(np.int64)


@pytest.fixture(scope="module")
def zoo_bundle(mnist_raw: tuple, tmp_path_factory: pytest.TempPathFactory, signing_key: Any) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "bundle"
    x, y = mnist_raw
    return wrap_onnx(ZOO, out, labels=DIGITS, input_spec=ZOO_SPEC, output_kind="logits",
                     golden_x=x[:8], signing_key=signing_key, name="onnx-zoo-mnist", source_x=x[-512:],
                     source_y=y[-512:])


@pytest.fixture(scope="module")
def cifar_raw() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The full CIFAR-10-JPEG test set as float32 NHWC raw 0–255 (exact integers), labels, class names."""
    _need(DATA / "cifar10_jpeg" / "cifar10_jpeg_test.npz", RESNET, RESNET_INT8)
    from edgeloop.data import load_dataset

    ds = load_dataset("cifar10", "test")
    return np.rint(ds.x.transpose(0, 2, 3, 1) * 255.0).astype(np.float32), np.array(ds.y), list(ds.labels)


def _download_bytes(bundle: Path, class_statistics: bool = False) -> int:
    """What a device fetches for the default model: ``files_for`` plus the manifest and its signature."""
    manifest, _ = read_manifest(bundle)
    files = [*manifest.files_for(manifest.default_model, class_statistics), "manifest.json", "manifest.sig"]
    return sum((bundle / f).stat().st_size for f in files)


def test_zoo_manifest(zoo_bundle: Path) -> None:
    manifest = json.loads((zoo_bundle / "manifest.json").read_text())
    assert "adaptable" not in manifest and manifest["arch"] == "foreign" and manifest["schema_version"] == 2
    assert manifest["input"] == {"name": "Input3", "shape": [-1, 1, 28, 28], "dtype": "float32", "layout": "NCHW",
                                 "value_range": [0.0, 255.0]}
    assert manifest["outputs"] == {"logits": "Plus214_Output_0", "features": "features", "kind": "logits"}
    (entry,) = manifest["models"]
    assert entry["graph"] == "folded" and entry["format"] == "onnx" and entry["precision"] == "fp32"
    assert entry["batch_resizable"] is True and entry["static_batch"] is None
    assert entry["io_names"] == {"inputs": {"Input3": "Input3"},
                                 "outputs": {"Plus214_Output_0": "Plus214_Output_0", "features": "features"}}
    assert "opset" not in entry  # documentation: in the export report
    assert set(manifest["files"]) == {"model_fp32.onnx", "golden_fp32.bin", "source_features.bin",
                                      "class_statistics.bin", REPORT_FILE}
    assert manifest["golden"]["models"]["fp32"] == {"file": "golden_fp32.bin", "atol": 1e-4, "rtol": 1e-3}
    assert manifest["foreign"]["added_outputs"] == {"features": "Pooling160_Output_0_reshape0"}
    assert manifest["source_statistics"]["accuracy"] >= 0.97
    assert manifest["source_statistics"]["features"] == {"file": "source_features.bin", "dim": 256}
    from exporter.bundle import export_details

    assert export_details(zoo_bundle)["models"][0]["opset"] == 8
    parsed, _ = read_manifest(zoo_bundle)
    mean, var = parsed.source_feature_stats()
    assert mean.shape == var.shape == (256,) and mean.dtype == np.float32
    # the 256-d class Gaussians (~130 KB) come only on request: the lean download was 211,557 B in schema 1
    assert parsed.files_for("fp32") == ["model_fp32.onnx", "golden_fp32.bin", "source_features.bin"]
    assert "class_statistics.bin" in parsed.files_for("fp32", class_statistics=True)
    assert _download_bytes(zoo_bundle) < 40_000 < 160_000 < _download_bytes(zoo_bundle, class_statistics=True)
    golden = read_golden(zoo_bundle, "golden_fp32.bin")  # raw 0-255 float pixels: stored as uint8, denominator 1
    assert "input" not in golden and float(golden["input_denominator"]) == 1.0
    assert golden_input(golden, "golden_fp32.bin").shape == (8, 1, 28, 28)
    proto = onnx.load(str(zoo_bundle / "model_fp32.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    from runtime.bundle_info import describe, inspect_bundle

    inspection = inspect_bundle(zoo_bundle)  # edgeloop inspect: verified, and described as the wrapper it is
    assert inspection.ok, inspection.failures
    assert "onnx_zoo_mnist8.onnx" in describe(inspection.manifest)["foreign"]  # type: ignore[arg-type]


@pytest.mark.shared_data
def test_zoo_keeps_accuracy_on_full_mnist(zoo_bundle: Path, mnist_raw: tuple) -> None:
    x, y = mnist_raw
    predictor = Predictor(load_bundle(zoo_bundle, backend="auto", threads=1), max_batch=2000)
    result = predictor.predict(x)
    accuracy = float((result.predictions == y).mean())
    assert accuracy >= 0.989, f"ONNX Model Zoo MNIST top-1 {accuracy:.4f} on 10,000 (README: 98.91 %)"
    assert result.features.shape == (len(x), 256) and result.kind == "logits"
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-9)
    plain = Predictor(load_bundle(_wrap_zoo_without_features(zoo_bundle.parent / "plain"), backend="auto"))
    np.testing.assert_array_equal(plain.predict(x[:500]).scores, predictor.predict(x[:500]).scores)


def _wrap_zoo_without_features(out: Path) -> Path:
    x = np.zeros((2, 1, 28, 28), np.float32)
    return wrap_onnx(ZOO, out, labels=DIGITS, input_spec=ZOO_SPEC, output_kind="logits", golden_x=x, features=None,
                     overwrite=True)


@pytest.mark.shared_data
@pytest.mark.parametrize(("model", "dtype", "bound"), [(RESNET, "float32", 0.754), (RESNET_INT8, "uint8", 0.753)])
def test_resnet8_keeps_accuracy_on_full_cifar(
    cifar_raw: tuple, tmp_path: Path, signing_key: Any, model: Path, dtype: str, bound: float
) -> None:
    x, y, labels = cifar_raw
    name = "input_1" if dtype == "float32" else "input_1_int8"
    spec = {"name": name, "shape": [-1, 32, 32, 3], "dtype": dtype, "layout": "NHWC", "value_range": [0, 255]}
    bundle_dir = wrap_tflite(model, tmp_path / "b", labels=labels, input_spec=spec, output_kind="probabilities",
                             golden_x=x[::1000].astype(dtype), signing_key=signing_key)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    (entry,) = manifest["models"]
    assert entry["format"] == "tflite" and entry["precision"] == ("fp32" if dtype == "float32" else "int8")
    assert entry["io_names"]["outputs"]["features"] == "model/flatten/Reshape"
    assert manifest["outputs"]["features"] == "features" and manifest["foreign"]["scores_bit_identical_to_source"]
    assert manifest["schema_version"] == 2 and "input_quantization" not in entry  # the runtime reads the file
    golden_x = x[::1000]  # 10 images, exact integers: stored as uint8 (schema 1: float32, 123 KB uncompressed)
    assert (bundle_dir / f"golden_{entry['name']}.bin").stat().st_size < 0.25 * golden_x.nbytes
    if dtype == "uint8":
        from exporter.bundle import export_details

        details = export_details(bundle_dir)["models"][0]
        assert details["input_quantization"] == {"dtype": "int8", "scale": 1.0, "zero_point": -128}
        assert details["features_quantization"]["dtype"] == "int8"  # dequantized by the runtime
        assert set(details["golden_kernel_variance"]) == set(entry["io_names"]["outputs"])  # measured per output
        assert "features" in manifest["golden"]["models"]["int8"]["outputs"]  # its own bound, apart from the scores
    predictor = Predictor(load_bundle(bundle_dir, backend="auto", threads=1), max_batch=500)
    result = predictor.predict(x.astype(dtype))
    accuracy = float((result.predictions == y).mean())
    assert accuracy >= bound, f"{model.name}: top-1 {accuracy:.4f} on 10,000 (README: 75.48 % / 75.42 %)"
    assert result.kind == "probabilities" and result.scores.dtype == np.float32
    assert result.features.shape == (len(x), 64) and result.features.dtype == np.float32
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-9)
    from runtime.litert import LiteRTSession

    source = LiteRTSession(model, threads=1).run({name: x[:64].astype(dtype)})
    np.testing.assert_array_equal(next(iter(source.values())), predictor.predict(x[:64].astype(dtype)).scores)


STATIC_SPEC = {"name": "x", "shape": [1, 1, 2, 2], "dtype": "float32", "layout": "NCHW", "value_range": [0, 1]}


@pytest.fixture(scope="module")
def static_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _static_reshape_model(tmp_path_factory.mktemp("static") / "static.onnx")


@pytest.fixture(scope="module")
def static_bundle(static_model: Path, tmp_path_factory: pytest.TempPathFactory, signing_key: Any) -> Path:
    x = np.random.default_rng(1).uniform(0, 1, size=(5, 1, 2, 2)).astype(np.float32)
    return wrap_onnx(static_model, tmp_path_factory.mktemp("static_bundle") / "b", labels=["a", "b", "c"],
                     input_spec={**STATIC_SPEC, "shape": [-1, 1, 2, 2]}, output_kind="logits", golden_x=x,
                     signing_key=signing_key)


def test_spec_mismatches_are_named(static_model: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).uniform(0, 1, size=(4, 1, 2, 2)).astype(np.float32)
    labels = ["a", "b", "c"]
    cases = [
        ({**STATIC_SPEC, "name": "image"}, x, labels, "kind", "inputs \\['x'\\]"),
        ({**STATIC_SPEC, "shape": [1, 1, 3, 3]}, np.zeros((4, 1, 3, 3), np.float32), labels, "kind", "dim 2 is 2"),
        ({**STATIC_SPEC, "shape": [4, 1, 2, 2]}, x, labels, "kind", "batch is 1"),
        ({**STATIC_SPEC, "dtype": "uint8"}, x.astype(np.uint8), labels, "kind", "float32, the spec says uint8"),
        ({**STATIC_SPEC, "value_range": [0, 0.5]}, x, labels, "kind", "value range"),
        (STATIC_SPEC, x, labels, "probabilities", "not probabilities"),
        (STATIC_SPEC, x, ["a", "b"], "logits", "expected \\(N, 2\\)"),
        (STATIC_SPEC, x, labels, "scores", "output_kind"),
    ]
    for spec, golden, names, kind, message in cases:
        with pytest.raises(ForeignModelError, match=message):
            wrap_onnx(static_model, tmp_path / "b", labels=names, input_spec=spec,
                      output_kind="logits" if kind == "kind" else kind, golden_x=golden)
    with pytest.raises(ForeignModelError, match="layout"):
        ForeignInputSpec.parse({**STATIC_SPEC, "layout": "CHW"})
    with pytest.raises(ForeignModelError, match="unknown input spec fields"):
        ForeignInputSpec.parse({**STATIC_SPEC, "mean": [0.5]})
    with pytest.raises(ForeignModelError, match="unknown invariance 'vflip'"):
        ForeignInputSpec.parse({**STATIC_SPEC, "invariances": ["vflip"]})
    assert not (tmp_path / "b").exists()


def test_foreign_bundle_declares_invariances(static_model: Path, tmp_path: Path, signing_key: Any) -> None:
    x = np.random.default_rng(2).uniform(0, 1, size=(5, 1, 2, 2)).astype(np.float32)
    out = wrap_onnx(static_model, tmp_path / "b", labels=["a", "b", "c"], output_kind="logits", golden_x=x,
                    input_spec={**STATIC_SPEC, "shape": [-1, 1, 2, 2], "invariances": ["hflip"]},
                    signing_key=signing_key)
    assert load_bundle(out, backend="auto").manifest.input.invariances == ("hflip",)


def test_tampered_foreign_bundle_is_refused(static_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(static_bundle, tmp_path / "copy"))
    model = copy / "model_fp32.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"model_fp32\.onnx"):
        load_bundle(copy, backend="auto")
    copy2 = Path(shutil.copytree(static_bundle, tmp_path / "copy2"))
    raw = json.loads((copy2 / "manifest.json").read_text())
    raw["input"]["value_range"] = [0.0, 100.0]
    (copy2 / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SignatureError):
        load_bundle(copy2, backend="auto")


def _static_reshape_model(path: Path) -> Path:
    """x (1, 1, 2, 2) → Reshape to the constant [1, 4] → MatMul (4, 3): a batch the graph cannot resize."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])]
    graph = helper.make_graph(nodes, "static", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_static_batch_model_is_served_in_chunks(static_bundle: Path) -> None:
    entry = json.loads((static_bundle / "manifest.json").read_text())["models"][0]
    assert entry["batch_resizable"] is False and entry["static_batch"] == 1
    golden = read_golden(static_bundle, "golden_fp32.bin")
    assert len(golden_input(golden, "golden_fp32.bin")) == 1  # the golden batch is the static batch
    bundle = load_bundle(static_bundle, backend="auto")
    x = np.random.default_rng(1).uniform(0, 1, size=(5, 1, 2, 2)).astype(np.float32)
    result = Predictor(bundle).predict(x)
    expected = np.concatenate([bundle.session.run({"x": x[i : i + 1]})["y"] for i in range(5)])
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6)


def test_wrap_tflite_converted_here(tmp_path: Path) -> None:
    """wrap_tflite on a model converted in the test: runs without the shared data."""
    pytest.importorskip("litert_torch")
    import torch

    from exporter.tflite_export import export_tflite

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval()
    report = export_tflite(model, tmp_path / "m.tflite", example=torch.rand(1, 3, 8, 8),
                           parity_x=np.random.default_rng(0).uniform(0, 1, (4, 3, 8, 8)).astype(np.float32))
    x = np.random.default_rng(2).uniform(0, 1, (3, 3, 8, 8)).astype(np.float32)
    spec = {"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32", "layout": "NCHW", "value_range": [0, 1]}
    bundle_dir = wrap_tflite(report.path, tmp_path / "b", labels=list("abcde"), input_spec=spec,
                             output_kind="logits", golden_x=x)
    entry = json.loads((bundle_dir / "manifest.json").read_text())["models"][0]
    assert entry["format"] == "tflite" and entry["batch_resizable"] is True
    result = Predictor(load_bundle(bundle_dir, backend="tflite")).predict(x)
    with torch.no_grad():
        np.testing.assert_allclose(result.scores, model(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-3)


def test_report_file_is_the_exporters() -> None:
    from exporter.bundle import REPORT_FILE as EXPORTER_REPORT

    assert REPORT_FILE == EXPORTER_REPORT


@pytest.mark.parametrize(("kind", "stored"), [
    ("uint8_nhwc", "input_u8_residual"), ("float_0_255", "input_u8_residual"), ("float_k_255", "input_u8_residual"),
    ("float_any", "input"), ("int8", "input"), ("uint8_flat_noise", "input"),
])
def test_golden_inputs_are_stored_exactly_and_small(kind: str, stored: str) -> None:
    rng = np.random.default_rng(3)
    ramp = (np.arange(16 * 16 * 3).reshape(1, 16, 16, 3) % 200).astype(np.uint8)  # smooth: the residual pays
    images = np.concatenate([ramp, ramp // 2])
    x = {"uint8_nhwc": images, "float_0_255": images.transpose(0, 3, 1, 2).astype(np.float32),
         "float_k_255": images.astype(np.float32) / np.float32(255.0),
         "float_any": rng.uniform(0, 1, (2, 3, 8, 8)).astype(np.float32),
         "int8": rng.integers(-128, 128, (2, 3, 8, 8)).astype(np.int8),
         "uint8_flat_noise": rng.integers(0, 256, (2, 1, 1, 64)).astype(np.uint8)}[kind]
    arrays = golden_input_arrays(x)
    assert stored in arrays
    restored = golden_input(arrays, "golden").astype(x.dtype)
    assert restored.dtype == x.dtype
    np.testing.assert_array_equal(restored, x)
    assert len(encode_block(arrays)) <= len(encode_block({"input": x}))
