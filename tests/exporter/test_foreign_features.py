"""Foreign bundles expose penultimate features and carry source statistics: found automatically in a small
ONNX and TFLite classifier built here, scores bit-identical to the source model, LAME and T3A (and the
Mahalanobis class Gaussians) run on the bundle through the product, bad names are refused with the
available tensors listed; a schema-1 foreign bundle (as written before schema 2) still loads and serves."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agents.tta import create_tta_method
from exporter.foreign import ForeignModelError, wrap_onnx, wrap_tflite
from runtime import load_bundle
from runtime.predictor import Predictor

LABELS = ["a", "b", "c"]
SPEC = {"name": "x", "shape": [-1, 1, 4, 4], "dtype": "float32", "layout": "NCHW", "value_range": [0, 1]}


def _classifier(path: Path) -> Path:
    """x (N, 1, 4, 4) → Flatten → Gemm(16→8) → Relu = ``hidden`` → MatMul(8→3) → Add → Softmax."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in (("w1", (16, 8)), ("b1", (8,)), ("w2", (8, 3)), ("b2", (3,)))]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("Gemm", ["flat", "w1", "b1"], ["pre"]),
             helper.make_node("Relu", ["pre"], ["hidden"]), helper.make_node("MatMul", ["hidden", "w2"], ["mm"]),
             helper.make_node("Add", ["mm", "b2"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"])]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _source(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unmodified model's probabilities (onnxruntime) and its hidden layer (numpy, from the weights)."""
    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    hidden = np.maximum(x.reshape(len(x), -1) @ w["w1"] + w["b1"], 0.0)
    probs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"x": x})[0]
    return probs, hidden


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(96, 1, 4, 4)).astype(np.float32)
    return x, rng.integers(0, 3, size=96)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory, data: tuple, signing_key: Any) -> Path:
    root = tmp_path_factory.mktemp("foreign_features")
    x, y = data
    return wrap_onnx(_classifier(root / "clf.onnx"), root / "b", labels=LABELS, input_spec=SPEC,
                     output_kind="probabilities", golden_x=x[:4], source_x=x[32:], source_y=y[32:],
                     signing_key=signing_key)


def test_onnx_features_found_and_scores_unchanged(onnx_bundle: Path, data: tuple) -> None:
    x, _ = data
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    assert manifest["outputs"] == {"logits": "probs", "features": "features", "kind": "probabilities"}
    assert manifest["foreign"]["added_outputs"] == {"features": "hidden"}
    assert manifest["models"][0]["io_names"]["outputs"] == {"probs": "probs", "features": "features"}
    bundle = load_bundle(onnx_bundle)
    result = Predictor(bundle).predict(x[:16])
    probs, hidden = _source(onnx_bundle.parent / "clf.onnx", x[:16])
    np.testing.assert_array_equal(result.scores, probs)
    np.testing.assert_allclose(result.features, hidden, rtol=1e-5, atol=1e-5)


def test_source_statistics_are_recorded_and_fetched(onnx_bundle: Path, data: tuple) -> None:
    x, y = data
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    stats = manifest["source_statistics"]
    probs, hidden = _source(onnx_bundle.parent / "clf.onnx", x[32:])
    assert stats["features"] == {"file": "source_features.bin", "dim": 8}  # schema 2: a float32 block
    assert stats["accuracy"] == pytest.approx(float((probs.argmax(1) == y[32:]).mean()))
    assert "layers" not in stats and stats["entropy"]["mean"] > 0
    bundle = load_bundle(onnx_bundle)
    mean, var = bundle.manifest.source_feature_stats()
    np.testing.assert_allclose(mean, hidden.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, hidden.var(0), rtol=1e-4, atol=1e-6)
    assert stats["class_conditional"]["file"] == "class_statistics.bin" and "class_statistics.bin" in manifest["files"]
    assert bundle.manifest.files_for(bundle.model.name) == ["model_fp32.onnx", "golden_fp32.bin", "source_features.bin"]
    assert "class_statistics.bin" in bundle.manifest.files_for(bundle.model.name, class_statistics=True)
    means, cov, counts = bundle.manifest.class_gaussians(bundle.root)
    assert means.shape == (3, 8) and cov.shape == (8, 8) and counts.sum() == 64
    np.testing.assert_allclose(means[0], hidden[y[32:] == 0].mean(0), rtol=1e-4, atol=1e-5)
    from device_agents.drift.mahalanobis import MahalanobisDrift

    detector = MahalanobisDrift.from_bundle(bundle, window_size=8, reference=hidden, n_runs=20, run_length=200)
    assert detector.dim == 8


