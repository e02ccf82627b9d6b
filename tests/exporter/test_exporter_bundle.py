"""The bundle writer: manifest schema 2 (CONTRACT.md), file hashes, block files, golden vectors, atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from exporter import bundle_models as bundle_models_mod
from exporter.adaptable import source_params
from exporter.bundle import bundle_id, export_bundle, export_details
from exporter.checkpoint import load_checkpoint
from runtime.blocks import decode_block, decode_image_u8
from runtime.bundle import load_bundle

TOP_KEYS = [
    "schema_version", "name", "arch", "created_unix_ms", "source_checkpoint_sha256", "input", "labels",
    "outputs", "adaptable", "source_statistics", "default_model", "models", "report", "files", "golden",
]
LAYER_KEYS = {"name", "channels"}  # tensor names follow <layer>.<key>, so they are left out


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def _initial(manifest: dict[str, Any], root: Path) -> dict[str, np.ndarray]:
    return decode_block((root / manifest["adaptable"]["initial"]["file"]).read_bytes())


def test_manifest_has_every_contract_field(digits_bundle: Path, digits_checkpoint: tuple[Path, str]) -> None:
    m = _manifest(digits_bundle)
    assert list(m) == TOP_KEYS
    assert m["schema_version"] == 2 and m["arch"] == "small_cnn" and m["name"] == "digits-small_cnn"
    assert isinstance(m["created_unix_ms"], int) and m["created_unix_ms"] > 1_600_000_000_000
    assert m["source_checkpoint_sha256"] == digits_checkpoint[1]
    inp = m["input"]
    assert inp["name"] == "input" and inp["shape"] == [-1, 1, 8, 8] and inp["dtype"] == "float32"
    assert inp["layout"] == "NCHW" and inp["value_range"] == [0.0, 1.0]
    assert set(inp["normalization"]) == {"mean", "std", "in_graph"} and inp["normalization"]["in_graph"] is True
    assert len(inp["normalization"]["mean"]) == 1 and inp["normalization"]["std"][0] > 0
    assert m["labels"] == [str(i) for i in range(10)]
    assert m["outputs"] == {"logits": "logits", "features": "features"}
    assert m["default_model"] == "fp32"


def test_adaptable_block_matches_checkpoint(digits_bundle: Path, digits_checkpoint: tuple[Path, str]) -> None:
    m = _manifest(digits_bundle)
    ad = m["adaptable"]
    assert set(ad) == {"alpha_input", "eps", "layers", "initial"} and ad["alpha_input"] == "alpha"
    assert ad["eps"] == pytest.approx(1e-5) and ad["initial"] == {"file": "adaptable_initial.bin"}
    assert [layer["name"] for layer in ad["layers"]] == ["bn1", "bn2", "bn3"]
    assert [layer["channels"] for layer in ad["layers"]] == [16, 32, 64]
    for layer in ad["layers"]:
        assert set(layer) == LAYER_KEYS
    model, _ = load_checkpoint(digits_checkpoint[0])
    expected = source_params(model)
    initial = _initial(m, digits_bundle)
    assert set(initial) == set(expected)
    for name, value in expected.items():  # float32, bit for bit
        assert initial[name].dtype == np.float32
        np.testing.assert_array_equal(initial[name], value.numpy())


def test_source_statistics(digits_bundle: Path) -> None:
    m = _manifest(digits_bundle)
    stats = m["source_statistics"]
    assert set(stats) == {"features", "entropy", "accuracy", "class_conditional"}  # BN stats: the initial block's
    assert stats["features"] == {"file": "source_features.bin", "dim": 64}
    features = decode_block((digits_bundle / "source_features.bin").read_bytes())
    assert set(features) == {"mean", "var"} and features["mean"].dtype == np.float32
    assert features["mean"].shape == features["var"].shape == (64,) and features["var"].min() >= 0
    assert 0 < stats["entropy"]["mean"] < np.log(10) and stats["entropy"]["std"] > 0
    assert stats["accuracy"] > 0.95


def test_models_and_quantization_block(digits_bundle: Path) -> None:
    m = _manifest(digits_bundle)
    assert all(set(e) == {"name", "file", "format", "precision", "graph"} for e in m["models"])  # device fields only
    m = export_details(digits_bundle)  # parity and quantization are in the export report
    fp32, int8 = m["models"]
    assert {k: v for k, v in fp32.items() if k != "parity"} == {
        "name": "fp32", "file": "model_fp32.onnx", "format": "onnx", "precision": "fp32", "graph": "adaptable"}
    assert {k: v for k, v in int8.items() if k not in ("quantization", "parity")} == {
        "name": "int8", "file": "model_int8.onnx", "format": "onnx", "precision": "int8", "graph": "adaptable"}
    # parity against torch, measured by the runtime on held-out inputs
    assert fp32["parity"]["max_abs_diff"] < 1e-4 and fp32["parity"]["top1_agreement"] == 1.0
    assert int8["parity"]["top1_agreement"] >= 0.875 and int8["parity"]["samples"] == 8
    assert int8["quantization"] == {"method": "onnxruntime_static_qdq", "per_channel": True,
                                    "calibration": "minmax", "samples": 256, "float_convs_below_channels": 8,
                                    "op_types": ["Conv", "MatMul", "Gemm"]}


def test_every_sha256_matches(digits_bundle: Path) -> None:
    m = _manifest(digits_bundle)
    on_disk = {p.name for p in digits_bundle.iterdir()} - {"manifest.json", "manifest.sig"}
    assert set(m["files"]) == on_disk == {"model_fp32.onnx", "model_int8.onnx", "golden_fp32.bin", "golden_int8.bin",
                                          "adaptable_initial.bin", "source_features.bin", "class_statistics.bin",
                                          "export_report.json"}
    for name, digest in m["files"].items():
        assert hashlib.sha256((digits_bundle / name).read_bytes()).hexdigest() == digest
    assert bundle_id(digits_bundle) == hashlib.sha256((digits_bundle / "manifest.json").read_bytes()).hexdigest()
    assert bundle_id(digits_bundle / "manifest.json") == bundle_id(digits_bundle)


def test_golden_reproduces_with_onnxruntime(digits_bundle: Path, digits_arrays: tuple) -> None:
    m = _manifest(digits_bundle)
    golden = m["golden"]
    assert "file" not in golden and golden["alpha"] == 0.5
    assert golden["models"]["fp32"] == {"file": "golden_fp32.bin", "atol": 1e-4, "rtol": 1e-3}
    assert 1e-2 <= golden["models"]["int8"]["atol"] <= 0.2
    _, _, x_test, _ = digits_arrays
    for entry in m["models"]:
        tol = golden["models"][entry["name"]]
        data = decode_block((digits_bundle / tol["file"]).read_bytes())
        # inputs on the k/255 grid, stored as the uint8 prediction residual and restored exactly
        x = decode_image_u8(data["input_u8_residual"]).astype(np.float32) / np.float32(data["input_denominator"])
        assert x.shape == (8, 1, 8, 8) and data["input_u8_residual"].dtype == np.uint8
        np.testing.assert_array_equal(x, np.round(x_test[:8] * 255).astype(np.float32) / np.float32(255))
        feeds = {"input": x, "alpha": np.array(golden["alpha"], dtype=np.float32), **_initial(m, digits_bundle)}
        sess = ort.InferenceSession(str(digits_bundle / entry["file"]), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        assert {f"{entry['name']}/{n}" for n in names} | {"input_u8_residual", "input_denominator"} == set(data)
        for name, value in zip(names, sess.run(names, feeds), strict=True):
            np.testing.assert_allclose(value, data[f"{entry['name']}/{name}"], atol=tol["atol"], rtol=tol["rtol"])


def _small_export(digits_model: tuple, digits_arrays: tuple, out: Path, **kwargs: Any) -> Path:
    model, spec, _ = digits_model
    x_train, _, x_test, _ = digits_arrays
    return export_bundle(
        (model, "small_cnn", spec, "0" * 64), out, labels=[str(i) for i in range(10)],
        calibration_x=x_train[:64], golden_x=x_test[:4], source_x=x_train[:128], **kwargs,
    )


def test_fp32_only_bundle_from_model_and_overwrite(digits_model: tuple, digits_arrays: tuple, tmp_path: Path) -> None:
    out = _small_export(digits_model, digits_arrays, tmp_path / "b", int8=False, name="fp32-only")
    m = _manifest(out)
    assert [e["name"] for e in m["models"]] == ["fp32"] and set(m["files"]) == {
        "model_fp32.onnx", "golden_fp32.bin", "adaptable_initial.bin", "source_features.bin", "export_report.json"}
    assert m["source_statistics"]["accuracy"] is None and m["name"] == "fp32-only"
    with pytest.raises(FileExistsError, match="not empty"):
        _small_export(digits_model, digits_arrays, out, int8=False)
    first = bundle_id(out)
    _small_export(digits_model, digits_arrays, out, int8=False, overwrite=True, golden_alpha=0.0)
    assert bundle_id(out) != first and _manifest(out)["golden"]["alpha"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp directories left behind


def test_declared_invariances_reach_the_device(digits_model: tuple, digits_arrays: tuple, tmp_path: Path) -> None:
    out = _small_export(digits_model, digits_arrays, tmp_path / "b", int8=False, invariances=("hflip",))
    assert _manifest(out)["input"]["invariances"] == ["hflip"]
    assert load_bundle(out).manifest.input.invariances == ("hflip",)
    plain = _small_export(digits_model, digits_arrays, tmp_path / "c", int8=False)
    assert "invariances" not in _manifest(plain)["input"]


def test_failed_export_leaves_nothing(
    digits_model: tuple, digits_arrays: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(bundle_models_mod, "quantize_int8", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        _small_export(digits_model, digits_arrays, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": ["a", "b"]}, "labels"),
        ({"golden_x": np.full((2, 1, 8, 8), 2.0, dtype=np.float32)}, r"\[0, 1\]"),
        ({"source_x": np.zeros((2, 1, 7, 7), dtype=np.float32)}, "sample shape"),
        ({"golden_alpha": 1.5}, "golden_alpha"),
        ({"invariances": ("rotate90",)}, "unknown invariance 'rotate90'"),
        ({"invariances": "hflip"}, "list of names"),
    ],
)
def test_bad_arguments_are_rejected(
    digits_model: tuple, digits_arrays: tuple, tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    model, spec, _ = digits_model
    x_train, _, x_test, _ = digits_arrays
    args: dict[str, Any] = {"labels": [str(i) for i in range(10)], "calibration_x": x_train[:8],
                            "golden_x": x_test[:2], "source_x": x_train[:8]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        export_bundle((model, "small_cnn", spec, "0" * 64), tmp_path / "b", **args)
    assert not (tmp_path / "b").exists()


def test_class_conditional_gaussians(digits_bundle: Path) -> None:
    from runtime.manifest import read_manifest

    ref = _manifest(digits_bundle)["source_statistics"]["class_conditional"]
    gaussians = read_manifest(digits_bundle)[0].class_gaussians(digits_bundle)
    assert gaussians is not None
    means, cov, counts = gaussians
    dim = _manifest(digits_bundle)["source_statistics"]["features"]["dim"]
    assert means.shape == (10, dim) and cov.shape == (dim, dim) and counts.sum() > 0
    assert ref == {"file": "class_statistics.bin", "classes": 10, "dim": dim,
                   "covariance_storage": "upper_triangle_row_major", "shrinkage": 1e-3}
    np.testing.assert_allclose(cov, cov.T)
    assert np.linalg.eigvalsh(cov).min() > 0  # invertible on the device


def test_class_gaussians_recover_known_parameters() -> None:
    from exporter.bundle import class_gaussians

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 20000)
    centres = np.array([[0.0, 0.0], [5.0, 1.0], [-3.0, 4.0]])
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    f = centres[y] + rng.multivariate_normal([0, 0], cov, size=len(y))
    g = class_gaussians(f, y, 3, shrinkage=0.0)
    np.testing.assert_allclose(g["means"], centres, atol=0.05)
    np.testing.assert_allclose(g["shared_covariance"], cov, atol=0.05)
