"""Federated learning through the edgeloop server against Flower, and byzantine robustness (issue 7).

Protocol (both frameworks): MNIST, 100 clients, Dirichlet(0.5) label skew with seed 0, 10 clients per round,
1 local epoch of SGD (lr 0.05, batch 32), SmallCNN, 20 rounds, central evaluation on the MNIST test set after
each round; the same initial weights (seeded) and the same partition. Both train clients with the same
:class:`edgeloop.federated.trainer.LocalSGDTrainer`.

* **Flower**: flwr 1.41 FedAvg in its simulation engine (Ray, 2 CPUs), in its own virtual environment
  (``$EDGELOOP_BENCH_CACHE/flower-venv``; flwr needs protobuf < 7, never a project dependency). Its client
  sampling is not seeded.
* **edgeloop**: a real server on 127.0.0.1:0 (SQLite under a temporary directory), the bundle exported with its
  trainable weights, 100 devices as in-process threads (2 at a time) speaking gRPC over loopback through
  ``DeviceClient`` (pull the global parameters, train, submit), seeded client sampling, aggregation by the
  server's round runner. ``fp32``: full float32 both ways. ``codec``: ``int8_topk_delta`` both ways (uplink
  with error feedback on the device; downlink a delta from exactly what the device holds).
* **Robustness**: the same setup with 20 % byzantine clients (sign flip, scale 4): FedAvg and a robust rule
  (trimmed mean), against the clean FedAvg run.

Bytes are serialized parameter messages: edgeloop's from the devices' per-message counters (``SubmitUpdate``
requests, ``PullUpdate`` responses), Flower's from the parameter tensors of each fit instruction and result.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import fmt, md_table, scratch_dir, side_venv
from edgeloop.federated.experiment import load_uint8, seeded_bundle

log = logging.getLogger(__name__)

NAME = "federated"
TITLE = "Federated averaging through the edgeloop server vs Flower; update codec; byzantine robustness (MNIST)"
FLOWER_PACKAGES = ("flwr[simulation]==1.41.*", "torch==2.13.0")
ARCH = "smallcnn"
CODEC = {"encoding": "int8_topk_delta", "topk_fraction": 0.05}
ROBUST = {"aggregator": "trimmed_mean", "aggregator_options": {"beta": 0.3}}
ATTACK = {"byzantine_fraction": 0.2, "attack": "sign_flip", "attack_scale": 4.0}
SCALED = {"byzantine_fraction": 0.2, "attack": "scaled", "attack_scale": 10.0}
EVAL_THREADS = 1  # central evaluation, both sides: one thread degrades least when other work shares the cores


def protocol(quick: bool) -> dict[str, Any]:
    """The run's sizes: the issue's protocol, or a smoke-sized one with ``quick``."""
    if quick:
        return {"clients": 20, "per_round": 5, "rounds": 3, "robust_rounds": 3, "alpha": 0.5, "seed": 0, "repeats": 1}
    return {"clients": 100, "per_round": 10, "rounds": 20, "robust_rounds": 20, "alpha": 0.5, "seed": 0,
            "repeats": 3}


def edgeloop_run(bundle: Path, spec: Any, data: tuple, proto: dict[str, Any], rounds: int,
                 **overrides: Any) -> dict[str, Any]:
    """One edgeloop run (see :func:`edgeloop.federated.experiment.run_federated`) plus its total wall time."""
    from edgeloop.federated.experiment import FederatedConfig, run_federated
    from edgeloop.federated.trainer import TrainerConfig

    x, y, xt, yt = data
    cfg = FederatedConfig(rounds=rounds, clients=proto["clients"], per_round=proto["per_round"],
                          alpha=proto["alpha"], seed=proto["seed"],
                          trainer=TrainerConfig(epochs=1, lr=0.05, batch_size=32, seed=proto["seed"]),
                          eval_threads=EVAL_THREADS, **overrides)
    t0 = time.perf_counter()
    out = run_federated(bundle, ARCH, spec, (x.astype(np.float32) / 255.0, y),
                        (xt.astype(np.float32) / 255.0, yt), cfg)
    out["total_wall_s"] = time.perf_counter() - t0
    for r in out["rounds"]:
        r.pop("clients", None)
    return out


# -- Flower in its own environment ---------------------------------------------------------------------------------
def flower_python() -> tuple[Path | None, str | None]:
    """Flower's interpreter (creating its venv on first use), or None and the reason it is unavailable."""
    return side_venv("flower-venv", FLOWER_PACKAGES, "import flwr.simulation, torch")


