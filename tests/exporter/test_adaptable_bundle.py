"""A bundle built on the lean graph (smallcnn: pooled layers behind an If): runtime forward, α-BN, int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.onnx_export import torch_reference


@pytest.fixture(scope="module")
def smallcnn_bundle(digits_arrays: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """smallcnn trained briefly on digits (8×8), exported as a signed fp32 + int8 bundle."""
    from exporter.bundle import export_bundle
    from exporter.train import TrainConfig, train_model

    x_train, y_train, x_test, _ = digits_arrays
    model, spec, _ = train_model("smallcnn", x_train, y_train, TrainConfig(arch="smallcnn", epochs=6, seed=0,
                                                                            threads=1))
    out = tmp_path_factory.mktemp("smallcnn_bundle") / "bundle"
    path = export_bundle((model, "smallcnn", spec, "0" * 64), out, labels=[str(i) for i in range(10)],
                         calibration_x=x_train[:256], golden_x=x_test[:8], source_x=x_train, source_y=y_train,
                         int8=True, folded=True, name="digits-smallcnn")
    return model, path


def test_bundle_graph_is_lean(smallcnn_bundle: tuple) -> None:
    _, path = smallcnn_bundle
    ops = [n.op_type for n in onnx.load(str(Path(path) / "model_fp32.onnx")).graph.node]
    assert ops.count("If") == 2 and ops.count("BatchNormalization") == 2 and "Pow" not in ops
    int8_ops = [n.op_type for n in onnx.load(str(Path(path) / "model_int8.onnx")).graph.node]
    assert int8_ops.count("If") == 2 and "QuantizeLinear" in int8_ops


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_adaptable_model_matches_torch(smallcnn_bundle: tuple, digits_arrays: tuple, alpha: float, batch: int
                                       ) -> None:
    from runtime import AdaptableModel, load_bundle

    model, path = smallcnn_bundle
    adaptable = AdaptableModel(load_bundle(Path(path), threads=1))
    x = digits_arrays[2][:batch]
    result = adaptable.forward(x, alpha=alpha)
    ref = torch_reference(model, x, adaptable.params, alpha)
    np.testing.assert_allclose(result.logits, ref["logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(result.features, ref["features"], atol=1e-4, rtol=1e-4)
    for layer, (mean, var) in result.batch_stats.items():
        np.testing.assert_allclose(mean, ref[f"{layer}.batch_mean"], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(var, ref[f"{layer}.batch_var"], atol=1e-4, rtol=1e-4)


def test_alpha_bn_and_int8_run_on_the_lean_graph(smallcnn_bundle: tuple, digits_arrays: tuple) -> None:
    from device_agents.tta import create_tta_method
    from runtime import AdaptableModel, load_bundle

    _, path = smallcnn_bundle
    x_test, y_test = digits_arrays[2], digits_arrays[3]
    for name in ("fp32", "int8"):
        model = AdaptableModel(load_bundle(Path(path), model=name, threads=1))
        method = create_tta_method("alpha_bn")
        for batch in (1, 64):  # the running-estimate path and the in-graph α-mix
            out = method.adapt_and_predict(model, x_test[:batch])
            assert out.logits.shape == (batch, 10) and np.isfinite(out.logits).all()
        accuracy = (model.forward(x_test, alpha=0.0).logits.argmax(1) == y_test).mean()
        assert accuracy > 0.85, (name, accuracy)


def test_folded_int8_keeps_the_pooled_stem_float_and_records_its_session_options(
    smallcnn_bundle: tuple, digits_arrays: tuple
) -> None:
    """The folded int8 graph leaves conv 1→16, its ReLU and its max-pool float, quantizes the rest down to the
    pools, and tells the runtime to turn off onnxruntime's QDQ propagation (which would drag the quantization
    above the float pool into a slow uint8 NCHW pool)."""
    from exporter.bundle import export_details
    from runtime.bundle import load_bundle

    _, path = smallcnn_bundle
    manifest = export_details(path)  # the manifest with its export report (quantization blocks) merged back
    entry = next(m for m in manifest["models"] if m["name"] == "folded_int8")
    assert entry["session_options"] == {"disabled_optimizers": ["QDQPropagationTransformer"]}
    assert entry["quantization"]["op_types"] == ["Conv", "MatMul", "Gemm", "Relu", "MaxPool"]
    adaptable = next(m for m in manifest["models"] if m["name"] == "int8")
    assert adaptable["quantization"]["op_types"] == ["Conv", "MatMul", "Gemm"]
    graph = onnx.load(str(Path(path) / "model_folded_int8.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    stem = convs[0]
    assert stem.input[1] in {i.name for i in graph.initializer}  # float weights, no DequantizeLinear
    assert all(producer[c.input[1]].op_type == "DequantizeLinear" for c in convs[1:])
    consumers = {i: n for n in graph.node for i in n.input}
    relu = consumers[stem.output[0]]
    pool = consumers[relu.output[0]]
    assert (relu.op_type, pool.op_type) == ("Relu", "MaxPool")
    assert consumers[pool.output[0]].op_type == "QuantizeLinear"  # quantization starts after the pool
    _, _, x_test, y_test = digits_arrays
    int8 = load_bundle(path, model="folded_int8")
    fp32 = load_bundle(path, model="folded_fp32")
    assert int8.model.disabled_optimizers == ("QDQPropagationTransformer",)
    got, ref = (b.session.run({"input": x_test})["logits"].argmax(1) for b in (int8, fp32))
    assert (got == ref).mean() >= 0.95 and (got == y_test).mean() >= (ref == y_test).mean() - 0.03
