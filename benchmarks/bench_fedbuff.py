"""Asynchronous FedBuff under concurrent devices, and zeroth-order (SPSA) steps on a device.

* **FedBuff**: a real server on 127.0.0.1:0 (SQLite ``synchronous=FULL``, f32 submissions as plain tensors,
  int8-delta updates) with the digits small_cnn bundle published and ``aggregator = "fedbuff"``
  (``buffer_size`` K = 10). N devices (N = 50, 200), one thread and one channel each, call ``SubmitUpdate``
  back to back for a fixed window, each with the 12 normalisation tensors of the bundle (224 values, what an
  α-BN device contributes) on the newest version the server has published (read from the registry: a device
  watching updates would know it). The server aggregates every K submissions by itself. Reported: submissions
  per second, versions published, the staleness the rounds saw, and the lag from the K-th submission's commit
  to the version's publication (p50 / p99, from the registry's millisecond timestamps), and the same load on a
  server with ``aggregator = "fedavg"`` (submissions stored, no rounds) for the cost of running rounds
  alongside. Every submission must end in exactly one round (checked).
* **SPSA**: :class:`device_agents.zeroth_order.SPSA` on the digits bundle's adaptable graph (one onnxruntime
  thread), 60 steps at batch 64 on contrast-5 digits test images (256 labelled samples in turn): cross-entropy
  and top-1 before/after on those and on 284 held-out images, time per step against one plain forward pass,
  for q = 1 and q = 4 directions.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from benchmarks.common import fmt, md_table, scratch_dir, student_artifacts

NAME = "fedbuff"
TITLE = "Asynchronous FedBuff under concurrent devices; SPSA steps on a device"
CONCURRENCY = (50, 200)
PACED = ((200, 2.0), (1000, 10.0))  # (devices, seconds between one device's submissions): 100 submissions/s
BUFFER = 10


def _serve(aggregator: str, art: Any, n: int, seconds: float, interval: float | None = None) -> dict[str, Any]:
    """N devices submitting for ``seconds``: back to back, or each once every ``interval`` seconds (paced)."""
    import grpc

    from edgeloop.admin import AdminClient
    from proto.convert import tensors_to_proto
    from proto.edgeloop.v1 import device_pb2, device_pb2_grpc
    from runtime import load_bundle
    from server.app import ServerConfig, create_server

    options = {"buffer_size": BUFFER} if aggregator == "fedbuff" else {}
    initial = load_bundle(art.bundle).manifest.initial_params
    with create_server(ServerConfig(data_dir=scratch_dir("fedbuff"), port=0, grace_seconds=1.0,
                                    max_workers=max(32, n + 8), aggregator=aggregator,
                                    aggregator_options=options)) as srv:
        address = f"127.0.0.1:{srv.port}"
        with AdminClient(address) as admin:
            bundle_id = admin.publish_bundle(art.bundle)
        storage = srv.state.storage
        channels = [grpc.insecure_channel(address) for _ in range(n)]
        stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in channels]
        for i, stub in enumerate(stubs):
            stub.Register(device_pb2.RegisterRequest(device_id=f"fb-{i:03d}"), timeout=30)
        counts, errors, latencies = [0] * n, [0] * n, [[] for _ in range(n)]
        stop = threading.Event()
        start = threading.Barrier(n + 1)

        def device(i: int) -> None:
            rng = np.random.default_rng(i)
            start.wait()
            due = time.perf_counter() + (rng.uniform(0, interval) if interval else 0.0)
            while not stop.is_set():
                if interval:
                    if stop.wait(max(0.0, due - time.perf_counter())):
                        break
                    due += interval
                params = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in initial.items()}
                params = {k: np.abs(v) if k.endswith(".var") else v for k, v in params.items()}
                msg = device_pb2.FederatedUpdate(device_id=f"fb-{i:03d}", bundle_id=bundle_id,
                                                 base_version=storage.latest_version("default"), num_samples=64,
                                                 tensors=tensors_to_proto(params))
                t0 = time.perf_counter()
                try:
                    stubs[i].SubmitUpdate(msg, timeout=60)
                except grpc.RpcError:
                    errors[i] += 1
                    continue
                latencies[i].append(time.perf_counter() - t0)
                counts[i] += 1

        threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(120)
        window = time.perf_counter() - t0
        drained = srv.runner.wait_idle(120.0)
        drain_s = time.perf_counter() - t0 - window
        for c in channels:
            c.close()
        submitted = sum(counts)
        lat = np.concatenate([np.asarray(v) for v in latencies]) * 1e3
        out: dict[str, Any] = {"aggregator": aggregator, "devices": n, "interval_s": interval, "seconds": window,
                               "submissions": submitted,
                               "submissions_per_s": submitted / window, "errors": int(sum(errors)),
                               "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                               "drained": drained, "drain_s": drain_s}
        if aggregator == "fedbuff":
            out.update(_rounds(storage, bundle_id, submitted))
            out["rounds_per_s"] = out["versions"] / (window + drain_s)
    return out


def _rounds(storage: Any, bundle_id: str, submitted: int) -> dict[str, Any]:
    """Versions, staleness and publication lag from the registry; checks every submission was used once."""
    updates = storage.updates_since(bundle_id, 0)
    lags, staleness, used = [], [], set()
    for u in updates:
        ids = storage.round_inputs(u.round_id)
        subs = [storage.get_submission(i) for i in ids]
        used |= set(ids)
        lags.append(u.created_ms - max(s.received_ms for s in subs))
        staleness += [u.version - 1 - s.base_version for s in subs]
    left = len(storage.unused_submissions(bundle_id))
    if len(used) + left != submitted or len(used) != BUFFER * len(updates):
        raise RuntimeError(f"{submitted} submitted, {len(used)} used in {len(updates)} rounds, {left} left")
    return {"versions": len(updates), "left_in_buffer": left, "lag_p50_ms": float(np.percentile(lags, 50)),
            "lag_p99_ms": float(np.percentile(lags, 99)), "mean_staleness": float(np.mean(staleness)),
            "max_staleness": int(max(staleness))}


def _spsa(art: Any, steps: int) -> list[dict[str, Any]]:
    from device_agents.zeroth_order import SPSA, SPSAConfig
    from edgeloop.data import corrupt, load_dataset
    from runtime import AdaptableModel, load_bundle

    test = load_dataset("digits", "test")
    x, y = corrupt(test.x, "contrast", 5, seed=0), test.y
    train, held = slice(0, 256), slice(256, 540)
    rows = []
    for q in (1, 4):
        model = AdaptableModel(load_bundle(art.bundle, threads=1))
        opt = SPSA(SPSAConfig(lr=0.1, seed=0, directions=q))

        def evaluate(part: slice) -> tuple[float, float]:
            logits = model.forward(x[part]).logits  # noqa: B023 (evaluated before the model changes)
            return opt.loss(model, x[part], y[part]), float((logits.argmax(1) == y[part]).mean())  # noqa: B023

        before = evaluate(train), evaluate(held)
        t0 = time.perf_counter()
        for k in range(steps):
            i = (64 * k) % 256
            opt.step(model, x[i : i + 64], y[i : i + 64])
        per_step = (time.perf_counter() - t0) / steps
        after = evaluate(train), evaluate(held)
        t0 = time.perf_counter()
        for _ in range(100):
            model.forward(x[:64])
        per_pass = (time.perf_counter() - t0) / 100
        rows.append({"directions": q, "passes_per_step": 2 * q, "steps": steps, "step_ms": per_step * 1e3,
                     "pass_ms": per_pass * 1e3, "loss_seen": [before[0][0], after[0][0]],
                     "loss_held": [before[1][0], after[1][0]], "top1_held": [before[1][1], after[1][1]]})
    return rows


def run(quick: bool) -> dict[str, Any]:
    """FedBuff and FedAvg-ingest at each concurrency, back to back; FedBuff paced; SPSA at q = 1, 4."""
    art = student_artifacts()
    seconds = 3.0 if quick else 10.0
    levels = [{"fedbuff": _serve("fedbuff", art, n, seconds), "fedavg": _serve("fedavg", art, n, seconds)}
              for n in CONCURRENCY]
    paced = [_serve("fedbuff", art, n, 2 * seconds, interval) for n, interval in PACED]
    return {"buffer_size": BUFFER, "seconds": seconds, "levels": levels, "paced": paced,
            "spsa": _spsa(art, 20 if quick else 60)}


def render(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section body."""
    rows = []
    for lv in r["levels"]:
        fb, fa = lv["fedbuff"], lv["fedavg"]
        rows.append([fb["devices"], fmt(fb["submissions_per_s"], 0), fmt(fa["submissions_per_s"], 0),
                     fmt(fb["submissions_per_s"] / fa["submissions_per_s"], 2), fb["versions"],
                     fmt(fb["rounds_per_s"], 1), fmt(fb["mean_staleness"], 1), fb["max_staleness"],
                     f"{fmt(fb['lag_p50_ms'], 0)} / {fmt(fb['lag_p99_ms'], 0)}",
                     f"{fmt(fb['p50_ms'], 1)} / {fmt(fb['p99_ms'], 1)}", fb["errors"] + fa["errors"]])
    fed = md_table(["devices", "FedBuff subm./s", "FedAvg-ingest subm./s", "ratio", "versions", "rounds/s",
                    "mean staleness", "max staleness", "publish lag p50 / p99 ms", "SubmitUpdate p50 / p99 ms",
                    "errors"], rows)
    spsa = md_table(["q", "passes / step", "ms / step", "ms / plain pass", "loss seen (before → after)",
                     "loss held-out", "top-1 held-out"], [
        [s["directions"], s["passes_per_step"], fmt(s["step_ms"], 2), fmt(s["pass_ms"], 3),
         f"{s['loss_seen'][0]:.2f} → {s['loss_seen'][1]:.2f}", f"{s['loss_held'][0]:.2f} → {s['loss_held'][1]:.2f}",
         f"{100 * s['top1_held'][0]:.1f} % → {100 * s['top1_held'][1]:.1f} %"] for s in r["spsa"]])
    paced = md_table(["devices", "one submission per device every", "subm./s", "versions", "rounds/s",
                      "mean staleness", "max staleness", "publish lag p50 / p99 ms", "SubmitUpdate p50 / p99 ms",
                      "errors"], [
        [p["devices"], f"{p['interval_s']:.0f} s", fmt(p["submissions_per_s"], 0), p["versions"],
         fmt(p["rounds_per_s"], 1), fmt(p["mean_staleness"], 2), p["max_staleness"],
         f"{fmt(p['lag_p50_ms'], 0)} / {fmt(p['lag_p99_ms'], 0)}", f"{fmt(p['p50_ms'], 1)} / {fmt(p['p99_ms'], 1)}",
         p["errors"]] for p in r.get("paced", [])])
    steps = r["spsa"][0]["steps"]
    return (f"K = {r['buffer_size']} submissions per server step, {r['seconds']:.0f} s window per run, one thread "
            "and channel per device; each submission carries the 12 normalisation tensors of the digits bundle "
            "(224 float32 values) on the newest published version. \"FedAvg-ingest\" is the same load on a server "
            "that only stores submissions (no rounds). Every submission ended in exactly one round or is still in "
            "the buffer (checked). Back to back, devices submit faster than one round worker aggregates (its "
            "rounds/s is the capacity), so a backlog builds and staleness and publication lag grow with the window; "
            f"paced below that capacity, they stay small.\n\nBack to back:\n\n{fed}\n\nPaced ({2 * r['seconds']:.0f} s "
            f"window):\n\n{paced}\n\n"
            f"SPSA: {steps} steps at batch 64 on contrast-5 digits (256 labelled images in turn; 284 held out), "
            f"lr 0.1, one onnxruntime thread.\n\n{spsa}\n")