def flower_run(python: Path, bundle: Path, spec: Any, data: tuple, proto: dict[str, Any], work: Path
               ) -> dict[str, Any]:
    """Flower's run of the protocol (``benchmarks/flower_side.py`` in Flower's interpreter)."""
    from dataclasses import asdict

    from edgeloop.data.partition import dirichlet_partition
    from runtime.manifest import read_manifest

    x, y, xt, yt = data
    parts = dirichlet_partition(y, proto["clients"], proto["alpha"], seed=proto["seed"])
    np.savez(work / "clients.npz", **{f"x{i}": x[p] for i, p in enumerate(parts)},
             **{f"y{i}": y[p] for i, p in enumerate(parts)})
    np.savez(work / "test.npz", x=xt, y=yt)
    manifest, _ = read_manifest(bundle)
    initial = manifest.trainable_params(bundle)
    np.savez(work / "initial.npz", **initial)
    spec_file = work / "flower_spec.json"
    spec_file.write_text(json.dumps({
        "clients_data": str(work / "clients.npz"), "test_data": str(work / "test.npz"),
        "initial": str(work / "initial.npz"), "names": list(initial), "model_spec": asdict(spec), "arch": ARCH,
        "trainer": {"epochs": 1, "lr": 0.05, "batch_size": 32, "seed": proto["seed"]},
        "clients": proto["clients"], "per_round": proto["per_round"], "rounds": proto["rounds"], "cpus": 2,
        "eval_threads": EVAL_THREADS}))
    out = work / "flower_out.json"
    t0 = time.perf_counter()
    subprocess.run([str(python), str(Path(__file__).with_name("flower_side.py")), str(spec_file), str(out)],
                   check=True, timeout=3600, capture_output=True)
    result = json.loads(out.read_text())
    result["total_wall_s"] = time.perf_counter() - t0
    return result


