"""The TTA benchmark's verdicts come from the measured numbers: targets and rendering on synthetic results."""

from __future__ import annotations

from typing import Any

from benchmarks import bench_tta

CORRUPTIONS = ["gaussian_noise", "contrast"]


def _entry(mean: float) -> dict[str, Any]:
    return {"mean": mean, "per_domain": dict.fromkeys(CORRUPTIONS, mean), "seconds": 0.1}


def _results(*, lame: float = 0.9, alpha_ms: float = 1.2, foa_ms: float = 9.0, foa_peak: float = 1.1
             ) -> dict[str, Any]:
    methods = bench_tta.forward_only_methods()
    means = {name: 0.9 for name in methods} | {"source": 0.8, "lame": lame, "tent": 0.8, "tent_reset": 0.8,
                                               "eata": 0.8}
    cell = {"methods": {name: _entry(m) for name, m in means.items()}}
    accuracy = {"s5": {order: {str(b): cell for b in bench_tta.BATCHES} for order in ("shuffled", "class_sorted")}}
    times = {name: 1.5 for name in methods} | {"plain": 1.0, "alpha_bn": alpha_ms, "foa": foa_ms, "tent": 5.0,
                                               "eata": 5.0}
    rows = {name: {"ms_per_batch": {"median": t, "p25": t, "p75": t, "n": 3}, "time_vs_plain": t,
                   "throughput_vs_plain": 1.0 / t, "peak_rss_kb": 100_000,
                   "peak_vs_plain": foa_peak if name == "foa" else 1.0}
            for name, t in times.items()}
    cost = {"rounds": 3, "block_s": 0.05, "worker_batches": 4, "batches": {str(b): rows for b in bench_tta.BATCHES}}
    case = {"arch": "smallcnn", "dataset": "mnist", "checkpoint": "x.pt", "checkpoint_test_accuracy": 0.99,
            "samples_per_domain": 64, "accuracy": accuracy, "cost": cost}
    results = {"seed": 0, "methods": methods, "backprop": list(bench_tta.BACKPROP), "corruptions": CORRUPTIONS,
               "backprop_configs": {"fisher_samples": 128}, "foreign": {"available": False},
               "cases": {"mnist": case}}
    results["targets"] = bench_tta.targets(results)
    return results


def _verdicts(results: dict[str, Any]) -> dict[str, bool | None]:
    return {t["id"]: t["passes"] for t in results["targets"]}


def test_all_targets_pass_when_the_numbers_meet_them() -> None:
    results = _results()
    assert _verdicts(results) == {"T1": True, "T2": True, "T3": True, "T4": True, "T5": True}
    text = bench_tta.render(results)
    assert "**passes**" in text and "**fails**" not in text


def test_each_target_fails_on_its_own_numbers() -> None:
    assert _verdicts(_results(lame=0.79))["T2"] is False  # one forward-only method below source
    assert _verdicts(_results(alpha_ms=1.3))["T3"] is False  # 0.77x plain throughput
    assert _verdicts(_results(foa_ms=11.0))["T5"] is False  # 0.09x plain throughput
    assert _verdicts(_results(foa_peak=1.25))["T4"] is False
    failing = _results(lame=0.79)
    assert "**fails**" in bench_tta.render(failing)


def test_t1_says_unreachable_where_tent_plus_the_margin_exceeds_clean_accuracy() -> None:
    results = _results()
    results["cases"]["mnist"]["checkpoint_test_accuracy"] = 0.81  # Tent 0.80 + 2 points > 0.81
    results["targets"] = bench_tta.targets(results)
    t1 = results["targets"][0]
    assert t1["passes"] is True  # still judged on the numbers: 0.90 >= 0.82
    assert all(c["unreachable"] == ["shuffled", "class_sorted"] for c in t1["checks"])
    for cell in results["cases"]["mnist"]["accuracy"]["s5"].values():
        for entry in cell.values():
            entry["methods"]["foa"] = _entry(0.815)
            entry["methods"]["alpha_bn"] = _entry(0.815)
            entry["methods"]["t3a"] = _entry(0.815)
            entry["methods"]["lame"] = _entry(0.815)
    results["targets"] = bench_tta.targets(results)
    assert _verdicts(results)["T1"] is False
    text = bench_tta.render(results)
    assert "unreachable: Tent + 2 > clean top-1 81.0%" in text and "FAIL (unreachable)" in text


def test_litert_rows_add_their_own_t3_and_t4_checks() -> None:
    results = _results()
    for rows in results["cases"]["mnist"]["cost"]["batches"].values():
        for name, t, peak in (("plain_litert", 1.0, 1.0), ("source_litert", 1.1, 1.05), ("alpha_bn_litert", 1.4, 1.3)):
            rows[name] = {"ms_per_batch": {"median": t, "p25": t, "p75": t, "n": 3}, "time_vs_plain": t,
                          "throughput_vs_plain": 1.0 / t, "peak_rss_kb": 100_000, "peak_vs_plain": peak}
    results["targets"] = bench_tta.targets(results)
    t3 = {c["setting"]: c for c in results["targets"][2]["checks"]}
    assert len(t3) == 2 * len(bench_tta.BATCHES)
    assert all(c["passes"] for label, c in t3.items() if label.endswith("onnxruntime"))
    assert not any(c["passes"] for label, c in t3.items() if label.endswith("LiteRT"))  # 0.71x
    t4 = results["targets"][3]
    assert t4["passes"] is False and "alpha_bn_litert" in t4["checks"][0]["measured"]
    assert "`alpha_bn_litert`" in bench_tta.render(results)
