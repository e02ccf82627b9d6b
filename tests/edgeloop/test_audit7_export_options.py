"""``edgeloop export`` refuses an option that does not apply to the kind of model exported instead of ignoring it:
``--from-onnx m.onnx --sparsity 2:4`` used to write an uncompressed bundle and say nothing, and
``student.pt --layout NHWC --value-range 0,255`` to export the checkpoint as if they had not been given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop.cli import main
from exporter.checkpoint import save_checkpoint
from exporter.models import ModelSpec, build_model


@pytest.fixture(autouse=True)
def _default_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", str(tmp_path / "default_key.pem"))


@pytest.fixture
def digits_onnx(tmp_path: Path) -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32), "W")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


@pytest.mark.parametrize(("flags", "named"), [
    (["--sparsity", "2:4"], "--sparsity only applies"),
    (["--low-rank", "energy=0.9", "--exclude", "features.0"], "--low-rank, --exclude only apply"),
    (["--no-int8", "--formats", "onnx,tflite", "--trainable"], "--int8/--no-int8, --formats, --trainable only apply"),
    (["--fine-tune-epochs", "0", "--calibration-samples", "64"], "--fine-tune-epochs, --calibration-samples only"),
])
def test_torch_export_options_are_refused_for_a_foreign_model(
    digits_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    code = main(["export", "--from-onnx", str(digits_onnx), "--dataset", "digits", "--out", str(tmp_path / "out"),
                 *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert named in err and "to exporting a torch model; a foreign model" in err
    assert not (tmp_path / "out").exists()


def test_foreign_input_options_are_refused_for_a_torch_model(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    spec = ModelSpec(1, 10, 8, (0.3,), (0.4,))
    ckpt = tmp_path / "s.pt"
    save_checkpoint(build_model("small_cnn", spec), "small_cnn", spec, ckpt, {"dataset": "digits"})
    code = main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--layout", "NHWC", "--value-range", "0,255"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--layout, --value-range only apply to wrapping a foreign model" in err
    assert not (tmp_path / "out").exists()


def test_foreign_options_still_wrap_a_foreign_model(digits_onnx: Path, tmp_path: Path) -> None:
    assert main(["export", "--from-onnx", str(digits_onnx), "--dataset", "digits", "--out", str(tmp_path / "out"),
                 "--layout", "NCHW", "--value-range", "0,1", "--output-kind", "logits"]) == 0
    assert (tmp_path / "out" / "manifest.json").is_file()
