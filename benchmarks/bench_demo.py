"""The main job, ``edgeloop demo --out <tmp>``, as a subprocess: wall time, peak RSS and what it reports.

The issue's target is under 3 minutes on 2 cores. Peak RSS is the child's ``ru_maxrss`` as reported by
``/usr/bin/time -f %M`` (GNU time), else the growth of ``getrusage(RUSAGE_CHILDREN).ru_maxrss``; the demo is a
single process (server, agents and distillation run as threads), so that is the peak of the whole job.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import TARGET_CORES, fmt, md_table, scratch_dir, summarize, usable_cores

NAME = "demo"
TITLE = "End to end: `edgeloop demo`"
TARGET_SECONDS = 180.0
GNU_TIME = Path("/usr/bin/time")


def _command(out: Path) -> list[str]:
    """The demo command line, using the suite's interpreter so it runs the same install."""
    return [sys.executable, "-m", "edgeloop.cli", "demo", "--out", str(out)]


def run_once(out: Path) -> dict[str, Any]:
    """Run the demo once into ``out``; return wall seconds, peak RSS (bytes) and the parsed report.json."""
    rss_file = out.parent / f"{out.name}.maxrss"
    cmd = _command(out)
    use_time = GNU_TIME.is_file() and os.access(GNU_TIME, os.X_OK)
    if use_time:
        cmd = [str(GNU_TIME), "-o", str(rss_file), "-f", "%M", *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    env = {**os.environ, "COLUMNS": "160"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"edgeloop demo exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if use_time:
        kib, method = int(rss_file.read_text().split()[-1]), "/usr/bin/time -f %M"
    else:
        kib, method = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "getrusage(RUSAGE_CHILDREN)"
        if kib <= before:
            kib, method = None, "unavailable (an earlier child peaked higher)"
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "peak_rss_bytes": None if kib is None else kib * 1024, "rss_method": method,
            "report_seconds": report["seconds"], "report": report}


def _devices(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-device accuracies and drift scores from one report.json."""
    return [{
        "device_id": d["device_id"], "domains": d["domains"], "source": d["source_accuracy"],
        "alpha_bn": d["adapted_accuracy"], "after_cloud": d["final_accuracy"],
        "whole_stream": d["whole_stream"], "drift_found": d["drift"]["detected_true"],
        "drift_true": len(d["drift"]["true_points"]), "false_alarms": d["drift"]["false_alarms"],
        "samples_uploaded": d["samples_uploaded"],
    } for d in report["devices"]]


def run(quick: bool) -> dict[str, Any]:
    """Run the demo once (quick) or twice; summarise wall time, peak RSS and the reported accuracies."""
    runs = []
    for i in range(1 if quick else 2):
        out = scratch_dir("demo") / f"run{i}"
        result = run_once(out)
        shutil.rmtree(out, ignore_errors=True)
        runs.append(result)
    walls = [r["wall_s"] for r in runs]
    rss = [r["peak_rss_bytes"] for r in runs if r["peak_rss_bytes"] is not None]
    wall = summarize(walls).median
    return {
        "command": "edgeloop demo --out <tmp>", "runs": len(runs), "wall_s": walls,
        "wall_s_median": wall, "report_seconds": [r["report_seconds"] for r in runs],
        "peak_rss_bytes": rss, "rss_method": runs[0]["rss_method"],
        "target_s": TARGET_SECONDS, "target_cores": TARGET_CORES, "cores": usable_cores(),
        "passes_target": wall < TARGET_SECONDS,
        "models": runs[0]["report"]["models"],
        "rounds": [{k: r.get(k) for k in ("round_id", "samples_used", "seconds", "kl_before", "kl_after")}
                   for r in runs[0]["report"]["rounds"]],
        "devices": [_devices(r["report"]) for r in runs],
    }


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _run_agreement(runs: list[list[dict[str, Any]]]) -> str:
    """A sentence on how far the runs' per-device accuracies differ, column by column."""
    spread = {}
    for key, label in (("source", "source"), ("alpha_bn", "α-BN"), ("after_cloud", "after-cloud")):
        per_device = zip(*([d[key] for d in run] for run in runs), strict=True)
        spread[label] = max(max(v) - min(v) for v in per_device)
    same = [k for k, v in spread.items() if v == 0]
    differ = {k: v for k, v in spread.items() if v > 0}
    if not differ:
        return f"All {len(runs)} runs reported identical per-device accuracies."
    parts = "; ".join(f"{k} accuracies differ by up to {v:.3f}" for k, v in differ.items())
    agree = f"{' and '.join(same)} accuracies are identical; " if same else ""
    return (f"Across the {len(runs)} runs, {agree}{parts} (the live run's devices stream and sync in parallel "
            "threads). benchmarks/results/demo.json holds every run.")


def render(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section body."""
    rss = f"{max(r['peak_rss_bytes']) / 2**20:.0f} MiB" if r["peak_rss_bytes"] else "not measured"
    verdict = "**passes**" if r["passes_target"] else "**fails**"
    cores_note = "" if r["cores"] == r["target_cores"] else (
        f" (measured on {r['cores']} cores; the target is defined for {r['target_cores']})")
    head = md_table(["metric", "value"], [
        ["wall time per run (s)", ", ".join(f"{w:.1f}" for w in r["wall_s"])],
        ["median wall time (s)", f"{r['wall_s_median']:.1f}"],
        [f"target < {r['target_s']:.0f} s on {r['target_cores']} cores", verdict + cores_note],
        ["peak RSS (largest run)", f"{rss} ({r['rss_method']})"],
        ["student / teacher test accuracy (clean digits)",
         f"{r['models']['student_test_accuracy']:.3f} / {r['models']['teacher_test_accuracy']:.3f}"],
    ])
    devices = r["devices"][0]
    rows = [[d["device_id"], " → ".join(d["domains"]), fmt(d["source"], 3), fmt(d["alpha_bn"], 3),
             fmt(d["after_cloud"], 3), f"{d['drift_found']} / {d['drift_true']}", d["false_alarms"]]
            for d in devices]
    dev = md_table(["device", "stream", "source", "on-device α-BN", "after cloud", "drift found / true",
                    "false alarms"], rows)
    src, ada, fin = (_mean([d[k] for d in devices]) for k in ("source", "alpha_bn", "after_cloud"))
    text = (f"Accuracies are from the first run's report.json, over each stream after its first cloud update "
            f"(the demo's own table). Averaged over devices: source {fmt(src, 3)}, α-BN {fmt(ada, 3)}, after "
            f"cloud {fmt(fin, 3)}.")
    better_ada = sum(d["alpha_bn"] > d["source"] for d in devices)
    better_fin = sum(d["after_cloud"] > d["alpha_bn"] for d in devices)
    text += (f" α-BN beats the source model on {better_ada} of {len(devices)} devices and the cloud updates beat "
             f"α-BN alone on {better_fin} of {len(devices)}.")
    if r["runs"] > 1:
        text += " " + _run_agreement(r["devices"])
    return "\n\n".join([head, dev, text])