@pytest.mark.parametrize("method", ["lame", "t3a"])
def test_lame_and_t3a_run_on_the_foreign_bundle(onnx_bundle: Path, data: tuple, method: str) -> None:
    x, _ = data
    predictor = Predictor(load_bundle(onnx_bundle))
    tta = create_tta_method(method)
    for start in (0, 16):
        out = tta.predict(predictor, x[start : start + 16])
        assert out.logits.shape == (16, 3) and out.features.shape == (16, 8)
        np.testing.assert_allclose(out.probs.sum(1), 1.0, atol=1e-6)
    if method == "t3a":  # seeded with the source class means from class_statistics.bin
        means = predictor.manifest.class_gaussians(predictor.bundle.root)[0]
        np.testing.assert_array_equal(tta._state["supports"][:, 0], means)


def test_explicit_and_bad_feature_names(tmp_path: Path, data: tuple) -> None:
    x, _ = data
    model = _classifier(tmp_path / "clf.onnx")
    kwargs = {"labels": LABELS, "input_spec": SPEC, "output_kind": "probabilities", "golden_x": x[:4]}
    out = wrap_onnx(model, tmp_path / "pre", features="pre", **kwargs)
    assert json.loads((out / "manifest.json").read_text())["foreign"]["added_outputs"] == {"features": "pre"}
    with pytest.raises(ForeignModelError, match=r"no tensor 'penultimate'.*available tensors: .*'hidden'"):
        wrap_onnx(model, tmp_path / "bad", features="penultimate", **kwargs)
    with pytest.raises(ForeignModelError, match=r"no tensor 'x' computed by the graph"):
        wrap_onnx(model, tmp_path / "bad", features="x", **kwargs)  # the graph input
    with pytest.raises(ForeignModelError, match="features"):
        wrap_onnx(model, tmp_path / "bad", features=None, source_x=x, **kwargs)
    plain = wrap_onnx(model, tmp_path / "plain", features=None, **kwargs)
    manifest = json.loads((plain / "manifest.json").read_text())
    assert manifest["outputs"]["features"] is None and "added_outputs" not in manifest["foreign"]
    assert set(manifest["files"]) == {"model_fp32.onnx", "golden_fp32.bin", "export_report.json"}
    assert not (tmp_path / "bad").exists()


def test_degenerate_source_samples_are_refused_before_wrapping(tmp_path: Path, data: tuple) -> None:
    """One labelled sample gives zero feature variances and a zero class covariance: refused by name, as in
    our own bundles, before anything is written."""
    x, y = data
    kwargs = {"labels": LABELS, "input_spec": SPEC, "output_kind": "probabilities", "golden_x": x[:4]}
    model = _classifier(tmp_path / "clf.onnx")
    with pytest.raises(ForeignModelError, match=r"source_x has 1 sample in 1 class\(es\) of source_y"):
        wrap_onnx(model, tmp_path / "b", source_x=x[:1], source_y=y[:1], **kwargs)
    with pytest.raises(ForeignModelError, match=r"source_x has 1 sample; .* need at least 2"):
        wrap_onnx(model, tmp_path / "b", source_x=x[:1], **kwargs)
    with pytest.raises(ForeignModelError, match=r"source_y must have shape \(8,\)"):
        wrap_onnx(model, tmp_path / "b", source_x=x[:8], source_y=y[:7], **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.onnx"]


def test_tflite_features_found_through_its_signature(tmp_path: Path) -> None:
    """A model converted here (with a SignatureDef): the features join the subgraph and the signature."""
    pytest.importorskip("litert_torch")
    import torch

    from exporter.tflite_export import export_tflite
    from runtime.litert import LiteRTSession

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5)).eval()
    report = export_tflite(model, tmp_path / "m.tflite", example=torch.rand(1, 3, 8, 8),
                           parity_x=np.random.default_rng(0).uniform(0, 1, (4, 3, 8, 8)).astype(np.float32))
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (40, 3, 8, 8)).astype(np.float32)
    spec = {"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32", "layout": "NCHW", "value_range": [0, 1]}
    bundle_dir = wrap_tflite(report.path, tmp_path / "b", labels=list("abcde"), input_spec=spec,
                             output_kind="logits", golden_x=x[:3], source_x=x[8:], source_y=rng.integers(0, 5, 32))
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["models"][0]["io_names"]["outputs"]["features"] == "features"  # the new signature key
    bundle = load_bundle(bundle_dir, backend="tflite")
    result = Predictor(bundle).predict(x[:8])
    np.testing.assert_array_equal(result.scores, LiteRTSession(report.path).run({"input": x[:8]})["logits"])
    with torch.no_grad():
        np.testing.assert_allclose(result.features, model[:-1](torch.from_numpy(x[:8])).numpy(), atol=1e-4)
    assert bundle.manifest.class_gaussians(bundle.root)[0].shape == (5, 6)
    out = create_tta_method("lame").predict(Predictor(bundle), x[:8])
    assert out.logits.shape == (8, 5) and out.features.shape == (8, 6)
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(report.path)).get_tensor_details()
    conv = next(d["name"] for d in details if len(d["shape"]) == 4 and d["name"].endswith("ReLU_1;"))  # (1, 4, 6, 6)
    with pytest.raises(ForeignModelError, match=r"must be \(N, D\)"):
        wrap_tflite(report.path, tmp_path / "bad", labels=list("abcde"), input_spec=spec, output_kind="logits",
                    golden_x=x[:3], features=conv)