def run(quick: bool) -> dict[str, Any]:
    """Run every variant; see the module docstring."""
    import torch

    torch.set_num_threads(1)
    proto = protocol(quick)
    work = scratch_dir("federated")
    data = load_uint8("mnist")
    bundle, spec = seeded_bundle(ARCH, data[0], 10, proto["seed"], work / "bundle")
    results: dict[str, Any] = {"protocol": proto, "codec": CODEC, "robust": ROBUST, "attack": ATTACK,
                               "scaled_attack": SCALED, "runs": {}}
    runs = results["runs"]
    walls: dict[str, list[float]] = {"flower": [], "edgeloop": []}
    python, why = flower_python()
    if python is None:
        results["flower_unavailable"] = why
    for rep in range(proto["repeats"]):  # Flower and edgeloop fp32 interleaved: the machine is shared and noisy
        if python is not None and "flower_unavailable" not in results:
            try:
                flower = flower_run(python, bundle, spec, data, proto, work)
                walls["flower"].append(flower["wall_s"])
                runs.setdefault("flower_fedavg", flower)
                if rep:
                    runs[f"flower_fedavg_repeat{rep}"] = flower
            except (subprocess.SubprocessError, OSError, ValueError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                results["flower_unavailable"] = f"{type(exc).__name__}: {detail.decode(errors='replace')[-800:]}"
        fp32 = edgeloop_run(bundle, spec, data, proto, proto["rounds"], encoding="f32")
        walls["edgeloop"].append(fp32["total_wall_s"])
        runs.setdefault("edgeloop_fedavg_fp32", fp32)
    results["walls"] = walls
    runs["edgeloop_fedavg_codec"] = edgeloop_run(bundle, spec, data, proto, proto["rounds"], **CODEC)
    rr = proto["robust_rounds"]
    clean = runs["edgeloop_fedavg_fp32"] if rr == proto["rounds"] else edgeloop_run(
        bundle, spec, data, proto, rr, encoding="f32")
    runs["robust_clean_fedavg"] = clean
    runs["robust_attacked_fedavg"] = edgeloop_run(bundle, spec, data, proto, rr, encoding="f32", **ATTACK)
    runs["robust_attacked_trimmed_mean"] = edgeloop_run(bundle, spec, data, proto, rr, encoding="f32", **ATTACK,
                                                        **ROBUST)
    runs["robust_scaled_fedavg"] = edgeloop_run(bundle, spec, data, proto, rr, encoding="f32", **SCALED)
    runs["robust_scaled_trimmed_mean"] = edgeloop_run(bundle, spec, data, proto, rr, encoding="f32", **SCALED,
                                                      **ROBUST)
    results["targets"] = targets(runs, walls)
    return results


def targets(runs: dict[str, Any], walls: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """The issue's targets, each with its numbers and whether it holds. Wall times compare the medians of the
    interleaved repeats (``walls``; default: each side's single run): edgeloop's whole run including server
    start, against Flower's ``run_simulation`` call including Ray's start."""
    out: dict[str, Any] = {}
    fp32, codec = runs["edgeloop_fedavg_fp32"], runs["edgeloop_fedavg_codec"]
    flower = runs.get("flower_fedavg")
    if flower and flower.get("accuracy"):
        gap = 100 * (fp32["accuracy"][-1] - flower["accuracy"][-1])
        ours = float(np.median((walls or {}).get("edgeloop") or [fp32["total_wall_s"]]))
        theirs = float(np.median((walls or {}).get("flower") or [flower["wall_s"]]))
        out["fedavg_vs_flower"] = {"accuracy_gap_points": gap, "edgeloop_wall_s": ours, "flower_wall_s": theirs,
                                   "wall_ratio": ours / theirs, "met": gap >= -1.0 and ours <= theirs}
    ratio = fp32["bytes_total"] / max(1, codec["bytes_total"])
    loss = 100 * (fp32["accuracy"][-1] - codec["accuracy"][-1])
    out["codec"] = {"bytes_ratio": ratio, "accuracy_loss_points": loss, "met": ratio >= 20 and loss <= 1.0}
    clean, bad, robust = (runs[k]["accuracy"][-1] for k in ("robust_clean_fedavg", "robust_attacked_fedavg",
                                                            "robust_attacked_trimmed_mean"))
    out["robustness"] = {"clean": clean, "attacked_fedavg": bad, "attacked_robust": robust,
                         "robust_gap_points": 100 * (clean - robust), "fedavg_drop_points": 100 * (clean - bad),
                         "met": 100 * (clean - robust) <= 2.0 and clean - bad > clean - robust}
    return out


def render(results: dict[str, Any]) -> str:
    """Markdown body of the benchmark's section."""
    proto, runs, t = results["protocol"], results["runs"], results.get("targets", {})
    lines = [f"{proto['clients']} clients, Dirichlet({proto['alpha']}) seed {proto['seed']}, {proto['per_round']} per "
             f"round, {proto['rounds']} rounds (robustness: {proto['robust_rounds']}), 1 local epoch SGD lr 0.05 "
             f"batch 32, SmallCNN; codec `{results['codec']['encoding']}` both directions: tensors of more than "
             f"8192 entries keep their largest {results['codec']['topk_fraction']:.0%} (int8 values, varint-gap "
             f"indices, error feedback), smaller ones go whole as int8. Bytes: edgeloop counts serialized "
             f"`SubmitUpdate` requests and `PullUpdate` replies on the devices (a reply to a device that is up to "
             f"date, e.g. in round 1, is a few bytes and counts as a message); Flower counts the parameter tensors "
             f"of each fit instruction and result. Same partition and initial weights for both; edgeloop's client "
             f"sampling is seeded (its runs repeat exactly), Flower's is not."]
    if "flower_unavailable" in results:
        lines.append(f"\nFlower did not run: `{results['flower_unavailable'][:300]}`")
    rows = []
    order = {"edgeloop_fedavg_fp32": 1, "edgeloop_fedavg_codec": 2}
    for name in sorted((k for k in runs if not k.startswith("robust_")), key=lambda k: (order.get(k, 0), k)):
        r = runs[name]
        flower = name.startswith("flower")
        rounds_wall = r["rounds"][-1]["elapsed_s"] if flower and r["rounds"] else r["wall_s"]
        rows.append([name, fmt(100 * r["accuracy"][-1], 2, " %"), fmt(rounds_wall, 1, " s"),
                     fmt(r["wall_s"] if flower else r.get("total_wall_s"), 1, " s"),
                     fmt(r["bytes_per_message"] / 1e3, 1, " KB"), fmt(r["bytes_total"] / 1e6, 2, " MB")])
    lines += ["", md_table(["run", "accuracy (last round)", "wall (rounds)", "wall (incl. setup)",
                            "bytes / message", "bytes total"], rows)]
    walls = results.get("walls") or {}
    if walls.get("flower") or walls.get("edgeloop"):
        lines += ["", f"Wall time including setup (edgeloop: server start, {proto['clients']} registrations, rounds; "
                      "Flower: "
                      "`run_simulation` with Ray's start), interleaved repeats: Flower "
                      + ", ".join(f"{w:.1f} s" for w in walls.get("flower", [])) + "; edgeloop fp32 "
                      + ", ".join(f"{w:.1f} s" for w in walls.get("edgeloop", [])) + "."]
    n = max(len(r["accuracy"]) for r in runs.values())
    curve = [[str(i + 1)] + [fmt(100 * runs[k]["accuracy"][i], 1) if k in runs and i < len(runs[k]["accuracy"])
                             else "" for k in ("flower_fedavg", "edgeloop_fedavg_fp32", "edgeloop_fedavg_codec")]
             for i in range(n)]
    heads = ["round", "Flower", "edgeloop fp32", "edgeloop codec"]
    lines += ["", "Accuracy (%) per round:", "", md_table(heads, curve)]
    rob = [[k.removeprefix("robust_"), fmt(100 * runs[k]["accuracy"][-1], 2, " %")]
           for k in ("robust_clean_fedavg", "robust_attacked_fedavg", "robust_attacked_trimmed_mean",
                     "robust_scaled_fedavg", "robust_scaled_trimmed_mean") if k in runs]
    lines += ["", f"Robustness ({results['attack']['byzantine_fraction']:.0%} byzantine, "
                  f"{results['attack']['attack']} ×{results['attack']['attack_scale']}; robust rule "
                  f"`{results['robust']['aggregator']}` {results['robust']['aggregator_options']}"
                  + (f"; `scaled_*`: {results['scaled_attack']['attack']} ×{results['scaled_attack']['attack_scale']}"
                     if "scaled_attack" in results else "") + "):", "",
              md_table(["run", "accuracy (last round)"], rob)]
    tl = []
    if "fedavg_vs_flower" in t:
        f = t["fedavg_vs_flower"]
        tl.append(f"- edgeloop FedAvg within 1 point of Flower with wall time no higher: gap "
                  f"{f['accuracy_gap_points']:+.2f} points, wall ratio {f['wall_ratio']:.2f}× — "
                  f"**{'met' if f['met'] else 'not met'}**")
    if "codec" in t:
        c = t["codec"]
        tl.append(f"- codec ≥ 20× fewer bytes at ≤ 1 point loss: {c['bytes_ratio']:.1f}×, "
                  f"{c['accuracy_loss_points']:+.2f} points — **{'met' if c['met'] else 'not met'}**")
    if "robustness" in t:
        r = t["robustness"]
        tl.append(f"- robust rule within 2 points of clean while FedAvg degrades: robust gap "
                  f"{r['robust_gap_points']:+.2f}, FedAvg drop {r['fedavg_drop_points']:+.2f} points — "
                  f"**{'met' if r['met'] else 'not met'}**")
    if tl:
        lines += ["", "Targets:", "", *tl]
    return "\n".join(lines) + "\n"
