"""`edgeloop export --trainable` and `edgeloop federate`: trainer devices through a real server, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from edgeloop.cli import main
from runtime.manifest import read_manifest


def test_export_trainable_ships_the_checkpoints_weights(tmp_path: Path) -> None:
    import torch

    ckpt, out = tmp_path / "s.pt", tmp_path / "b"
    assert main(["train", "--arch", "small_cnn", "--epochs", "1", "--out", str(ckpt)]) == 0
    assert main(["keygen", "--out", str(tmp_path / "k.pem")]) == 0
    assert main(["export", str(ckpt), "--out", str(out), "--no-int8", "--no-folded", "--trainable",
                 "--signing-key", str(tmp_path / "k.pem")]) == 0
    manifest, _ = read_manifest(out)
    weights = manifest.trainable_params(out)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    # every learnable weight and each batch-norm layer's running statistics, bit-exact from the checkpoint
    assert {k for k in state if k.endswith((".weight", ".bias", ".running_mean", ".running_var"))} <= set(weights)
    assert set(weights) <= set(state)
    for name, value in weights.items():
        assert np.array_equal(value, state[name].numpy()), name


@pytest.mark.slow
def test_federate_runs_rounds_and_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["federate", "--devices", "6", "--per-round", "3", "--rounds", "3", "--encoding",
                 "int8_topk_delta", "--byzantine", "0.2", "--aggregator", "trimmed_mean",
                 "--aggregator-option", "beta=0.34", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["accuracy"]) == 3 and all(0.0 <= a <= 1.0 for a in report["accuracy"])
    assert report["accuracy"][-1] > 0.2  # digits: chance is 0.1; three rounds of local SGD learn
    assert report["config"]["aggregator"] == "trimmed_mean" and report["config"]["aggregator_options"] == {"beta": 0.34}
    assert len(report["byzantine_clients"]) == 1
    assert report["messages_up"] == 9 and report["bytes_up"] > 0 and report["bytes_down"] > 0
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--devices", "0"], "--devices"),
    (["--devices", "4", "--per-round", "5"], "--per-round"),
    (["--byzantine", "1.5"], "--byzantine"),
    (["--topk-fraction", "0"], "--topk-fraction"),
    # refused before the run starts, not once a byzantine device is first sampled (the rounds before were lost)
    (["--byzantine", "0.25", "--attack-scale", "nan"], "attack_scale must be a positive finite number, got nan"),
    (["--byzantine", "0.25", "--attack-scale", "-2"], "attack_scale must be a positive finite number, got -2.0"),
    (["--alpha", "inf"], "alpha (the Dirichlet concentration) must be a positive finite number, got inf"),
    (["--aggregator-option", "novalue"], "KEY=VALUE"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent-edgeloop"], "not available"),
])
def test_federate_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                        message: str) -> None:
    assert main(["federate", "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err
