"""The selection benchmark's pieces that need no training: baseline selectors, verdicts and rendering."""

from __future__ import annotations

import numpy as np

from benchmarks import bench_selection as bench


def test_random_selector_copies_the_reference_counts() -> None:
    sel = bench.RandomAtCounts([3, 0, 64], seed=1)
    picks = [sel.select(np.zeros(64), 1) for _ in range(3)]
    assert [p.size for p in picks] == [3, 0, 64]
    assert len(set(picks[0].tolist())) == 3 and picks[2].tolist() == list(range(64))
    assert bench.UploadAll().select(np.zeros(5), 1).tolist() == [0, 1, 2, 3, 4]


def _summary(all_gain: float, cema_gain: float, random_gain: float, cema_up: float) -> dict:
    def row(up: float, gain: float) -> dict:
        return {"uploaded": up, "uploaded_fraction": up / 1000, "gain": gain, "final_accuracy": 0.9,
                "live_accuracy": 0.8}

    return {"upload_all": row(1000, all_gain), "cema": row(cema_up, cema_gain), "random": row(cema_up, random_gain)}


def test_verdicts_follow_the_numbers() -> None:
    v = bench.verdicts(_summary(0.20, 0.19, 0.18, 250))
    assert v["upload_reduction"] == 0.75 and v["gain_retention"] == 0.95
    assert v["meets_reduction"] and v["meets_retention"] and v["beats_random"]
    v = bench.verdicts(_summary(0.20, 0.17, 0.18, 400))
    assert not v["meets_reduction"] and not v["meets_retention"] and not v["beats_random"]
    assert bench.verdicts(_summary(-0.01, 0.1, 0.0, 100))["gain_retention"] is None


def test_render_states_each_verdict() -> None:
    summary = _summary(0.20, 0.19, 0.18, 250)
    rounds = [{"gain": 0.1}, {"gain": 0.3}]
    result = {"summary": summary, "verdicts": bench.verdicts(summary), "domains": ["a:5", "b:4"],
              "stream_per_domain": 10, "eval_per_domain": 10, "batch": 64, "steps": 5, "teacher": "t",
              "budget_fraction": 0.15, "window_batches": 6, "band": bench.BAND, "seeds": [0],
              "targets": {"reduction": 0.7, "retention": 0.9},
              "runs": [{"variant": v, "rounds": rounds} for v in bench.VARIANTS],
              "gains_per_seed": {"upload_all": [0.2], "cema": [0.19], "random": [0.18]}}
    text = bench.render(result)
    assert text.count("**met**") == 3 and "75.0 %" in text and "95.0 %" in text
    assert "per seed, paired: 1.00 pp" in text
