"""``edgeloop export`` refuses what it can refuse before the work: a dataset whose images or classes are not what
the checkpoint's model takes (it used to fine-tune on them for minutes, then fail at calibration, or fail
inside torch naming channels), and an output directory it may not write (it used to find out after fine-tuning)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeloop.cli import main
from exporter.checkpoint import save_checkpoint
from exporter.models import ModelSpec, build_model


@pytest.fixture(autouse=True)
def _default_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", str(tmp_path / "default_key.pem"))


def _checkpoint(tmp_path: Path, spec: ModelSpec) -> Path:
    path = tmp_path / "m.pt"
    save_checkpoint(build_model("small_cnn", spec), "small_cnn", spec, path, {"dataset": "digits"})
    return path


@pytest.mark.parametrize(("spec", "takes"), [
    (ModelSpec(1, 10, 16, (0.3,), (0.4,)), "takes (1, 16, 16) in 10 classes"),
    (ModelSpec(3, 10, 8, (0.3,) * 3, (0.4,) * 3), "takes (3, 8, 8) in 10 classes"),
    (ModelSpec(1, 5, 8, (0.3,), (0.4,)), "takes (1, 8, 8) in 5 classes"),
])
def test_a_dataset_the_model_does_not_take_is_refused_before_fine_tuning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: ModelSpec, takes: str
) -> None:
    ckpt = _checkpoint(tmp_path, spec)
    code = main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--sparsity", "2:4", "--exclude", "features.0"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"dataset digits gives images of shape (1, 8, 8) in 10 classes; the model (small_cnn from {ckpt}) " \
           f"{takes}" in err
    assert not (tmp_path / "out").exists()


def test_an_output_directory_it_may_not_write_is_refused_first(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path, ModelSpec(1, 10, 16, (0.3,), (0.4,)))  # would fail later, on the dataset
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(ckpt), "--out", str(out), "--sparsity", "2:4"]) == 2
    assert f"{out} exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_default_signing_key_that_cannot_sign_is_refused_first(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "default_key.pem").write_text("not a key")
    ckpt = _checkpoint(tmp_path, ModelSpec(1, 10, 16, (0.3,), (0.4,)))  # would fail later, on the dataset
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--sparsity", "2:4"]) == 2
    assert "default_key.pem is not an unencrypted PEM private key" in capsys.readouterr().err


def test_no_default_key_is_created_for_an_export_that_failed(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, ModelSpec(1, 10, 16, (0.3,), (0.4,)))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "default_key.pem").exists()