def _to_schema_1(root: Path, key: Any) -> None:
    """Rewrite a schema-2 foreign bundle as the wrapper wrote it before: feature statistics inline, the class
    Gaussians in ``source_statistics.npz``, the golden vectors in ``golden.npz`` (``input`` as fed), no report."""
    from exporter.signing import sign_bundle
    from runtime.blocks import decode_block
    from runtime.bundle import golden_input

    manifest = json.loads((root / "manifest.json").read_text())
    stats = manifest["source_statistics"]
    features = decode_block((root / "source_features.bin").read_bytes())
    gauss = decode_block((root / "class_statistics.bin").read_bytes())
    stats["features"] = {"mean": features["mean"].astype(float).tolist(), "var": features["var"].astype(float).tolist()}
    np.savez_compressed(root / "source_statistics.npz", **gauss)  # type: ignore[arg-type]
    stats["class_conditional"] = {"file": "source_statistics.npz", "shrinkage": stats["class_conditional"]["shrinkage"],
                                  "covariance_storage": "upper_triangle_row_major"}
    (name, tolerance), = manifest["golden"]["models"].items()
    golden = decode_block((root / tolerance.pop("file")).read_bytes())
    arrays = {"input": golden_input(golden, "golden"), **{k: v for k, v in golden.items() if "/" in k}}
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    (root / "golden.npz").write_bytes(buf.getvalue())
    manifest["golden"]["file"] = "golden.npz"
    for stale in ("source_features.bin", "class_statistics.bin", f"golden_{name}.bin", manifest.pop("report")["file"]):
        (root / stale).unlink()
    manifest["schema_version"] = 1
    manifest["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())
                         if p.name not in ("manifest.json", "manifest.sig")}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    sign_bundle(root, key)


def test_schema_1_foreign_bundle_still_loads(onnx_bundle: Path, data: tuple, tmp_path: Path, signing_key: Any
                                             ) -> None:
    x, _ = data
    root = Path(shutil.copytree(onnx_bundle, tmp_path / "v1"))
    _to_schema_1(root, signing_key)
    v1, v2 = load_bundle(root), load_bundle(onnx_bundle)  # signature, sha256s and golden vectors verified
    assert v1.manifest.schema_version == 1 and v2.manifest.schema_version == 2
    assert v1.manifest.files_for("fp32") == ["model_fp32.onnx", "golden.npz", "source_statistics.npz"]
    for a, b in zip(v1.manifest.source_feature_stats(), v2.manifest.source_feature_stats(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(v1.manifest.class_gaussians(root), v2.manifest.class_gaussians(onnx_bundle), strict=True):
        np.testing.assert_array_equal(a, b)
    old, new = Predictor(v1).predict(x[:16]), Predictor(v2).predict(x[:16])
    np.testing.assert_array_equal(old.scores, new.scores)
    np.testing.assert_array_equal(old.features, new.features)
    tta = create_tta_method("t3a")  # seeded from the schema-1 npz
    assert tta.predict(Predictor(v1), x[:16]).logits.shape == (16, 3)
