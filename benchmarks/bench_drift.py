"""Drift detectors against River's (ADWIN, Page-Hinkley, KSWIN) on the same streams: delay, misses, false alarms,
throughput; and the feature detectors (MMD, Mahalanobis) on a trained SmallCNN's MNIST → noisy-MNIST stream.

Streams (seeded, the same arrays for both libraries, saved as ``.npy`` for River's process):

* (i) abrupt: N(0,1) for 5,000 steps, then N(1,1) for 5,000; (ii) gradual: N(0,1), then the mean rises linearly
  from 0 to 1 over 2,000 steps from t=5,000, then N(1,1) to t=10,000 (delay counted from 5,000); 20 seeds each.
* (iii) 100,000 steps of N(0,1), no drift: false alarms per 10,000 steps.
* (iv) the normalised prediction entropy of the issue's SmallCNN (MNIST, cached checkpoint, exported with
  :func:`edgeloop.exporting.run_export` and run by :class:`runtime.model.AdaptableModel`, no TTA) on 5,000
  clean MNIST test images then 5,000 with ``gaussian_noise`` at severity 3; 20 seeds draw the images from the
  test images the export did not look at (it used 264 for golden and parity outputs). The reference features of
  the MMD and Mahalanobis detectors, which watch the penultimate features, are those of the 2,048 training
  images behind the bundle's source statistics (:func:`edgeloop.exporting.export_split` names them).

River runs in its own virtual environment (``river`` is never a project dependency), created on first use in
the benchmark cache (``$EDGELOOP_BENCH_CACHE/river-venv``). River's KSWIN updates at about 2,000 values/s (a
scipy test per value), so it gets 1,000 pre-change values per stream and stops at its first post-change drift,
and 20,000 no-drift values; its throughput is measured on those. A delay is the first drift at or after the
change; a miss is a stream without one.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import fmt, md_table, scratch_dir, side_venv

log = logging.getLogger(__name__)

NAME = "drift"
TITLE = "Drift detectors vs River: delay, false alarms, throughput; feature detectors on a SmallCNN"
CHANGE = 5000
LENGTH = 10_000
RAMP = 2000
SCALAR = ("ADWIN", "PageHinkley", "KSWIN")
KSWIN_PREFIX = 1000
RIVER_SPEC = "river==0.26.1"


# -- streams ----------------------------------------------------------------------------------------------------
def abrupt(seed: int) -> np.ndarray:
    """Stream (i)."""
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(0, 1, CHANGE), rng.normal(1, 1, LENGTH - CHANGE)]


def gradual(seed: int) -> np.ndarray:
    """Stream (ii)."""
    rng = np.random.default_rng(10_000 + seed)
    mean = np.clip((np.arange(LENGTH) - CHANGE) / RAMP, 0.0, 1.0)
    return rng.normal(0, 1, LENGTH) + mean


def entropy_streams(seeds: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, dict[str, Any], tuple]:
    """Stream (iv): per seed the normalised entropies and the features; the reference features; model facts;
    the bundle's class means and shared covariance."""
    from benchmarks import trained
    from device_agents.drift import prediction_entropy
    from edgeloop.data import corrupt, load_dataset
    from edgeloop.exporting import ExportRequest, export_split, run_export
    from runtime.bundle import load_bundle
    from runtime.model import AdaptableModel, softmax

    root = scratch_dir("drift")
    bundle_path = run_export(ExportRequest(model=str(trained.mnist_smallcnn()), out=root / "bundle", dataset="mnist",
                                           formats=("onnx",), int8=False, folded=False,
                                           key_path=root / "signing_key.pem", seed=0))
    bundle = load_bundle(bundle_path, threads=2)
    model = AdaptableModel(bundle)
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    split = export_split(0, len(train), len(test))  # the exporter's draws (run_export, seed 0)
    pool = np.sort(split.held_out[264:])  # test images the export did not look at (golden, parity)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        outs = [model.forward(x[i : i + 512]) for i in range(0, len(x), 512)]
        logits = np.concatenate([o.logits for o in outs])
        feats = np.concatenate([o.features for o in outs]).astype(np.float64)
        return prediction_entropy(softmax(logits), normalized=True), feats, logits.argmax(1)

    _, ref_feats, _ = run(train.x[split.source])  # the training images behind the bundle's source statistics
    means, cov, _ = bundle.manifest.class_gaussians(bundle.root)
    check = max(float(np.abs(ref_feats[train.y[split.source] == k].mean(0) - means[k]).max())
                for k in range(len(means)))
    ent_c, feat_c, pred_c = run(test.x[pool])
    ent_n, feat_n, pred_n = run(corrupt(test.x[pool], "gaussian_noise", 3, seed=0))
    y = test.y[pool]
    entropies, features = [], []
    for seed in range(seeds):
        r = np.random.default_rng(100 + seed)
        clean, noisy = r.choice(len(pool), CHANGE, replace=False), r.choice(len(pool), LENGTH - CHANGE, replace=False)
        entropies.append(np.r_[ent_c[clean], ent_n[noisy]])
        features.append(np.concatenate([feat_c[clean], feat_n[noisy]]))
    facts = {"accuracy_clean": float((pred_c == y).mean()), "accuracy_noisy": float((pred_n == y).mean()),
             "mean_entropy_clean": float(ent_c.mean()), "mean_entropy_noisy": float(ent_n.mean()),
             "feature_dim": int(feat_c.shape[1]), "source_statistics_max_abs_diff": check,
             "reference_rows": len(split.source), "pool": len(pool)}
    return entropies, features, ref_feats, facts, (means, cov)


