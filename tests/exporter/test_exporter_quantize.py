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
