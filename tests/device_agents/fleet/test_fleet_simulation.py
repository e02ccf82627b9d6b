"""A small fleet against a real server over loopback gRPC: in-process, and on a local Ray instance."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeloop.simulate import SimulationConfig, run_simulation

DEVICES, ROUNDS = 8, 2


def simulate(out: Path, bundle: Path, **changes: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"out": out, "devices": DEVICES, "rounds": ROUNDS, "bundle": bundle, "workers": 2,
                                "scenario": "byzantine", "byzantine": 0.25, "seed": 1}
    settings.update(changes)
    return run_simulation(SimulationConfig(**settings), quiet=True)


@pytest.fixture(scope="module")
def inprocess(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("fleet") / "run"
    return out, simulate(out, digits_bundle)


def test_report_holds_accuracy_bytes_and_drift(inprocess: tuple[Path, dict[str, Any]]) -> None:
    out, report = inprocess
    assert json.loads((out / "report.json").read_text())["devices"] == DEVICES
    for name in ("fleet_accuracy.png", "device_accuracy.png", "bytes.png"):
        assert (out / name).stat().st_size > 5_000
    assert report["errors"]["count"] == 0, report["errors"]["messages"]
    for key in ("federated", "no_adaptation", "local_tta"):
        curve = report["fleet_accuracy"][key]
        assert len(curve) == ROUNDS and all(0.0 <= v <= 1.0 for v in curve)
        per_device = np.asarray(report["per_device"]["accuracy"][key], dtype=float)
        assert per_device.shape == (DEVICES, ROUNDS)
    samples = np.asarray(report["per_device"]["samples"])
    assert samples.shape == (DEVICES, ROUNDS) and samples.min() >= 16
    assert report["bytes"]["up"] > 0 and report["bytes"]["down"] > 0 and report["bytes"]["bundle_downloads"] > 0
    assert len(report["bytes"]["up_per_round"]) == ROUNDS
    assert report["byzantine_devices"] == 2
    # every online device contributed and the server ran a round per round that had contributions
    contributed = report["participation"]["contributed"]
    assert sum(contributed) > 0
    versions = [r["update_version"] for r in report["rounds_detail"] if r["submissions"]]
    assert versions == sorted(versions) and versions[0] >= 1
    assert report["updates_applied"] > 0


def test_drift_is_scored_against_each_devices_known_points(inprocess: tuple[Path, dict[str, Any]]) -> None:
    _, report = inprocess
    total_points = 0
    for dev in report["device_summaries"]:
        truth = [span["start"] for span in dev["schedule"][1:]]
        drift = dev["drift"]
        assert drift["true_points"] == truth
        total_points += len(truth)
        for delay in drift["delays"]:  # each delay is a detection minus the drift point it follows
            assert any(p + delay in drift["detected"] for p in truth) and delay >= 0
        assert drift["detected_true"] + drift["missed"] == len(truth)
        assert drift["false_alarms"] == len(drift["detected"]) - drift["detected_true"]
    assert report["drift"]["true_points"] == total_points > 0


def test_stragglers_and_labelled_devices_over_fedbuff(digits_bundle: Path, tmp_path: Path) -> None:
    report = simulate(tmp_path / "stragglers", digits_bundle, devices=6, rounds=3, scenario="stragglers",
                      labelled=0.5, late=0.5, dropout=0.0, aggregator="fedbuff", plots=False, local_baseline=False)
    assert report["errors"]["count"] == 0, report["errors"]["messages"]
    assert report["late_devices"] == 3 and report["labelled_devices"] == 3
    assert report["zeroth_order_samples"] == sum(
        sum(row) for row, dev in zip(report["per_device"]["samples"], report["device_summaries"], strict=True)
        if dev["labelled"])
    # late devices send nothing in round 1 (their first contribution goes out in round 2)
    assert report["participation"]["contributed"][0] <= 3 < report["participation"]["contributed"][1]
    assert "local_tta" not in report["fleet_accuracy"]
    staleness = [r["metrics"].get("mean_staleness") for r in report["rounds_detail"][1:] if r.get("metrics")]
    assert staleness and max(staleness) > 0  # the late contributions arrived on an older base


def test_bad_fleet_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--devices must be a positive integer"):
        SimulationConfig(out=tmp_path, devices=0)
    with pytest.raises(ValueError, match="--byzantine must be a fraction"):
        SimulationConfig(out=tmp_path, byzantine=1.2)
    with pytest.raises(ValueError, match="--late must be a fraction"):
        SimulationConfig(out=tmp_path, late=2.0)
    with pytest.raises(ValueError, match=r"--restarts must be a fraction in \[0, 1\], got -0.1"):
        SimulationConfig(out=tmp_path, restarts=-0.1)
    with pytest.raises(ValueError, match="unknown aggregator 'mean'"):
        SimulationConfig(out=tmp_path, aggregator="mean")
    with pytest.raises(ValueError, match="dataset 'mnist' is not available"):
        run_simulation(SimulationConfig(out=tmp_path / "o", dataset="mnist", data_dir=tmp_path / "none"), quiet=True)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (the fleet extra)")
def test_ray_engine_runs_the_same_fleet(inprocess: tuple[Path, dict[str, Any]], digits_bundle: Path,
                                        tmp_path: Path) -> None:
    _, local = inprocess
    report = simulate(tmp_path / "ray", digits_bundle, engine="ray")
    assert report["engine"]["name"] == "ray" and report["engine"]["workers"] == 2
    assert report["errors"]["count"] == 0, report["errors"]["messages"]
    # the same seed gives the same fleet, streams, contributions and rounds on either engine
    assert report["per_device"]["accuracy"] == local["per_device"]["accuracy"]
    assert report["participation"] == local["participation"]
    assert report["rollbacks"] == local["rollbacks"]


def test_devices_that_lose_power_boot_from_their_state_files(digits_bundle: Path, tmp_path: Path) -> None:
    """Every device loses power after every round's batches, before its sync (restarts=1): it boots from its
    outbox and state files, registers again and syncs; nothing it had accepted or queued is lost."""
    devices, rounds = 6, 3
    report = simulate(tmp_path / "reboots", digits_bundle, devices=devices, rounds=rounds, scenario="reboots",
                      restarts=1.0, dropout=0.0, byzantine=0.0, plots=False, local_baseline=False)
    assert report["errors"]["count"] == 0, report["errors"]["messages"]
    restarts = report["restarts"]
    assert restarts["count"] == restarts["booted"] == restarts["resumed"] == devices * rounds, restarts
    assert restarts["failed_boots"] == 0 and restarts["not_resumed"] == []
    assert report["participation"]["restarted"] == [devices] * rounds
    assert all(dev["restarts"] == rounds for dev in report["device_summaries"])
    # samples queued for upload during the round wait in the outbox file through the power loss
    assert restarts["outbox_samples"]["after"] == restarts["outbox_samples"]["before"] > 0
    assert restarts["undelivered_reports"]["after"] == restarts["undelivered_reports"]["before"]
    # updates were applied between power losses, and the boots came back holding them
    assert report["updates_applied"] > 0
    held = [r for r in restarts_rows(tmp_path / "reboots") if r["round"] > 0]
    assert held and all(r["restored_version"] == r["version"] >= 1 for r in held)
    assert (tmp_path / "reboots" / "devices" / "sim-0" / "agent_state.sqlite3").is_file()


def restarts_rows(out: Path) -> list[dict[str, Any]]:
    """The per-restart records a run's devices kept (the report holds only the counts and the first misses)."""
    return [row for dev in json.loads((out / "report.json").read_text())["device_restarts"] for row in dev]
