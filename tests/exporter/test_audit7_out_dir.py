"""Overwriting an output directory: only a bundle holding nothing but its own files is replaced.

``--overwrite`` used to delete whatever directory ``--out`` named (a project directory, the checkpoint being
exported from it included) and could not replace a bundle named ``.`` (the working directory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.foreign import wrap_onnx
from runtime import load_bundle
from runtime.manifest import MANIFEST_NAME


def _onnx(path: Path) -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _wrap(source: Path, out: Path | str, overwrite: bool) -> Path:
    x = np.random.default_rng(1).random((4, 1, 4, 4), dtype=np.float32)
    return wrap_onnx(source, out, labels=["a", "b", "c"], output_kind="logits", golden_x=x, features=None,
                     input_spec={"name": "x", "shape": [-1, 1, 4, 4], "dtype": "float32"}, overwrite=overwrite)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_overwrite_refuses_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    source = _onnx(project / "model.onnx")  # the very file being wrapped lives there
    (project / "notes.txt").write_text("mine")
    before = _snapshot(project)
    with pytest.raises(FileExistsError, match=r"project is not empty and is not a bundle \(no manifest.json\)"):
        _wrap(source, project, overwrite=True)
    assert _snapshot(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporary directory left


def test_overwrite_refuses_a_bundle_holding_files_it_does_not_list(tmp_path: Path) -> None:
    source = _onnx(tmp_path / "model.onnx")
    bundle = _wrap(source, tmp_path / "b", overwrite=False)
    (bundle / "inspection.json").write_text("{}")
    before = _snapshot(bundle)
    with pytest.raises(FileExistsError, match=r"holds 'inspection.json', which its manifest does not list"):
        _wrap(source, bundle, overwrite=True)
    assert _snapshot(bundle) == before
    (bundle / "inspection.json").unlink()
    old = (bundle / MANIFEST_NAME).read_bytes()
    assert _wrap(source, bundle, overwrite=True) == bundle  # a bundle of its own files alone is replaced
    assert (bundle / MANIFEST_NAME).read_bytes() != old
    load_bundle(bundle)


def test_overwrite_replaces_the_bundle_named_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _onnx(tmp_path / "model.onnx")
    bundle = _wrap(source, tmp_path / "b", overwrite=False)
    old = (bundle / MANIFEST_NAME).read_bytes()
    monkeypatch.chdir(bundle)
    assert _wrap(source, ".", overwrite=True) == bundle
    assert (bundle / MANIFEST_NAME).read_bytes() != old
    load_bundle(bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "model.onnx"]
