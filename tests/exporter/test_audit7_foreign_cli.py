"""``edgeloop export --from-onnx`` can wrap what ``wrap_onnx`` can: a model with several outputs
(``--output-name``), one whose penultimate tensor is not found or not wanted (``--features``), and one with a
static batch larger than the golden count. The errors used to send the user to ``output_name`` and
``features=None``, which the command line did not have, and a static batch of 16 to give golden vectors it
could not give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeloop.cli import main
from runtime import load_bundle


@pytest.fixture(autouse=True)
def _default_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", str(tmp_path / "default_key.pem"))


def _onnx(path: Path, batch: int | str = "n", extra_output: str | None = None, flat: str = "f") -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32), "W")
    nodes = [helper.make_node("Flatten", ["x"], [flat]), helper.make_node("MatMul", [flat, "W"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])]
    if extra_output == "relu":
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 10]))
    elif extra_output == "flat":
        outputs.append(helper.make_tensor_value_info(flat, TensorProto.FLOAT, [batch, 64]))
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              outputs, [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _export(tmp_path: Path, model: Path, *flags: str) -> int:
    return main(["export", "--from-onnx", str(model), "--dataset", "digits", "--out", str(tmp_path / "out"), *flags])


def test_a_static_batch_larger_than_the_golden_count_is_wrapped(tmp_path: Path) -> None:
    assert _export(tmp_path, _onnx(tmp_path / "m.onnx", batch=16)) == 0
    load_bundle(tmp_path / "out")  # verifies the golden vectors: one whole batch of 16
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["models"][0]
    assert entry["static_batch"] == 16 and entry["batch_resizable"] is False


def test_several_outputs_are_wrapped_with_output_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _onnx(tmp_path / "m.onnx", extra_output="relu")
    assert _export(tmp_path, model) == 2
    assert "name the class scores with output_name (--output-name)" in capsys.readouterr().err
    assert _export(tmp_path, model, "--output-name", "y") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["outputs"]["logits"] == "y" and manifest["outputs"]["features"] == "features"
    load_bundle(tmp_path / "out")


def test_features_none_and_a_named_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _onnx(tmp_path / "m.onnx", extra_output="flat", flat="features")  # already has a 'features' tensor
    assert _export(tmp_path, model, "--output-name", "y") == 2
    assert "already has a tensor named 'features'; rename it or pass features=None (--features none)" in \
        capsys.readouterr().err
    assert _export(tmp_path, model, "--output-name", "y", "--features", "none") == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["outputs"]["features"] is None
    named = _onnx(tmp_path / "n.onnx")
    assert main(["export", "--from-onnx", str(named), "--dataset", "digits", "--out", str(tmp_path / "named"),
                 "--features", "f"]) == 0
    manifest = json.loads((tmp_path / "named" / "manifest.json").read_text())
    assert manifest["foreign"]["added_outputs"] == {"features": "f"}
