"""``edgeloop export MODEL`` on a model source that cannot be used: one line naming it, exit 2, no traceback.

A checkpoint lacking a field, a checkpoint torch cannot read, an import path naming something that is not
callable, a factory or module that raises, a module with a syntax error and a model with NaN weights used to
end in a Python traceback (KeyError, TypeError, SyntaxError …) or in a message naming the wrong problem."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from edgeloop.cli import main
from exporter.checkpoint import save_checkpoint
from exporter.models import ModelSpec, build_model


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    spec = ModelSpec(1, 10, 8, (0.3,), (0.4,))
    path = tmp_path / "s.pt"
    save_checkpoint(build_model("small_cnn", spec), "small_cnn", spec, path, {"dataset": "digits"})
    return path


def _export(model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["export", model, "--dataset", "digits", "--out", str(tmp_path / "out"), "--fine-tune-epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("edgeloop export: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: p.pop("spec"), "checkpoint field 'spec' must be a dict, it is missing"),
    (lambda p: p.pop("state_dict"), "checkpoint field 'state_dict' must be a dict, it is missing"),
    (lambda p: p.update(meta=["digits"]), "checkpoint field 'meta' must be a dict, it is a list"),
    (lambda p: p["spec"].pop("mean"), "checkpoint spec lacks ['mean']"),
    (lambda p: p["state_dict"].pop("classifier.bias"), "its weights do not fit architecture 'small_cnn'"),
])
def test_a_checkpoint_missing_a_field_is_named(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                edit: object, message: str) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    edit(payload)  # type: ignore[operator]
    torch.save(payload, checkpoint)
    err = _export(str(checkpoint), tmp_path, capsys)
    assert f"{checkpoint}: " in err and message in err


def test_a_file_torch_cannot_read_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all")
    err = _export(str(path), tmp_path, capsys)
    assert f"{path} is not a readable edgeloop checkpoint: UnpicklingError" in err and "weights_only" not in err


MODULE = '''
import torch
from torch import nn
number = 5
def raises_type_error():
    raise TypeError("no width given")
class NeedsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()
def nan_weights():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        net[1].weight[0, 0] = float("nan")
    return net
def wrong_shape():
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 10))
'''


@pytest.mark.parametrize(("attr", "message"), [
    ("number", "'{m}:number' is a int: it must be an nn.Module or a callable returning one"),
    ("raises_type_error", "calling '{m}:raises_type_error' to build the model failed: TypeError: no width given"),
    ("NeedsArgs", "calling '{m}:NeedsArgs' to build the model failed: TypeError"),
    ("nan_weights", "model parameter '1.weight' holds NaN or infinite values"),
    ("wrong_shape", "{m}:wrong_shape: running it on digits images of shape (4, 1, 8, 8) failed: RuntimeError"),
])
def test_an_import_path_that_gives_no_usable_model_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], attr: str, message: str
) -> None:
    module = f"audit7_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    err = _export(f"{module}:{attr}", tmp_path, capsys)
    assert message.format(m=module) in err


def test_a_module_that_does_not_import_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = f"audit7_broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("def build(:\n")
    monkeypatch.chdir(tmp_path)
    err = _export(f"{module}:build", tmp_path, capsys)
    assert f"cannot import model '{module}:build': SyntaxError" in err
