"""A foreign model whose scores are NaN on the golden inputs is refused for that, by name: it used to be told
that adding the features output 'changes the scores (max difference nan)', or, without features, that its
output 'differs from its golden vector by up to nan'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.foreign import ForeignModelError, wrap_onnx


def _log_scores(path: Path) -> Path:
    """Scores log(x W): NaN wherever x W < 0."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["m"]),
             helper.make_node("Log", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("features", ["f", None])
def test_nan_scores_are_named(tmp_path: Path, features: str | None) -> None:
    x = np.random.default_rng(1).random((4, 1, 4, 4), dtype=np.float32)
    with pytest.raises(ForeignModelError, match=r"m.onnx: output 'y' holds \d+ NaN or infinite value\(s\) on the "
                                                r"golden inputs"):
        wrap_onnx(_log_scores(tmp_path / "m.onnx"), tmp_path / "out", labels=["a", "b", "c"], output_kind="logits",
                  golden_x=x, features=features, input_spec={"name": "x", "shape": [-1, 1, 4, 4], "dtype": "float32"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
