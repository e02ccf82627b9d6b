"""``edgeloop demo``: the whole loop on the embedded digits data, on loopback only.

Trains a source student and a corruption-robust teacher, exports a verified bundle, starts the server on a
free port of 127.0.0.1, runs device agents on different continual corruption streams with forward-only
α-BN, Page-Hinkley drift detection and entropy-band uploads, runs cloud distillation rounds whose updates
are pushed back, and reports measured numbers (``report.json``, ``accuracy.png`` and a table).
"""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeloop import pipeline
from edgeloop.data import Domain, Stream, build_stream, load_dataset

DEVICE_DOMAINS: tuple[tuple[Domain, ...], ...] = (
    (Domain("clean"), Domain("gaussian_noise", 5), Domain("defocus_blur", 4)),
    (Domain("clean"), Domain("contrast", 4), Domain("impulse_noise", 4)),
    (Domain("pixelate", 5), Domain("motion_blur", 5), Domain("shot_noise", 5)),
    (Domain("brightness", 5), Domain("jpeg_compression", 5), Domain("elastic_transform", 5)),
)
SAMPLES_PER_DOMAIN = 200
BATCH_SIZE = 16
ROUNDS = 3
DETECTION_WINDOW = 120


@dataclass
class DeviceRun:
    """What one device saw and did during the live run."""

    device_id: str
    stream: Stream
    correct: np.ndarray
    drift_detected: list[int] = field(default_factory=list)
    update_positions: list[int] = field(default_factory=list)


def _phase_bounds(n: int, rounds: int) -> list[tuple[int, int]]:
    cuts = [round(n * k / (rounds + 1) / BATCH_SIZE) * BATCH_SIZE for k in range(rounds + 2)]
    cuts[-1] = n
    return list(itertools.pairwise(cuts))


def _run_segment(agent: Any, run: DeviceRun, lo: int, hi: int) -> None:
    for start in range(lo, hi, BATCH_SIZE):
        stop = min(start + BATCH_SIZE, hi)
        result = agent.process_batch(run.stream.x[start:stop], run.stream.y[start:stop], position=start)
        run.correct[start:stop] = result.pred == run.stream.y[start:stop]
        run.drift_detected.extend(result.drift_positions)


def _offline_accuracy(bundle: Path, tta: str, stream: Stream) -> np.ndarray:
    """Per-sample correctness of a fresh model (initial parameters, no cloud) on the same batches."""
    from runtime import AdaptableModel, load_bundle

    model = AdaptableModel(load_bundle(bundle))
    method = pipeline.agent_tta(tta)
    correct = np.zeros(len(stream.y), dtype=bool)
    for start in range(0, len(stream.y), BATCH_SIZE):
        out = method.adapt_and_predict(model, stream.x[start : start + BATCH_SIZE])
        correct[start : start + BATCH_SIZE] = out.logits.argmax(axis=1) == stream.y[start : start + BATCH_SIZE]
    return correct


def _drift_score(truth: list[int], detected: list[int]) -> dict[str, Any]:
    """Match each true drift point to the first detection within DETECTION_WINDOW samples after it."""
    delays, matched = [], set()
    for point in truth:
        hits = [d for d in detected if point <= d < point + DETECTION_WINDOW and d not in matched]
        if hits:
            matched.add(hits[0])
            delays.append(hits[0] - point)
    return {
        "true_points": truth, "detected": detected, "detected_true": len(delays),
        "missed": len(truth) - len(delays), "false_alarms": len([d for d in detected if d not in matched]),
        "delays": delays,
    }


