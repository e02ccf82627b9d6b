"""The edgeloop command line, run as a real subprocess and in-process: every subcommand and its --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeloop.cli import build_parser, main
from edgeloop.pipeline import parse_domains

COMMANDS = ("train", "export", "eval", "serve", "agent", "demo", "keygen")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[-1] in text


def test_train_export_eval_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", str(tmp_path / "default_key.pem"))
    ckpt = tmp_path / "student.pt"
    assert main(["train", "--arch", "small_cnn", "--dataset", "digits", "--epochs", "3", "--out", str(ckpt)]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", str(ckpt), "--out", str(bundle), "--calibration-samples", "64"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {m["name"] for m in manifest["models"]} == {"fp32", "int8", "folded_fp32", "folded_int8"}
    assert (tmp_path / "default_key.pem").exists() and (bundle / "manifest.sig").exists()
    # a device that trusts only another key refuses the bundle, naming the signer
    assert main(["keygen", "--out", str(tmp_path / "other.pem")]) == 0
    assert main(["eval", str(bundle), "--trusted-key", str(tmp_path / "other.pem.pub")]) == 2
    assert main(["eval", str(bundle), "--trusted-key", str(tmp_path / "default_key.pem.pub"), "--limit", "50"]) == 0
    clean, noisy = tmp_path / "clean.json", tmp_path / "noisy.json"
    assert main(["eval", str(bundle), "--dataset", "digits", "--json", str(clean)]) == 0
    args = ["eval", str(bundle), "--corruption", "contrast", "--severity", "4", "--tta", "alpha_bn", "--model",
            "int8", "--json", str(noisy)]
    assert main(args) == 0
    clean_result, noisy_result = json.loads(clean.read_text()), json.loads(noisy.read_text())
    assert clean_result["accuracy"] > 0.8 and clean_result["samples"] == 540
    assert noisy_result["model"] == "int8" and noisy_result["tta"] == "alpha_bn"
    assert 0.0 <= noisy_result["accuracy"] <= 1.0


def test_console_script_reports_errors_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "edgeloop.cli", "eval", str(missing)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "bundle directory not found" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_rejects_unknown_tta_and_corruption(digits_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(digits_bundle), "--tta", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["eval", str(digits_bundle), "--corruption", "fog"]) == 2
    assert "fog" in capsys.readouterr().err


def test_eval_takes_tta_settings_and_refuses_bad_ones_by_name(digits_bundle: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``--tta-set KEY=VALUE`` configures the method (here LAME without its balance gate, on the source pass);
    the settings land in the result, and a different setting changes what is measured."""
    base = ["eval", str(digits_bundle), "--corruption", "contrast", "--severity", "4", "--tta", "lame"]
    results = {}
    for label, settings in (("default", []), ("paper", ["--tta-set", "statistics=none",
                                                        "--tta-set", "balanced_laplacian_weight=none",
                                                        "--tta-set", "knn=3"])):
        out = tmp_path / f"{label}.json"
        assert main([*base, *settings, "--json", str(out)]) == 0
        results[label] = json.loads(out.read_text())
    assert results["default"]["tta_settings"] == {}
    assert results["paper"]["tta_settings"] == {"statistics": "none", "balanced_laplacian_weight": "none", "knn": "3"}
    assert results["paper"]["accuracy"] != results["default"]["accuracy"]
    for bad, named in ((["--tta-set", "knn=many"], "'knn': 'many' is not an integer"),
                       (["--tta-set", "kn=3"], "no setting 'kn'"),
                       (["--tta-set", "knn=0"], "knn must be >= 1"),
                       (["--tta-set", "knn"], "is not KEY=VALUE")):
        assert main([*base, *bad]) == 2
        assert named in capsys.readouterr().err


def test_parse_domains() -> None:
    domains = parse_domains("clean:0, gaussian_noise:4,contrast")
    assert [d.label for d in domains] == ["clean", "gaussian_noise@4", "contrast@3"]
    with pytest.raises(ValueError, match="severity"):
        parse_domains("contrast:x")
    with pytest.raises(ValueError):
        parse_domains("contrast:9")


@pytest.mark.parametrize(("value", "reason"), [("a,b", "two numbers"), ("0", "two numbers"), ("1,0", "lo < hi"),
                                               ("0,inf", "finite")])
def test_export_names_a_bad_value_range(value: str, reason: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--from-onnx", str(tmp_path / "m.onnx"), "--dataset", "mnist", "--out", str(tmp_path / "b"),
              "--value-range", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --value-range" in err and reason in err
    # not given: None, so that it can be refused for a torch model; wrapping then uses (0, 1)
    assert build_parser().parse_args(["export", "--from-onnx", "m", "--out", "b"]).value_range is None
    assert build_parser().parse_args(["export", "--from-onnx", "m", "--out", "b", "--value-range", "0,255"]
                                     ).value_range == (0.0, 255.0)


def test_a_missing_optional_dependency_names_the_install(digits_bundle: Path) -> None:
    """A device install without the data extra: `edgeloop eval` says what to install, without a traceback."""
    code = ("import sys\n"
            "for name in ('sklearn', 'scipy'):\n"
            "    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError\n"
            "from edgeloop.cli import main\n"
            f"sys.exit(main(['eval', {str(digits_bundle)!r}, '--dataset', 'digits']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "edgeloop eval: error: this command needs" in proc.stderr and 'pip install ".[data]"' in proc.stderr
    assert "Traceback" not in proc.stderr
