"""Static int8 QDQ quantization of the adaptable graph."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter import quantize as quantize_mod
from exporter.onnx_export import make_feeds, ort_session, params_numpy
from exporter.quantize import (
    CalibrationReader,
    Int8AgreementError,
    Int8Config,
    quantize_int8,
    top1_agreement,
)


def _nodes(path: Path) -> tuple[onnx.ModelProto, Counter[str]]:
    proto = onnx.load(str(path))
    return proto, Counter(n.op_type for n in proto.graph.node)


def test_int8_model_is_per_channel_qdq(digits_bundle: Path) -> None:
    proto, ops = _nodes(digits_bundle / "model_int8.onnx")
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 7 and ops["Conv"] == 3
    producers = {out: n for n in proto.graph.node for out in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    float_convs = 0
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        if conv.input[1] in inits:  # a stem conv on < 8 input channels stays float (see Int8Config)
            assert inits[conv.input[1]].shape[1] < 8 and inits[conv.input[1]].dtype == np.float32
            float_convs += 1
            continue
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],) and weight.shape[0] > 1
        assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
    assert float_convs == 1  # digits: the 1-channel stem only
    # The BN mixing stays float and consumes the fed parameters; the head stays float (logits from Gemm).
    assert producers["logits"].op_type == "Gemm" and producers["features"].op_type == "ReduceMean"
    fp32 = onnx.load(str(digits_bundle / "model_fp32.onnx"))
    assert [i.name for i in proto.graph.input] == [i.name for i in fp32.graph.input]
    assert [o.name for o in proto.graph.output] == [o.name for o in fp32.graph.output]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_int8_agrees_with_fp32_on_digits(digits_bundle: Path, digits_arrays: tuple, digits_model: tuple) -> None:
    _, _, x_test, y_test = digits_arrays
    params = params_numpy(digits_model[0])
    agreement = top1_agreement(digits_bundle / "model_fp32.onnx", digits_bundle / "model_int8.onnx", x_test, params)
    assert agreement >= 0.9
    logits = ort_session(digits_bundle / "model_int8.onnx").run(["logits"], make_feeds(x_test, params, 0.0))[0]
    assert (logits.argmax(1) == y_test).mean() > 0.9
    assert (digits_bundle / "model_int8.onnx").stat().st_size < 0.6 * (digits_bundle / "model_fp32.onnx").stat().st_size


def test_entropy_calibration_and_report(digits_bundle: Path, digits_arrays: tuple, digits_model: tuple,
                                        tmp_path: Path) -> None:
    x_train, _, x_test, _ = digits_arrays
    params = params_numpy(digits_model[0])
    config = Int8Config(calibration="entropy", max_samples=100, batch_size=32)  # 3 equal batches: 96
    report = quantize_int8(digits_bundle / "model_fp32.onnx", tmp_path / "q.onnx", x_train, params, config,
                           eval_x=x_test[:50])
    assert report.samples == 96 and report.eval_samples == 146 and report.preprocessed
    assert report.top1_agreement >= 0.9
    assert report.manifest_block() == {"method": "onnxruntime_static_qdq", "per_channel": True,
                                       "calibration": "entropy", "samples": 96,
                                       "float_convs_below_channels": 0, "op_types": ["Conv", "MatMul", "Gemm"]}


def test_low_agreement_raises(digits_bundle: Path, digits_arrays: tuple, digits_model: tuple, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantize_mod, "top1_agreement", lambda *a, **k: 0.5)
    with pytest.raises(Int8AgreementError, match=r"agreement 0\.5000 on 32 samples is below 0\.9"):
        quantize_int8(digits_bundle / "model_fp32.onnx", tmp_path / "q.onnx", digits_arrays[0][:32],
                      params_numpy(digits_model[0]))


def test_preprocess_failure_falls_back_with_warning(digits_bundle: Path, digits_arrays: tuple, digits_model: tuple,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shape inference choked")

    monkeypatch.setattr(quantize_mod, "quant_pre_process", broken)
    with caplog.at_level(logging.WARNING, logger="exporter.quantize"):
        report = quantize_int8(digits_bundle / "model_fp32.onnx", tmp_path / "q.onnx", digits_arrays[0][:64],
                               params_numpy(digits_model[0]))
    assert not report.preprocessed and "shape inference choked" in caplog.text
    assert _nodes(tmp_path / "q.onnx")[1]["QuantizeLinear"] > 0


def test_calibration_reader_batches_and_rewinds(digits_arrays: tuple, digits_model: tuple) -> None:
    params = params_numpy(digits_model[0])
    reader = CalibrationReader(digits_arrays[0][:10], params, batch_size=4)
    batches = [reader.get_next() for _ in range(4)]
    assert [b["input"].shape[0] for b in batches[:3] if b is not None] == [4, 4, 2] and batches[3] is None
    first = batches[0]
    assert first is not None and first["alpha"].shape == () and float(first["alpha"]) == 0.0
    assert set(params) <= set(first) and len(reader) == 10
    reader.rewind()
    again = reader.get_next()
    assert again is not None and np.array_equal(again["input"], first["input"])


@pytest.mark.parametrize(
    "kwargs",
    [{"calibration": "kl"}, {"activation_type": "int4"}, {"max_samples": 0}, {"min_agreement": 1.5}],
)
def test_int8_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Int8Config(**kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def folded_resnet8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A random-weight ResNet-8 on 3×8×8 inputs (BN statistics from random batches), exported folded."""
    import torch

    from exporter.models import ModelSpec, build_model
    from exporter.onnx_fold import export_folded_onnx

    torch.manual_seed(0)
    model = build_model("resnet8", ModelSpec(3, 10, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 3, 8, 8))
    model.eval()
    x = np.random.default_rng(0).random((128, 3, 8, 8), dtype=np.float32)
    path = tmp_path_factory.mktemp("resnet8") / "folded.onnx"
    export_folded_onnx(model, path, torch.from_numpy(x[:2]), parity_x=x[:16])
    return path, x