def _train_and_export(out: Path, seed: int, progress: Progress) -> tuple[Path, Path, Path, dict[str, Any]]:
    task = progress.add_task("train student", total=3)
    student = pipeline.train_checkpoint(arch="small_cnn", dataset="digits", out=out / "student.pt", epochs=20,
                                        seed=seed)
    progress.update(task, advance=1, description="train teacher (corruption-augmented)")
    teacher = pipeline.train_checkpoint(arch="wide_cnn", dataset="digits", out=out / "teacher.pt", epochs=15,
                                        seed=seed, augment=True)
    progress.update(task, advance=1, description="export bundle (fp32 + int8)")
    bundle = pipeline.export_checkpoint(out / "student.pt", out=out / "bundle", overwrite=True, seed=seed,
                                        key_path=out / "signing_key.pem")
    progress.update(task, advance=1, description="models ready")
    models = {"student_test_accuracy": student["test_accuracy"], "teacher_test_accuracy": teacher["test_accuracy"]}
    return out / "student.pt", out / "teacher.pt", bundle, models


def _live_run(address: str, out: Path, runs: list[DeviceRun], progress: Progress) -> tuple[list[Any], list[dict]]:
    from edgeloop.admin import AdminClient
    from exporter.signing import public_path

    trusted = pipeline.trusted_keys([public_path(out / "signing_key.pem")])
    agents = [pipeline.connect_agent(address, r.device_id, out / "devices" / r.device_id, trusted_keys=trusted)
              for r in runs]
    rounds: list[dict[str, Any]] = []
    bounds = _phase_bounds(len(runs[0].stream.y), ROUNDS)
    task = progress.add_task("devices streaming", total=len(runs[0].stream.y))
    try:
        with ThreadPoolExecutor(len(runs)) as pool, AdminClient(address) as admin:
            for phase, (lo, hi) in enumerate(bounds):
                list(pool.map(_run_segment, agents, runs, [lo] * len(runs), [hi] * len(runs)))
                progress.update(task, completed=hi)
                list(pool.map(lambda agent: agent.sync(wait_seconds=0.1), agents))
                if phase == len(bounds) - 1:
                    break
                progress.update(task, description=f"cloud distillation round {phase + 1}")
                info = admin.wait_round(admin.start_round("distill"), timeout=120)
                rounds.append({"round_id": info.round_id, "update_version": info.update_version,
                               "samples_used": info.samples_used, "seconds": info.seconds, **info.metrics})
                synced = list(pool.map(lambda agent: agent.sync(wait_seconds=0.5), agents))
                for result, run in zip(synced, runs, strict=True):
                    if result.applied_versions:
                        run.update_positions.append(hi)
                progress.update(task, description="devices streaming")
        stats = [agent.stats for agent in agents]
    finally:
        for agent in agents:
            pipeline.close_agent(agent)
    return stats, rounds


def _device_report(run: DeviceRun, stat: Any, bundle: Path) -> dict[str, Any]:
    source = _offline_accuracy(bundle, "source", run.stream)
    adapted = _offline_accuracy(bundle, "alpha_bn", run.stream)
    since = run.update_positions[0] if run.update_positions else len(run.correct)
    seg = slice(since, None)

    def acc(c: np.ndarray) -> float | None:
        return float(c.mean()) if c.size else None

    return {
        "device_id": run.device_id,
        "domains": [d.label for d in run.stream.domains],
        "evaluated_from": since,
        "source_accuracy": acc(source[seg]), "adapted_accuracy": acc(adapted[seg]),
        "final_accuracy": acc(run.correct[seg]),
        "whole_stream": {"source": acc(source), "adapted": acc(adapted), "live": acc(run.correct)},
        "samples": len(run.correct), "samples_uploaded": stat.uploaded_samples, "bytes_up": stat.uploaded_bytes,
        "bytes_down": stat.downloaded_bytes, "update_versions": list(stat.update_versions),
        "update_positions": run.update_positions, "drift": _drift_score(list(run.stream.drift_points),
                                                                         sorted(run.drift_detected)),
        "_curves": {"source": source, "adapted": adapted, "live": run.correct},
    }


