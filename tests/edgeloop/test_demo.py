"""The demo job on embedded digits: the report holds measured numbers for each device, and a plot."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

from rich.console import Console

from edgeloop.demo import DEVICE_DOMAINS, SAMPLES_PER_DOMAIN, _drift_score, _phase_bounds, run_demo


def test_demo_writes_report_and_plot(tmp_path: Path) -> None:
    log = io.StringIO()
    report = run_demo(tmp_path, devices=2, seed=0, console=Console(file=log))
    assert "device-1" in log.getvalue()
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["devices"] == json.loads(json.dumps(report["devices"]))
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert len(on_disk["rounds"]) == 3 and all(r["update_version"] == i + 1 for i, r in enumerate(on_disk["rounds"]))
    for device, domains in zip(on_disk["devices"], DEVICE_DOMAINS, strict=False):
        for key in ("source_accuracy", "adapted_accuracy", "final_accuracy"):
            assert 0.0 <= device[key] <= 1.0
        assert device["bytes_up"] > 0 and device["bytes_down"] > 0 and device["samples_uploaded"] > 0
        assert device["update_versions"] == [1, 2, 3]
        assert device["domains"] == [d.label for d in domains]
        assert device["drift"]["true_points"] == [SAMPLES_PER_DOMAIN, 2 * SAMPLES_PER_DOMAIN]
        assert device["samples"] == 3 * SAMPLES_PER_DOMAIN
    # the devices start on shifted data or shift later: on-device adaptation must help on average
    gains = [d["whole_stream"]["adapted"] - d["whole_stream"]["source"] for d in on_disk["devices"]]
    assert sum(gains) > 0, gains


def test_phase_bounds_cover_the_stream_in_whole_batches() -> None:
    bounds = _phase_bounds(600, 3)
    assert bounds[0][0] == 0 and bounds[-1][1] == 600
    assert all(lo % 16 == 0 for lo, _ in bounds) and all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_drift_score_matches_each_true_point_once() -> None:
    score = _drift_score([200, 400], [150, 210, 215, 430, 590])
    assert score["detected_true"] == 2 and score["delays"] == [10, 30]
    assert score["false_alarms"] == 3 and score["missed"] == 0
