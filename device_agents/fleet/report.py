"""The fleet report: accuracy over rounds (fleet and per device) against the baselines, bytes, drift detection
against the known drift points, rollbacks and errors; ``report.json`` and PNG plots (matplotlib, lazily).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.fleet.scenarios import DeviceSpec
from device_agents.fleet.worker import DeviceRound

DETECTION_WINDOW = 200
"""A detection counts for a drift point when it comes within this many samples after it (and before the next)."""


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _nan_list(a: np.ndarray, digits: int = 4) -> list[Any]:
    """Round and turn NaN into None (JSON null), keeping nesting."""
    if a.ndim > 1:
        return [_nan_list(row, digits) for row in a]
    return [None if not math.isfinite(float(v)) else round(float(v), digits) for v in a]


def score_drift(truth: Sequence[int], detected: Sequence[int], length: int,
                window: int = DETECTION_WINDOW) -> dict[str, Any]:
    """Match each true drift point to the first detection in ``[point, min(point + window, next point))``.

    Detections that match no point are false alarms. Returns delays (samples), counts and both lists.
    """
    truth = sorted(int(t) for t in truth)
    detected = sorted(int(d) for d in detected)
    bounds = [*truth[1:], length] if truth else []
    delays: list[int] = []
    matched: set[int] = set()
    for point, nxt in zip(truth, bounds, strict=True):
        hit = next((d for d in detected if point <= d < min(point + window, nxt) and d not in matched), None)
        if hit is not None:
            matched.add(hit)
            delays.append(hit - point)
    return {"true_points": truth, "detected": detected, "detected_true": len(delays),
            "missed": len(truth) - len(delays), "false_alarms": len([d for d in detected if d not in matched]),
            "delays": delays}


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 2), "median": round(float(np.median(a)), 2),
            "p90": round(float(np.percentile(a, 90)), 2)}


def build_report(
    specs: Sequence[DeviceSpec], runs: Sequence[Sequence[DeviceRound]], syncs: Sequence[Sequence[DeviceRound]],
    finals: Sequence[dict[str, Any]], *, rounds_info: Sequence[dict[str, Any]], config: dict[str, Any],
    timings: dict[str, float], setup: Sequence[dict[str, Any]], batch_size: int, round_errors: Sequence[str] = (),
    detection_window: int = DETECTION_WINDOW,
) -> dict[str, Any]:
    """Everything ``report.json`` holds (see README "Fleet simulation")."""
    n, r = len(specs), len(runs)
    samples, correct, source, local = (np.zeros((n, r)) for _ in range(4))
    online = np.zeros((n, r), dtype=bool)
    learned = np.zeros((n, r), dtype=np.int64)
    contributed = np.zeros((n, r), dtype=bool)
    restarted = np.zeros((n, r), dtype=bool)
    up, down = np.zeros((n, r), dtype=np.int64), np.zeros((n, r), dtype=np.int64)
    phase = dict.fromkeys(("rounds_up", "rounds_down", "sync_up", "sync_down"), 0)
    errors = 0
    for k, (run, sync) in enumerate(zip(runs, syncs, strict=True)):
        for rec in run:
            i = rec.index
            samples[i, k], correct[i, k] = rec.samples, rec.correct
            source[i, k], local[i, k] = rec.source_correct, rec.local_correct
            online[i, k], contributed[i, k] = rec.online, rec.contributed
            learned[i, k] = getattr(rec, "learned", 0)
            up[i, k] += rec.bytes_up
            down[i, k] += rec.bytes_down
            phase["rounds_up"] += rec.bytes_up
            phase["rounds_down"] += rec.bytes_down
            errors += len(rec.errors)
        for rec in sync:
            restarted[rec.index, k] = getattr(rec, "restarted", False)
            up[rec.index, k] += rec.bytes_up
            down[rec.index, k] += rec.bytes_down
            phase["sync_up"] += rec.bytes_up
            phase["sync_down"] += rec.bytes_down
            errors += len(rec.errors)
    has_local = bool(config.get("local_baseline", True))
    fleet = {
        "federated": _ratio(correct.sum(0), samples.sum(0)),
        "no_adaptation": _ratio(source.sum(0), samples.sum(0)),
    }
    if has_local:
        fleet["local_tta"] = _ratio(local.sum(0), samples.sum(0))
    per_device = {"federated": _ratio(correct, samples), "no_adaptation": _ratio(source, samples)}
    if has_local:
        per_device["local_tta"] = _ratio(local, samples)
    gain = per_device["federated"] - per_device["no_adaptation"]
    byz = np.asarray([s.byzantine is not None for s in specs])
    lab = np.asarray([bool(getattr(s, "labelled", False)) for s in specs])

    def overall(c: np.ndarray, mask: np.ndarray | None = None) -> float | None:
        m = np.ones(n, dtype=bool) if mask is None else mask
        total = samples[m].sum()
        return round(float(c[m].sum() / total), 4) if total > 0 else None

    drift_rows, by_kind = [], {}
    for spec, final in zip(specs, finals, strict=True):
        length = spec.samples(r, batch_size)
        score = score_drift(spec.drift_points, final["drift_detected"], length, detection_window)
        drift_rows.append(score)
        agg = by_kind.setdefault(spec.drift_kind, {"devices": 0, "true_points": 0, "detected_true": 0, "missed": 0,
                                                   "false_alarms": 0, "delays": []})
        agg["devices"] += 1
        agg["true_points"] += len(score["true_points"])
        for key in ("detected_true", "missed", "false_alarms"):
            agg[key] += score[key]
        agg["delays"].extend(score["delays"])
    all_delays = [d for row in drift_rows for d in row["delays"]]
    total_samples = float(samples.sum())
    drift = {
        "window": detection_window,
        "true_points": sum(len(row["true_points"]) for row in drift_rows),
        "detected_true": sum(row["detected_true"] for row in drift_rows),
        "missed": sum(row["missed"] for row in drift_rows),
        "false_alarms": sum(row["false_alarms"] for row in drift_rows),
        "false_alarms_per_1000_samples": round(1000 * sum(row["false_alarms"] for row in drift_rows)
                                               / max(total_samples, 1), 3),
        "delay_samples": _stats(all_delays),
        "by_kind": {kind: {**{k: v for k, v in agg.items() if k != "delays"}, "delay_samples": _stats(agg["delays"])}
                    for kind, agg in sorted(by_kind.items())},
    }
    if finals:  # each device counts every error it met (batches, contributions, syncs)
        errors = sum(int(f["errors"]) for f in finals)
    messages = [m for f in finals for m in f["error_messages"]][:20] + list(round_errors)[:20]
    bundle_bytes = sum(int(s.get("bundle_bytes", 0)) for s in setup)
    percentiles = (10, 25, 50, 75, 90)

    def pct(a: np.ndarray) -> dict[str, list[Any]]:
        out = {}
        for p in percentiles:
            with np.errstate(all="ignore"):
                col = [np.nanpercentile(a[:, k], p) if np.isfinite(a[:, k]).any() else np.nan for k in range(r)]
            out[f"p{p}"] = _nan_list(np.asarray(col, dtype=np.float64))
        return out

    report = {
        "config": config,
        "devices": n,
        "rounds": r,
        "wall_seconds": round(timings.get("total", 0.0), 2),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "errors": {"count": int(errors) + len(round_errors), "device_errors": int(errors),
                   "round_errors": len(round_errors), "messages": messages},
        "fleet_accuracy": {k: _nan_list(v) for k, v in fleet.items()},
        "overall_accuracy": {
            "federated": overall(correct), "no_adaptation": overall(source),
            **({"local_tta": overall(local)} if has_local else {}),
            "honest_devices": {"federated": overall(correct, ~byz), "no_adaptation": overall(source, ~byz)},
            "byzantine_devices": {"federated": overall(correct, byz), "no_adaptation": overall(source, byz)}
            if byz.any() else None,
            "labelled_devices": {"federated": overall(correct, lab), "no_adaptation": overall(source, lab),
                                 **({"local_tta": overall(local, lab)} if has_local else {})} if lab.any() else None,
            "last_round": {k: _nan_list(v[-1:])[0] for k, v in fleet.items()},
        },
        "device_accuracy_spread": {"federated": pct(per_device["federated"]),
                                   "gain_vs_no_adaptation": pct(gain)},
        "participation": {"online": online.sum(0).astype(int).tolist(),
                          "contributed": contributed.sum(0).astype(int).tolist(),
                          "restarted": restarted.sum(0).astype(int).tolist()},
        "restarts": restart_summary([row for f in finals for row in f.get("restarts", [])]),
        "device_restarts": [list(f.get("restarts", [])) for f in finals],
        "rounds_detail": list(rounds_info),
        "bytes": {
            "up": int(up.sum()), "down": int(down.sum()),
            "up_per_round": up.sum(0).astype(int).tolist(), "down_per_round": down.sum(0).astype(int).tolist(),
            "by_phase": phase,
            "bundle_downloads": bundle_bytes, "bundle_downloads_count": len(setup),
            "up_per_device_mean": round(float(up.sum() / max(n, 1)), 1),
            "down_per_device_mean": round(float(down.sum() / max(n, 1)), 1),
            "note": "serialized protobuf bytes (ByteSize) of every device message sent and received; the bundle "
                    "is downloaded once per worker and shared by its devices (bundle_downloads, not in up/down); "
                    "by_phase: 'rounds' = while streaming (drift reports, contributions), 'sync' = after the "
                    "server's round (sample uploads, outbox reports, signed updates)",
        },
        "drift": drift,
        "rollbacks": int(sum(f["rollbacks"] for f in finals)),
        "updates_applied": int(sum(len(f["update_versions"]) for f in finals)),
        "rejected_updates": int(sum(f["rejected_updates"] for f in finals)),
        "byzantine_devices": int(byz.sum()),
        "labelled_devices": int(lab.sum()),
        "late_devices": int(sum(bool(getattr(s, "late", False)) for s in specs)),
        "zeroth_order_samples": int(learned.sum()),
        "per_device": {
            "device_ids": [s.device_id for s in specs],
            "accuracy": {k: _nan_list(v) for k, v in per_device.items()},
            "samples": samples.astype(int).tolist(),
            "online": online.astype(int).tolist(),
        },
        "device_summaries": [
            {**spec.summary(), "drift": {k: v for k, v in row.items()},
             **{k: final[k] for k in ("update_versions", "rollbacks", "rejected_updates", "uploaded_samples",
                                      "bytes_up", "bytes_down", "contributions", "contributor", "errors")},
             "restarts": len(final.get("restarts", []))}
            for spec, row, final in zip(specs, drift_rows, finals, strict=True)
        ],
    }
    return report


def restart_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the devices' power losses cost them (rows: :meth:`FleetWorker._restart`'s records, one per boot
    attempt: a boot that failed is retried at the next sync, marked ``retry``, against what the device held
    before the power loss).

    ``resumed``: boots that came back with the parameters and both versions held before the power loss (none
    restored counts as v0: a device that had applied no update starts from the bundle's parameters, which is
    what it held); ``tta_restored``: boots whose TTA method took over its saved state (a state saved for
    parameters an update has since replaced is not restored, by design); outbox samples and undelivered reports
    before the power loss and after the boot."""
    booted = [row for row in rows if row.get("booted")]
    losses = [row for row in rows if not row.get("retry")]  # a retried boot belongs to the same power loss
    resumed = [row for row in booted if "version" in row
               and (row["restored_version"] or 0, row["restored_active_version"] or 0)
               == (row["version"], row["active_version"])]
    return {
        "count": len(losses), "booted": len(booted), "failed_boots": len(rows) - len(booted),
        "resumed": len(resumed), "tta_restored": sum(bool(row["restored_tta"]) for row in booted),
        "detector_restored": sum(bool(row.get("restored_detector")) for row in booted),
        "selector_restored": sum(bool(row.get("restored_selector")) for row in booted),
        "outbox_samples": {"before": sum(int(row.get("outbox_pending", 0)) for row in booted),
                           "after": sum(int(row["restored_outbox_pending"]) for row in booted)},
        "undelivered_reports": {
            "before": sum(int(row.get("drift_reports", 0)) + int(row.get("rollback_reports", 0)) for row in booted),
            "after": sum(int(row["restored_drift_reports"]) + int(row["restored_rollback_reports"])
                         for row in booted)},
        "not_resumed": [row for row in booted if row not in resumed][:10],
    }


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write ``out/report.json``; return its path."""
    path = Path(out) / "report.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    """``fleet_accuracy.png``, ``device_accuracy.png`` and ``bytes.png`` in ``out`` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rounds = np.arange(1, report["rounds"] + 1)
    title = f"{report['devices']} devices, {report['config'].get('scenario')} on {report['config'].get('dataset')}"
    paths = []

    def arr(values: list[Any]) -> np.ndarray:
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"federated": ("-o", "fleet (TTA + federated rounds)"), "local_tta": ("--s", "TTA only (no fleet)"),
              "no_adaptation": (":^", "no adaptation")}
    for key, (style, label) in styles.items():
        if key in report["fleet_accuracy"]:
            ax.plot(rounds, arr(report["fleet_accuracy"][key]), style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("fleet accuracy (samples of the round)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "fleet_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "federated", "per-device accuracy"),
                           (axes[1], "gain_vs_no_adaptation", "per-device gain over no adaptation")):
        spread = report["device_accuracy_spread"][key]
        ax.fill_between(rounds, arr(spread["p10"]), arr(spread["p90"]), alpha=0.2, label="10-90 %")
        ax.fill_between(rounds, arr(spread["p25"]), arr(spread["p75"]), alpha=0.35, label="25-75 %")
        ax.plot(rounds, arr(spread["p50"]), "-o", label="median")
        if key == "gain_vs_no_adaptation":
            ax.axhline(0, color="black", lw=1)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths.append(out / "device_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.4
    ax.bar(rounds - width / 2, np.asarray(report["bytes"]["up_per_round"]) / 1e3, width, label="up (devices → server)")
    ax.bar(rounds + width / 2, np.asarray(report["bytes"]["down_per_round"]) / 1e3, width,
           label="down (server → devices)")
    ax.set_xlabel("round")
    ax.set_ylabel("kB (protobuf ByteSize)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(out / "bytes.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