def _plot(devices: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(devices), 1, figsize=(10, 2.6 * len(devices)), sharex=True, squeeze=False)
    window = 48
    kernel = np.ones(window) / window
    for ax, dev in zip(axes[:, 0], devices, strict=True):
        for name, style in (("source", ":"), ("adapted", "--"), ("live", "-")):
            curve = np.convolve(dev["_curves"][name].astype(float), kernel, mode="valid")
            label = {"live": "α-BN + cloud updates", "adapted": "α-BN only", "source": "source"}[name]
            ax.plot(np.arange(window - 1, window - 1 + curve.size), curve, style, label=label)
        for i, point in enumerate(dev["drift"]["true_points"]):
            ax.axvline(point, color="black", lw=1, label="true drift" if i == 0 else None)
        for i, point in enumerate(dev["drift"]["detected"]):
            ax.axvline(point, color="red", lw=1, ls="--", label="detected drift" if i == 0 else None)
        for i, point in enumerate(dev["update_positions"]):
            ax.axvline(point, color="green", lw=3, alpha=0.3, label="cloud update" if i == 0 else None)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{dev['device_id']}: " + " → ".join(dev["domains"]), fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="lower left", ncol=3)
    axes[-1, 0].set_xlabel(f"stream position (rolling mean over {window} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(devices: list[dict[str, Any]]) -> Table:
    table = Table(title="edgeloop demo (accuracies after the first cloud update; whole stream in report.json)")
    for col in ("device", "source", "on-device α-BN", "after cloud", "uploaded", "bytes up", "bytes down",
                "drift found / true", "false alarms"):
        table.add_column(col, justify="right")
    for d in devices:
        drift = d["drift"]
        table.add_row(
            d["device_id"], f"{d['source_accuracy']:.3f}", f"{d['adapted_accuracy']:.3f}",
            f"{d['final_accuracy']:.3f}", str(d["samples_uploaded"]), f"{d['bytes_up']:,}", f"{d['bytes_down']:,}",
            f"{drift['detected_true']} / {len(drift['true_points'])}", str(drift["false_alarms"]),
        )
    return table


def run_demo(out: Path, devices: int = 4, seed: int = 0, console: Console | None = None) -> dict[str, Any]:
    """Run the whole loop; write ``out/report.json`` and ``out/accuracy.png``; return the report."""
    from exporter.signing import public_path
    from server.app import ServerConfig, create_server

    if not 1 <= devices <= len(DEVICE_DOMAINS):
        raise ValueError(f"devices must be between 1 and {len(DEVICE_DOMAINS)}, got {devices}")
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 132)
    out = Path(out)
    pipeline.fresh_run_state(out)
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        student, teacher, bundle, models = _train_and_export(out, seed, progress)
        test = load_dataset("digits", "test")
        runs = [
            DeviceRun(f"device-{i}", stream := build_stream(test, DEVICE_DOMAINS[i], SAMPLES_PER_DOMAIN, seed=seed + i),
                      np.zeros(len(stream.y), dtype=bool))
            for i in range(devices)
        ]
        config = ServerConfig(data_dir=out / "server", port=0, teacher_ckpt=teacher, student_ckpt=student,
                              trusted_publisher_keys=(public_path(out / "signing_key.pem"),),
                              distill_alpha=pipeline.LOOP_ALPHA, distill_steps=100)
        with create_server(config) as srv:
            from edgeloop.admin import AdminClient

            address = f"127.0.0.1:{srv.port}"
            with AdminClient(address) as admin:
                bundle_id = admin.publish_bundle(bundle)
            stats, rounds = _live_run(address, out, runs, progress)
    reports = [_device_report(r, s, bundle) for r, s in zip(runs, stats, strict=True)]
    _plot(reports, out / "accuracy.png")
    for r in reports:
        r.pop("_curves")
    report = {"dataset": "digits", "bundle_id": bundle_id, "models": models, "rounds": rounds,
              "seconds": time.perf_counter() - started, "devices": reports}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(_table(reports))
    console.print(f"report: {out / 'report.json'}  plot: {out / 'accuracy.png'}  ({report['seconds']:.0f} s)")
    return report