# -- River in its own environment ---------------------------------------------------------------------------------
def river_python() -> tuple[Path | None, str | None]:
    """River's interpreter (creating its venv on first use), or None and the reason it is unavailable."""
    return side_venv("river-venv", (RIVER_SPEC,), "import river.drift", install_timeout=900)


def run_river(python: Path, jobs: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """Run River's detectors on the jobs in River's interpreter; its JSON output."""
    spec, out = root / "river_spec.json", root / "river_out.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    script = Path(__file__).with_name("drift_river.py")
    subprocess.run([str(python), str(script), str(spec), str(out)], check=True, timeout=1800)
    return json.loads(out.read_text())


# -- scoring -------------------------------------------------------------------------------------------------------
def score(drifts: list[list[int]], change: int) -> dict[str, Any]:
    """Delays (first drift at or after ``change``), misses and alarms before ``change`` over seeds."""
    delays = [next((d - change for d in ds if d >= change), None) for ds in drifts]
    found = [d for d in delays if d is not None]
    return {"median_delay": float(np.median(found)) if found else None, "delays": delays,
            "misses": sum(d is None for d in delays), "early_alarms": sum(sum(d < change for d in ds) for ds in drifts),
            "streams": len(drifts)}


def ours(name: str) -> Any:
    """Our detector with its default hyperparameters."""
    from device_agents.drift import ADWIN, KSWIN, PageHinkley

    return {"ADWIN": ADWIN, "PageHinkley": PageHinkley, "KSWIN": KSWIN}[name]()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def per_sample(det: Any, values: np.ndarray) -> list[int]:
    """Drift positions from per-sample updates."""
    return [i for i, x in enumerate(values.tolist()) if det.update(x).drift_detected]


def run(quick: bool) -> dict[str, Any]:
    """Measure everything; River's side in its own process."""
    seeds = 4 if quick else 20
    no_drift_len = 20_000 if quick else 100_000
    root = scratch_dir("drift-streams")
    streams: dict[str, list[np.ndarray]] = {"abrupt": [abrupt(s) for s in range(seeds)],
                                            "gradual": [gradual(s) for s in range(seeds)]}
    entropies, features, ref_feats, facts, gauss = entropy_streams(seeds)
    streams["entropy"] = entropies
    quiet = np.random.default_rng(999).normal(0, 1, no_drift_len)
    short = root / "none_kswin.npy"  # River's KSWIN: a 20,000-value no-drift stream (its speed)
    np.save(short, quiet[:20_000])
    jobs = []
    for kind, arrays in {**streams, "none": [quiet]}.items():
        for s, arr in enumerate(arrays):
            path = root / f"{kind}_{s}.npy"
            np.save(path, arr)
            for det in SCALAR:
                kswin = det == "KSWIN"
                job = {"key": f"{det}/{kind}/{s}", "path": str(path), "detector": det,
                       "kwargs": {"seed": s} if kswin else {}}
                if kswin and kind == "none":
                    job["path"] = str(short)
                elif kswin:
                    job.update(start=CHANGE - KSWIN_PREFIX, stop_after=CHANGE)
                jobs.append(job)
    python, why = river_python()
    river: dict[str, Any] | None = None
    if python is not None:
        log.info("running River's detectors (%d jobs)", len(jobs))
        river = run_river(python, jobs, root)
    results: dict[str, Any] = {"seeds": seeds, "no_drift_length": no_drift_len, "model": facts,
                               "river_available": river is not None, "river_error": why,
                               "river_version": river["river_version"] if river else None,
                               "kswin_prefix": KSWIN_PREFIX, "ours": {}, "river": {}, "throughput": {}}
    for det in SCALAR:
        mine: dict[str, Any] = {}
        for kind, arrays in streams.items():
            mine[kind] = score([ours(det).update_many(a) for a in arrays], CHANGE)
        found, secs = timed(lambda d=det: ours(d).update_many(quiet))
        mine["none"] = {"alarms": len(found), "per_10k": len(found) / len(quiet) * 1e4}
        n_single = min(len(quiet), 20_000 if det == "KSWIN" else len(quiet))
        single, single_secs = timed(lambda d=det, n=n_single: per_sample(ours(d), quiet[:n]))
        results["ours"][det] = mine
        mine["none"]["per_sample_path_equal"] = single == ours(det).update_many(quiet[:n_single])
        tp = {"ours_vectorized": len(quiet) / secs, "ours_per_sample": n_single / single_secs}
        if river:
            theirs = {kind: score([river["jobs"][f"{det}/{kind}/{s}"]["drifts"] for s in range(seeds)], CHANGE)
                      for kind in streams}
            job = river["jobs"][f"{det}/none/0"]
            theirs["none"] = {"alarms": len(job["drifts"]), "per_10k": len(job["drifts"]) / job["fed"] * 1e4,
                              "values": job["fed"]}
            results["river"][det] = theirs
            tp["river_per_sample"] = job["fed"] / job["seconds"]
        results["throughput"][det] = tp
    results["features"] = feature_detectors(features, ref_feats, gauss)
    results["targets"] = targets(results)
    return results


def feature_detectors(features: list[np.ndarray], ref: np.ndarray, gauss: tuple) -> dict[str, Any]:
    """MMD and Mahalanobis on stream (iv)'s features (reference: the bundle's source images)."""
    from device_agents.drift import MahalanobisDrift, MMDDrift

    configs: dict[str, Callable[[], Any]] = {
        "MMD (source reference)": lambda: MMDDrift(ref),
        "Mahalanobis (source reference)": lambda: MahalanobisDrift(*gauss, reference=ref),
        "Mahalanobis (first 1,000 stream rows)": lambda: MahalanobisDrift(*gauss),
    }
    out = {}
    for label, make in configs.items():
        det, init_s = timed(make)
        drifts, secs = [], 0.0
        for f in features:
            det.reset()
            found, s = timed(lambda f=f, d=det: d.update_many(f))
            drifts.append(found)
            secs += s
        out[label] = {**score(drifts, CHANGE), "init_s": init_s, "rows_per_s": sum(len(f) for f in features) / secs,
                      "threshold": det.threshold, "params": repr(det)}
    return out


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed from the measured numbers (None where River did not run)."""
    if not r["river_available"]:
        return {}
    adwin = r["river"]["ADWIN"]
    fa_bound = adwin["none"]["per_10k"]
    out: dict[str, Any] = {}
    for det in SCALAR:
        mine = r["ours"][det]
        out[det] = {
            "false_alarms_le_river_adwin": mine["none"]["per_10k"] <= fa_bound,
            **{f"delay_le_river_adwin_{k}": _le(mine[k], adwin[k]) for k in ("abrupt", "gradual", "entropy")},
        }
    best = min(r["features"].items(), key=lambda kv: kv[1]["median_delay"] if kv[1]["median_delay"] is not None
               else np.inf)
    ent = adwin["entropy"]
    label, feat = best
    out["feature_on_entropy_stream"] = {
        "detector": label, "median_delay": feat["median_delay"], "river_adwin_median_delay": ent["median_delay"],
        "at_most_half": _le(feat, ent, factor=0.5),
        "no_more_early_alarms_than_river_adwin": feat["early_alarms"] <= ent["early_alarms"],
        "no_more_misses": feat["misses"] <= ent["misses"],
    }
    tp = r["throughput"]
    fast = {det: tp[det]["ours_vectorized"] / tp[det]["river_per_sample"] for det in SCALAR}
    out["throughput"] = {"ADWIN_vectorized_ge_river": fast["ADWIN"] >= 1.0,
                         "PageHinkley_vectorized_ge_river": fast["PageHinkley"] >= 1.0,
                         "KSWIN_vectorized_ge_10x_river": fast["KSWIN"] >= 10.0}
    return out


def _le(mine: dict[str, Any], theirs: dict[str, Any], factor: float = 1.0) -> bool:
    """Median delay no worse than ``factor`` × theirs, with no more misses."""
    if mine["median_delay"] is None:
        return False
    if theirs["median_delay"] is None:
        return True
    return mine["median_delay"] <= factor * theirs["median_delay"] and mine["misses"] <= theirs["misses"]


# -- markdown --------------------------------------------------------------------------------------------------
def _cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "—"
    return f"{fmt(s['median_delay'], 0)} / {s['misses']} / {s['early_alarms']}"


def render(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section body."""
    m = r["model"]
    parts = []
    if not r["river_available"]:
        parts.append(f"**River could not be installed or run here, so there are no River numbers**: {r['river_error']}")
    rows = []
    for det in SCALAR:
        for who, data in (("edgeloop", r["ours"].get(det)), (f"River {r['river_version']}", r["river"].get(det))):
            if data is None:
                continue
            none = data["none"]
            rows.append([f"{det} ({who})", _cell(data["abrupt"]), _cell(data["gradual"]), _cell(data["entropy"]),
                         f"{none['alarms']} ({fmt(none['per_10k'], 2)})"])
    parts.append(md_table(["detector", "(i) abrupt: median delay / misses / early alarms", "(ii) gradual",
                           "(iv) SmallCNN entropy", f"(iii) alarms in {r['no_drift_length']:,} no-drift steps "
                           "(per 10k)"], rows))
    parts.append(
        f"{r['seeds']} seeds per stream. Defaults everywhere: River's for River; ours are River's for ADWIN and "
        "Page-Hinkley, and for KSWIN `alpha=1e-6, window_size=200, stat_size=60` (River's `alpha=0.005` with a test "
        f"at every step raises an alarm every few hundred steps). River's KSWIN saw {r['kswin_prefix']:,} values "
        "before each change and 20,000 no-drift values (its speed); its early alarms and per-10k rate come from "
        "those. Stream (iv): the SmallCNN's accuracy goes from "
        f"{m['accuracy_clean']:.3f} (clean) to {m['accuracy_noisy']:.3f} (gaussian noise, severity 3) while the "
        f"mean normalised entropy goes from {m['mean_entropy_clean']:.4f} to {m['mean_entropy_noisy']:.4f}.")
    frows = [[label, _cell(f), fmt(f["threshold"], 4), fmt(f["init_s"], 2), fmt(f["rows_per_s"], 0)]
             for label, f in r["features"].items()]
    parts.append("Feature detectors on stream (iv) (the SmallCNN's "
                 f"{m['feature_dim']}-d penultimate features; reference: the {m['reference_rows']:,} training images "
                 "behind the bundle's source statistics; the stream's images are test images; defaults: "
                 "ERT 1,000,000 updates):\n\n"
                 + md_table(["detector", "median delay / misses / early alarms", "threshold", "init s (calibration)",
                             "rows/s"], frows))
    trows = []
    for det, tp in r["throughput"].items():
        river_tp = tp.get("river_per_sample")
        trows.append([det, fmt(tp["ours_per_sample"], 0), fmt(tp["ours_vectorized"], 0), fmt(river_tp, 0),
                      fmt(tp["ours_vectorized"] / river_tp if river_tp else None, 1, "×")])
    parts.append("Throughput, values per second (one process, the no-drift stream):\n\n" + md_table(
        ["detector", "edgeloop `update`", "edgeloop `update_many`", "River `update`", "vectorized / River"], trows))
    parts.append(_render_targets(r.get("targets", {})))
    return "\n\n".join(p for p in parts if p)


def _render_targets(t: dict[str, Any]) -> str:
    if not t:
        return ""
    yes = {True: "met", False: "**not met**"}
    rows = []
    for det in SCALAR:
        d = t[det]
        rows.append([f"{det}: false alarms ≤ River ADWIN's (iii)", yes[d["false_alarms_le_river_adwin"]]])
        for k, label in (("abrupt", "(i)"), ("gradual", "(ii)"), ("entropy", "(iv)")):
            rows.append([f"{det}: median delay ≤ River ADWIN's on {label}, no more misses",
                         yes[d[f"delay_le_river_adwin_{k}"]]])
    f = t["feature_on_entropy_stream"]
    rows.append([f"best feature detector on (iv) ({f['detector']}: {fmt(f['median_delay'], 0)} vs River ADWIN "
                 f"{fmt(f['river_adwin_median_delay'], 0)}) ≤ ½ of River ADWIN's delay", yes[f["at_most_half"]]])
    rows.append(["… with no more early alarms and misses than River ADWIN",
                 yes[f["no_more_early_alarms_than_river_adwin"] and f["no_more_misses"]]])
    tp = t["throughput"]
    rows += [["ADWIN `update_many` ≥ River's ADWIN", yes[tp["ADWIN_vectorized_ge_river"]]],
             ["Page-Hinkley `update_many` ≥ River's", yes[tp["PageHinkley_vectorized_ge_river"]]],
             ["KSWIN `update_many` ≥ 10× River's", yes[tp["KSWIN_vectorized_ge_10x_river"]]]]
    return "Targets (computed from the numbers above):\n\n" + md_table(["target", "verdict"], rows)