def test_pad_input_channels_keeps_the_function(folded_resnet8: tuple, tmp_path: Path) -> None:
    path, x = folded_resnet8
    model = onnx.load(str(path))
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    assert quantize_mod.pad_input_channels(model, {stem.name}) == [(stem.name, 3, 4)]
    assert quantize_mod.pad_input_channels(model, {stem.name}) == []  # already a multiple of 4
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "padded.onnx"))
    ref, got = (ort_session(p).run(None, {"input": x})[0] for p in (path, tmp_path / "padded.onnx"))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[pad.input[1]].tolist() == [0, 0, 0, 0, 0, 1, 0, 0] and inits[stem.input[1]].shape[1] == 4
    assert not inits[stem.input[1]][:, 3].any()


def test_folded_stem_without_pool_is_padded_and_quantized(folded_resnet8: tuple, tmp_path: Path) -> None:
    """A 3-channel stem whose ReLU feeds quantized convolutions (no pool) is padded to 4 channels and quantized:
    onnxruntime then runs every convolution as QLinearConv (no float Conv, no NCHWc reorder)."""
    import onnxruntime as ort

    path, x = folded_resnet8
    config = Int8Config(float_convs_below_channels=8, op_types=quantize_mod.FOLDED_OP_TYPES, min_agreement=0.0)
    report = quantize_int8(path, tmp_path / "q.onnx", x, {}, config)
    assert report.padded_convs == (("/stem/stem.0/Conv", 3, 4),) and report.disabled_optimizers == ()
    assert report.manifest_block()["padded_input_channels"] == {"/stem/stem.0/Conv": [3, 4]}
    proto, ops = _nodes(tmp_path / "q.onnx")
    assert ops["Pad"] == 1
    producers = {out: n for n in proto.graph.node for out in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        assert producers[conv.input[1]].op_type == "DequantizeLinear"
        weight = inits[producers[conv.input[1]].input[0]]
        assert weight.dtype == np.int8 and weight.shape[1] % 4 == 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert optimized["QLinearConv"] == 9 and optimized["Conv"] == 0 and optimized["ReorderOutput"] == 0
    # every residual join runs as QLinearAdd (the last one too: "Add" joins the quantized operator types)
    assert report.op_types == (*quantize_mod.FOLDED_OP_TYPES, "Add")
    assert report.manifest_block()["op_types"][-1] == "Add"
    assert optimized["QLinearAdd"] == 3 and optimized["Add"] == 0 and optimized["Relu"] == 0
    unpadded = quantize_int8(path, tmp_path / "f.onnx", x, {},
                             Int8Config(float_convs_below_channels=8, op_types=quantize_mod.FOLDED_OP_TYPES,
                                        min_agreement=0.0, pad_small_convs=False))
    assert unpadded.padded_convs == () and "padded_input_channels" not in unpadded.manifest_block()
    assert _nodes(tmp_path / "f.onnx")[1]["Pad"] == 0


def test_input_normalisation_folds_into_the_input_quantization(folded_resnet8: tuple, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a padded, quantized stem the input's (x − m)/s becomes the QuantizeLinear's per-channel scale and
    zero point: no Sub/Div left, the same integers up to one rounding step."""
    path, x = folded_resnet8
    config = Int8Config(float_convs_below_channels=8, op_types=quantize_mod.FOLDED_OP_TYPES, min_agreement=0.0)
    report = quantize_int8(path, tmp_path / "folded.onnx", x, {}, config)
    assert report.folded_input_normalisation and "input_normalisation" in report.manifest_block()
    proto, ops = _nodes(tmp_path / "folded.onnx")
    assert ops["Sub"] == 0 and ops["Div"] == 0
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    pad = next(n for n in proto.graph.node if n.op_type == "Pad")
    assert pad.input[0] == "input"  # the channel pad reads the raw input now
    quant = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pad.output[0])
    assert {a.name: a.i for a in quant.attribute} == {"axis": 1}
    scale, zero = inits[quant.input[1]], inits[quant.input[2]]
    assert scale.shape == zero.shape == (4,) and zero.dtype == np.uint8 and scale[3] != scale[0]
    monkeypatch.setattr(quantize_mod, "fold_input_normalisation", lambda model: False)
    plain = quantize_int8(path, tmp_path / "plain.onnx", x, {}, config)
    assert not plain.folded_input_normalisation and _nodes(tmp_path / "plain.onnx")[1]["Div"] == 1
    got, ref = (ort_session(tmp_path / f"{n}.onnx").run(["logits"], {"input": x})[0] for n in ("folded", "plain"))
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_fold_input_normalisation_leaves_other_graphs_alone(digits_bundle: Path) -> None:
    """No Sub → Div → QuantizeLinear chain from the input (the adaptable digits graph): nothing changes."""
    model = onnx.load(str(digits_bundle / "model_int8.onnx"))
    before = model.SerializeToString()
    assert not quantize_mod.fold_input_normalisation(model)
    assert model.SerializeToString() == before
