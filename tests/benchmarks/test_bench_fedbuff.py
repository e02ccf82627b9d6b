"""The fedbuff benchmark's driver on a real server (a short window) and its renderer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from benchmarks import bench_fedbuff

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "fedbuff.json"


def test_the_driver_accounts_for_every_submission(digits_bundle: Path) -> None:
    out = bench_fedbuff._serve("fedbuff", SimpleNamespace(bundle=digits_bundle), 4, 0.5)
    assert out["errors"] == 0 and out["drained"] and out["submissions"] > 0
    assert out["versions"] * bench_fedbuff.BUFFER + out["left_in_buffer"] == out["submissions"]
    assert 0 <= out["mean_staleness"] <= out["max_staleness"]


def test_render_reads_the_committed_result() -> None:
    text = bench_fedbuff.render(json.loads(RESULTS.read_text())["results"])
    assert "Back to back" in text and "Paced" in text and "passes / step" in text
