"""``edgeloop simulate`` on the command line: scenarios in --help, bad arguments named with exit code 2, a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agents.fleet.scenarios import SCENARIOS
from edgeloop.cli import main


def test_help_lists_every_scenario_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name, scenario in SCENARIOS.items():
        assert name in text and scenario.description.split()[0] in text
    for flag in ("--devices", "--dataset", "--scenario", "--rounds", "--out", "--engine", "--address", "--server",
                 "--aggregator", "--byzantine", "--dropout", "--quiet"):
        assert flag in text


@pytest.mark.parametrize(("args", "message"), [
    (["--devices", "0"], "--devices must be a positive integer, got 0"),
    (["--rounds", "-1"], "--rounds must be a positive integer"),
    (["--scenario", "tornado"], "unknown scenario 'tornado'; known: mixed"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'; known: digits, mnist, cifar10"),
    (["--engine", "spark"], "unknown engine 'spark'; known: inprocess, ray"),
    (["--aggregator", "mean"], "unknown aggregator 'mean'"),
    (["--byzantine", "1.5"], "--byzantine must be a fraction in [0, 1], got 1.5"),
    (["--dropout", "-0.2"], "--dropout must be a fraction in [0, 1], got -0.2"),
    (["--dropout", "1"], "--dropout must be below 1"),
    (["--attack", "bribe"], "unknown attack 'bribe'"),
    (["--address", "auto"], "--address joins a Ray cluster; it needs --engine ray"),
    (["--tta", "magic"], "unknown TTA method 'magic'"),
    (["--contribution-encoding", "zip"], "unknown --contribution-encoding 'zip'"),
    (["--aggregator-option", "nokey"], "--aggregator-option must be KEY=VALUE"),
    (["--tta-set", "nokey"], "TTA setting 'nokey' is not KEY=VALUE"),
    (["--tta-set", "alpha=2"], "TTA setting 'alpha' = '2': alpha must be in [0, 1]"),
    (["--tta", "lame", "--tta-set", "knn=few"], "TTA setting 'knn': 'few' is not an integer"),
])
def test_bad_arguments_exit_2_naming_the_problem(args: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert "edgeloop simulate: error:" in err and message in err
    assert not (tmp_path / "o").exists()  # refused before anything was created


@pytest.mark.parametrize(("manifest", "message"), [
    ('{"schema_version": 2, "name": "zoo", "arch": "foreign"}', "bundle 'zoo' has no adaptable parameters"),
    ('{"schema_version": 2, "name": "zoo", "adaptable": null}', "bundle 'zoo' has no adaptable parameters"),
    ("{not json", "manifest.json is unreadable"),
])
def test_a_bundle_without_adaptable_parameters_is_refused(manifest: str, message: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "zoo"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(manifest, encoding="utf-8")
    assert main(["simulate", "--out", str(tmp_path / "o"), "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bundle) in err
    assert not (tmp_path / "o").exists()


def test_missing_shared_data_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--out", str(tmp_path / "o"), "--dataset", "cifar10", "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "dataset 'cifar10' is not available" in err and str(tmp_path) in err


def test_a_small_run_writes_the_report(digits_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fleet"
    run = ["simulate", "--devices", "4", "--rounds", "1", "--out", str(out), "--bundle", str(digits_bundle),
           "--scenario", "stationary", "--workers", "2", "--no-plots", "--quiet", "--aggregator", "median",
           "--tta-set", "alpha=0.5"]
    assert main(run) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["devices"] == 4 and report["config"]["aggregator"] == "median"
    assert report["config"]["tta_settings"] == {"alpha": "0.5"}
    assert report["errors"]["count"] == 0 and report["drift"]["true_points"] == 0
    assert "report:" in capsys.readouterr().out
    # the same directory again: a fresh registry, so the same versions and accuracies (seeded)
    assert main(run) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["per_device"]["accuracy"] == report["per_device"]["accuracy"]
    versions = [r["update_version"] for r in report["rounds_detail"]]
    assert [r["update_version"] for r in again["rounds_detail"]] == versions == [1]
