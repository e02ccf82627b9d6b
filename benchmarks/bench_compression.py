"""Compression and export: bytes, top-1 and latency of every compression variant in onnxruntime and LiteRT.

For the issue's SmallCNN on MNIST and a ResNet-8 on CIFAR-10-JPEG (checkpoints from :mod:`benchmarks.trained`),
four bundles are built with :func:`edgeloop.exporting.run_export` (ONNX + TFLite, adaptable and folded, fp32
and int8 — ONNX static QDQ per-channel, TFLite PT2E static — so every bundle carries the same seven models):

* ``base``: no compression;
* ``nm``: 2:4 N:M sparsity with a short masked fine-tune;
* ``lowrank``: SVD low-rank (``energy=0.95``, or ``budget=0.5`` when 0.95 keeps ≥ 95 % of the targeted
  weights) with a short fine-tune;
* ``all``: low-rank → 2:4 → int8 (each torch pass fine-tuned).

The first convolution of each model has too few inputs for 2:4 along its input dimension (SmallCNN
``features.0``: 1·3·3 = 9; ResNet-8 ``stem``: 3·3·3 = 27), so it is excluded from both passes. The reported
variants are the folded model of each bundle at fp32 or int8: onnxruntime runs ``folded_fp32``/``folded_int8``
(shipped packed, ``*.onnx.nmpack``, when the bundle is N:M sparse and packing is smaller), LiteRT runs
``tflite_folded_fp32``/``tflite_folded_int8``. For each variant × runtime:

* **bytes**: the model's shipped file, and the **device download** = ``manifest.json`` + ``manifest.sig`` +
  every file :meth:`runtime.manifest.Manifest.files_for` names for that model — what
  :meth:`device_agents.client.DeviceClient.fetch_bundle` fetches: the shipped model file, its golden block, the
  source feature statistics (and the adaptable parameters for an adaptable graph; the other model files of the
  bundle are not downloaded) — with its ratio to the fp32 variant's download in the same runtime; also the
  download of a device that asks for the class-conditional statistics too (Mahalanobis drift, T3A prototypes);
* **top-1** on the full test set (10,000 images; ``--quick``: a stratified subset) through
  :class:`runtime.predictor.Predictor` on the loaded (signature-, hash- and golden-checked) bundle, batch 256;
* **latency** at batch 1 and 64 of the runtime session's ``run`` against torch eager fp32 of the uncompressed
  checkpoint (``torch.inference_mode``), all interleaved in one run (median over rounds, ratios of medians);
  torch runs with ``torch.set_num_threads(1)``, onnxruntime with 1 intra-op and 1 inter-op thread, LiteRT with
  1 thread (XNNPACK, its default kernels).

Also timed, interleaved with the rest: the adaptable ONNX graph of the ``base`` bundle (fp32 at α = 0 and
α = 0.5, int8 at α = 0.5; statistics outputs on) against the folded ONNX graph at batch 64. onnxruntime's
optimised graph of each folded model is dumped to count the operators it actually runs (evidence for the
int8 speed), and its profiler gives the per-node time of the ``base`` folded models at batch 64. Exports run
one after another in this process (PT2E int8 runs in its own child process inside the exporter).

``--quick`` (a smoke run, under 2 minutes on 2 shared cores): MNIST only, 1,000 test images, no fine-tune,
3 timing rounds.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import fmt, interleaved, md_table, ratio, scratch_dir, summarize

log = logging.getLogger(__name__)

NAME = "compression"
TITLE = "Compression and export: bytes, top-1 and latency per variant in onnxruntime and LiteRT"
BATCHES = (1, 64)
EVAL_BATCH = 256
TORCH_THREADS = 1
RUNTIME_THREADS = 1
ALWAYS_FETCHED = ("manifest.json", "manifest.sig")  # + Manifest.files_for(model)
LOW_RANK_ENERGY = "energy=0.95"
LOW_RANK_FALLBACK = "budget=0.5"
LOW_RANK_MIN_SAVING = 0.05  # energy=0.95 "saves nothing" when it keeps more than 95 % of the targeted weights
ADAPTABLE_TARGET = 1.25
INT8_OVER_FP32_TARGET = 0.75
INT8_SPEEDUP_OVER_TORCH_TARGET = 3.0
PACKED_BYTES_TARGET = 0.2
CHECKPOINT_WAIT_S = 3 * 3600
CHECKPOINT_POLL_S = 20


@dataclass(frozen=True)
class Case:
    """One model × dataset: its checkpoint, the first layer left out of N:M and low-rank, fine-tune epochs,
    and the int8 accuracy tolerance (points of top-1) of the issue."""

    key: str
    arch: str
    dataset: str
    checkpoint_name: str
    exclude: tuple[str, ...]
    exclude_why: str
    fine_tune_epochs: int
    int8_tolerance_points: float


CASES = (
    Case("mnist", "smallcnn", "mnist", "smallcnn_mnist_e3.pt", ("features.0",),
         "`features.0` (conv 1→16, 1·3·3 = 9 inputs per output: not a multiple of 4)", 2, 1.0),
    Case("cifar10", "resnet8", "cifar10", "resnet8_cifar10_e15.pt", ("stem",),
         "`stem` (conv 3→16, 3·3·3 = 27 inputs per output: not a multiple of 4)", 1, 2.0),
)


@dataclass(frozen=True)
class Variant:
    """A reported row: which bundle and at which precision its folded model runs."""

    key: str
    label: str
    bundle: str
    int8: bool


VARIANTS = (
    Variant("fp32", "fp32", "base", False),
    Variant("int8", "int8", "base", True),
    Variant("nm", "2:4 + fine-tune", "nm", False),
    Variant("nm_int8", "2:4 + fine-tune, int8", "nm", True),
    Variant("lowrank", "low-rank + fine-tune", "lowrank", False),
    Variant("lowrank_int8", "low-rank + fine-tune, int8", "lowrank", True),
    Variant("all", "low-rank → 2:4 → int8", "all", True),
)
HEADLINE = ("fp32", "int8", "nm", "lowrank", "all")  # the five variants; the other rows come for free
RUNTIMES = {"onnxruntime": ("folded_fp32", "folded_int8"), "litert": ("tflite_folded_fp32", "tflite_folded_int8")}
# adaptable graphs timed against a folded row of the same runtime and precision: (key, model, α, folded row)
ADAPTABLE = (("fp32_a0", "fp32", 0.0, "fp32/onnxruntime"), ("fp32_a05", "fp32", 0.5, "fp32/onnxruntime"),
             ("int8_a05", "int8", 0.5, "int8/onnxruntime"), ("tflite_fp32_a05", "tflite_fp32", 0.5, "fp32/litert"))


def model_name(runtime: str, int8: bool) -> str:
    """The bundle's model entry a runtime runs for a variant."""
    return RUNTIMES[runtime][int(int8)]


# -- checkpoints -----------------------------------------------------------------------------------------------
def _training_elsewhere() -> bool:
    """Whether another process runs ``benchmarks.trained`` (it writes the cached checkpoints when done)."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "benchmarks.trained" in cmd or "benchmarks/trained.py" in cmd:
            return True
    return False


def checkpoint(case: Case) -> Path:
    """The case's cached checkpoint: wait for it while another process trains it, else train it here."""
    from benchmarks import trained

    path = trained.cache_dir() / case.checkpoint_name
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while not path.exists() and _training_elsewhere() and time.monotonic() < deadline:
        log.info("waiting for %s (being trained by another process)", path)
        time.sleep(CHECKPOINT_POLL_S)
    if path.exists():
        return path
    return trained.mnist_smallcnn() if case.arch == "smallcnn" else trained.cifar_resnet8()


# -- bundles ------------------------------------------------------------------------------------------------
def low_rank_choice(ckpt: Path, case: Case) -> dict[str, Any]:
    """Weights kept by ``energy=0.95`` (as the ``all`` bundle applies it, ranks multiples of 4); the spec used."""
    from edgeloop.exporting import load_model
    from exporter.compress import LowRank, LowRankConfig, compose

    probe = {}
    for multiple in (1, 4):
        model = copy.deepcopy(load_model(str(ckpt), case.dataset).model)
        config = LowRankConfig.from_string(LOW_RANK_ENERGY, rank_multiple=multiple, exclude=case.exclude)
        _, (report,) = compose(model, [LowRank(config)])
        probe[str(multiple)] = {"params_before": report["params_before"], "params_after": report["params_after"],
                           "kept": report["params_after"] / report["params_before"],
                           "ranks": {k: [v["rank"], v["full_rank"]] for k, v in report["layers"].items()}}
    saves = max(p["kept"] for p in probe.values()) <= 1.0 - LOW_RANK_MIN_SAVING
    return {"spec": LOW_RANK_ENERGY if saves else LOW_RANK_FALLBACK, "energy_probe": probe,
            "why": None if saves else (f"{LOW_RANK_ENERGY} keeps {max(p['kept'] for p in probe.values()):.0%} of "
                                       f"the targeted weights (< {LOW_RANK_MIN_SAVING:.0%} saved)")}


def bundle_requests(case: Case, low_rank: str, epochs: int) -> dict[str, dict[str, Any]]:
    """The compression arguments of each bundle's :class:`ExportRequest`."""
    return {
        "base": {},
        "nm": {"sparsity": "2:4", "fine_tune_epochs": epochs},
        "lowrank": {"low_rank": low_rank, "fine_tune_epochs": epochs},
        "all": {"low_rank": low_rank, "sparsity": "2:4", "fine_tune_epochs": epochs},
    }


def build_bundle(ckpt: Path, case: Case, out: Path, args: dict[str, Any]) -> dict[str, Any]:
    """Run the export job; return the path and wall time, or the error (the variant is then reported failed)."""
    from edgeloop.exporting import ExportRequest, run_export

    request = ExportRequest(model=str(ckpt), out=out, dataset=case.dataset, exclude=case.exclude,
                            formats=("onnx", "tflite"), folded=True, int8=True,
                            key_path=out.parent / "signing_key.pem", **args)
    t0 = time.perf_counter()
    try:
        path = run_export(request)
    except Exception as exc:  # a failed variant is a result too; the others still run
        log.error("export of %s %s failed:\n%s", case.key, args, traceback.format_exc())
        return {"args": args, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    from exporter.bundle import export_details

    manifest = export_details(path)  # the manifest with the export report (parity, compression) merged back
    return {"args": args, "path": path, "seconds": time.perf_counter() - t0, "manifest": manifest}


def _entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in manifest["models"] if m["name"] == name)


def sizes(bundle: Path, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """Shipped file, unpacked size and device download bytes of one model of a bundle: the manifest, its
    signature and every file ``Manifest.files_for(name)`` names (what a device fetches), each file's bytes in
    ``overhead_bytes`` (the golden block as ``golden``); ``download_with_class_statistics_bytes`` adds what a
    device asking for the class-conditional statistics fetches too."""
    from runtime import read_manifest

    parsed, _ = read_manifest(bundle)
    entry = _entry(manifest, name)
    packed = entry.get("packed")
    shipped = packed["file"] if packed else entry["file"]
    golden = parsed.golden_file_of(name)
    fetched = [*ALWAYS_FETCHED, *parsed.files_for(name)]
    if shipped not in fetched:
        raise RuntimeError(f"{bundle}: files_for({name!r}) = {fetched} omits the model file {shipped}")
    overhead = {("golden" if f == golden else f): (bundle / f).stat().st_size for f in fetched if f != shipped}
    file_bytes = (bundle / shipped).stat().st_size
    download = file_bytes + sum(overhead.values())
    extra = [f for f in parsed.files_for(name, class_statistics=True) if f not in fetched]
    return {"file": shipped, "file_bytes": file_bytes, "packed": bool(packed),
            "unpacked_bytes": packed["unpacked_bytes"] if packed else file_bytes,
            "overhead_bytes": overhead, "download_bytes": download,
            "class_statistics_bytes": {f: (bundle / f).stat().st_size for f in extra},
            "download_with_class_statistics_bytes": download + sum((bundle / f).stat().st_size for f in extra)}


def compression_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the passes did: per pass its layers (ranks / sparsity) and weight counts."""
    out: dict[str, Any] = {}
    for rep in manifest.get("compression", {}).get("passes", []):
        if rep.get("pass") == "low_rank":
            out["low_rank"] = {"ranks": {k: [v["rank"], v["full_rank"]] for k, v in rep["layers"].items()},
                               "skipped": sorted(rep.get("skipped", {})), "params_before": rep["params_before"],
                               "params_after": rep["params_after"]}
        elif rep.get("pass") == "nm_sparsity":
            out["nm"] = {"layers": sorted(rep.get("layers", {})), "excluded": rep.get("excluded")}
    return out


# -- evidence ------------------------------------------------------------------------------------------------
def optimized_ops(model: Path | bytes) -> dict[str, int]:
    """Operator counts of the graph onnxruntime runs after its optimisations (CPU, level ALL, 1 thread)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                             providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common())


def node_profile(model: Path | bytes, x: np.ndarray, runs: int) -> list[dict[str, Any]]:
    """Per-node kernel time (median ms over ``runs`` runs on ``x``, onnxruntime's profiler, 1 thread), largest
    first: where the time of a graph goes. Profiling adds overhead per node; compare shares, not totals."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                    providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(runs):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            times[(e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])].append(e["dur"] / 1e3)
    nodes = [{"node": node, "op": op, "ms": float(np.median(t))} for (node, op), t in times.items()]
    return sorted(nodes, key=lambda n: -n["ms"])


def _model_bytes(bundle: Path, manifest: dict[str, Any], name: str) -> Path | bytes:
    from runtime import read_manifest
    from runtime.bundle import unpack_model

    entry = _entry(manifest, name)
    if not entry.get("packed"):
        return bundle / entry["file"]
    parsed, _ = read_manifest(bundle)
    return unpack_model(bundle, parsed.model(name))


def git_state() -> dict[str, Any]:
    """The commit measured and whether the code under test differs from it (uncommitted changes)."""
    import subprocess

    from benchmarks.common import REPO_ROOT

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                                  check=False).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "edgeloop", "exporter", "runtime").splitlines()
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted_code_files": [line[3:] for line in dirty]}


# -- measurements --------------------------------------------------------------------------------------------
def top1_runtime(bundle: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a loaded bundle model through :class:`runtime.predictor.Predictor`, batch 256."""
    from runtime.predictor import Predictor

    return float((Predictor(bundle, max_batch=EVAL_BATCH).predict(x).predictions == y).mean())


def top1_torch(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the torch model (eval, inference mode), batch 256."""
    import torch

    with torch.inference_mode():
        pred = np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x[i : i + EVAL_BATCH]))).argmax(1).numpy()
                               for i in range(0, len(x), EVAL_BATCH)])
    return float((pred == y).mean())


def adaptable_feeds(bundle: Any, x: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """Feeds of the adaptable graph: input, α and the initial normalisation parameters."""
    m = bundle.manifest
    return {m.input.name: x, m.alpha_input: np.asarray(alpha, dtype=np.float32),
            **{k: v.copy() for k, v in m.initial_params.items()}}


def timed_variants(sessions: dict[str, Any], adaptable: dict[str, Any], torch_model: Any, x: np.ndarray
                   ) -> dict[str, Callable[[], object]]:
    """Callables for one batch: torch eager, every variant × runtime session, the adaptable graphs."""
    import torch

    xt = torch.from_numpy(x)

    def torch_call() -> object:
        with torch.inference_mode():
            return torch_model(xt)

    out: dict[str, Callable[[], object]] = {"torch": torch_call}
    for key, bundle in sessions.items():
        feeds = {bundle.manifest.input.name: x}
        out[key] = functools.partial(bundle.session.run, feeds)
    for key, (bundle, alpha) in adaptable.items():
        out[f"adaptable/{key}"] = functools.partial(bundle.session.run, adaptable_feeds(bundle, x, alpha))
    return out


def measure_rows(built: dict[str, dict[str, Any]], x: np.ndarray, y: np.ndarray, quick: bool
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Bytes and top-1 of every variant × runtime (rows), the loaded bundles, and onnxruntime evidence (optimised
    operator counts of the ``base`` and ``nm`` folded models, per-node profiles of ``base`` at batch 64)."""
    from runtime import load_bundle

    rows: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    evidence: dict[str, Any] = {"optimized_ops": {}, "node_profile_b64": {}}
    for v in VARIANTS:
        b = built[v.bundle]
        for runtime in RUNTIMES:
            key, name = f"{v.key}/{runtime}", model_name(runtime, v.int8)
            if "error" in b:
                rows[key] = {"variant": v.key, "runtime": runtime, "model": name, "error": b["error"]}
                continue
            loaded = load_bundle(b["path"], model=name, threads=RUNTIME_THREADS)
            sessions[key] = loaded
            rows[key] = {"variant": v.key, "runtime": runtime, "model": name, **sizes(b["path"], b["manifest"], name),
                         "top1": top1_runtime(loaded, x, y), "parity": _entry(b["manifest"], name).get("parity")}
            if runtime == "onnxruntime" and v.bundle in ("base", "nm"):
                model = _model_bytes(b["path"], b["manifest"], name)
                evidence["optimized_ops"][key] = optimized_ops(model)
                if v.bundle == "base":
                    evidence["node_profile_b64"][key] = node_profile(model, x[:64].copy(), runs=5 if quick else 31)
            log.info("%s: %s B, top-1 %.4f", key, rows[key]["file_bytes"], rows[key]["top1"])
    return rows, sessions, evidence


def measure_latency(sessions: dict[str, Any], adaptable: dict[str, Any], torch_model: Any, x: np.ndarray,
                    quick: bool) -> dict[str, Any]:
    """Median (and quartiles) ms per call of every timed callable at each batch size, interleaved."""
    rounds, block_s = (3, 0.02) if quick else (31, 0.05)
    latency: dict[str, Any] = {}
    for batch in BATCHES:
        variants = timed_variants(sessions, adaptable, torch_model, x[:batch].copy())
        samples = interleaved(variants, rounds=rounds, target_block_s=block_s, seed=batch)
        latency[str(batch)] = {k: {s: v * 1e3 if s != "n" else v for s, v in summarize(t).as_dict().items()}
                               for k, t in samples.items()}
    return {"rounds": rounds, "target_block_s": block_s, "latency_ms": latency}


def measure_case(case: Case, quick: bool) -> dict[str, Any]:
    """Build the case's bundles, then measure bytes, top-1 and interleaved latency of every variant."""
    from edgeloop.data import load_dataset
    from exporter.checkpoint import load_checkpoint
    from runtime import load_bundle

    ckpt = checkpoint(case)
    torch_model, info = load_checkpoint(ckpt)
    torch_model.eval()
    test = load_dataset(case.dataset, "test", limit=1000 if quick else None)
    x, y = np.array(test.x, dtype=np.float32), np.array(test.y)  # writable copies (torch.from_numpy)
    epochs = 0 if quick else case.fine_tune_epochs
    lr = low_rank_choice(ckpt, case)
    root = scratch_dir(f"compression-{case.key}")
    built = {name: build_bundle(ckpt, case, root / name, args)
             for name, args in bundle_requests(case, lr["spec"], epochs).items()}
    rows, sessions, evidence = measure_rows(built, x, y, quick)
    adaptable = {}
    if "path" in built["base"]:
        adaptable = {key: (load_bundle(built["base"]["path"], model=name, threads=RUNTIME_THREADS), alpha)
                     for key, name, alpha, _ in ADAPTABLE}
    return {
        "arch": case.arch, "dataset": case.dataset, "checkpoint": ckpt.name,
        "checkpoint_test_accuracy": info["meta"].get("metrics", {}).get("test_accuracy"),
        "test_samples": len(y), "torch_top1": top1_torch(torch_model, x, y),
        "exclude": list(case.exclude), "exclude_why": case.exclude_why, "fine_tune_epochs": epochs,
        "int8_tolerance_points": case.int8_tolerance_points, "low_rank": lr,
        "bundles": {k: {"args": v["args"], "seconds": round(v["seconds"], 1), "error": v.get("error"),
                        "compression": compression_summary(v["manifest"]) if "manifest" in v else None}
                    for k, v in built.items()},
        "rows": rows, **measure_latency(sessions, adaptable, torch_model, x, quick), **evidence, "git": git_state(),
    }


# -- derived numbers -----------------------------------------------------------------------------------------
def derive(c: dict[str, Any]) -> None:
    """Add ratios to torch, to the fp32 download, Δ top-1 and the adaptable ratios to a case's results."""
    lat = c["latency_ms"]
    for key, row in c["rows"].items():
        if "error" in row:
            continue
        fp32 = c["rows"].get(f"fp32/{row['runtime']}", {})
        row["download_over_fp32"] = ratio(row["download_bytes"], fp32.get("download_bytes", 0))
        row["file_over_fp32"] = ratio(row["file_bytes"], fp32.get("file_bytes", 0))
        row["top1_delta_points"] = (row["top1"] - fp32["top1"]) * 100 if "top1" in fp32 else None
        for b in map(str, BATCHES):
            row[f"b{b}_ms"] = lat[b][key]["median"]
            row[f"b{b}_over_torch"] = ratio(lat[b][key]["median"], lat[b]["torch"]["median"])
    b64 = lat["64"]
    c["adaptable_over_folded"] = {}
    for key, _, _, folded in ADAPTABLE:  # the base bundle's folded model of the same runtime and precision
        if f"adaptable/{key}" in b64 and folded in b64:
            c["adaptable_over_folded"][key] = ratio(b64[f"adaptable/{key}"]["median"], b64[folded]["median"])


def _target(name: str, measured: str, ok: bool | None) -> dict[str, Any]:
    return {"target": name, "measured": measured, "passes": ok}


def targets(c: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for one case, each with what was measured and pass/fail (None: not measured)."""
    rows, out = c["rows"], []
    tol = c["int8_tolerance_points"]
    for runtime in RUNTIMES:
        r = rows.get(f"int8/{runtime}", {})
        d = r.get("top1_delta_points")
        out.append(_target(f"int8 top-1 within {tol:g} point{'s' if tol != 1 else ''} of fp32 ({runtime})",
                           "—" if d is None else f"{d:+.2f} points", None if d is None else d >= -tol))
    r8, r32 = rows.get("int8/onnxruntime", {}), rows.get("fp32/onnxruntime", {})
    q = ratio(r8["b64_ms"], r32["b64_ms"]) if "b64_ms" in r8 and "b64_ms" in r32 else None
    out.append(_target(f"int8 onnxruntime batch 64 ≤ {INT8_OVER_FP32_TARGET}× fp32 onnxruntime",
                       fmt(q, 2, "×"), None if q is None else q <= INT8_OVER_FP32_TARGET))
    t = r8.get("b64_over_torch")
    speed = None if not t else 1 / t
    out.append(_target(f"int8 onnxruntime batch 64 ≥ {INT8_SPEEDUP_OVER_TORCH_TARGET:g}× faster than torch eager",
                       "—" if speed is None else f"{speed:.2f}× faster",
                       None if speed is None else speed >= INT8_SPEEDUP_OVER_TORCH_TARGET))
    for runtime, label in (("onnxruntime", "ONNX"), ("litert", "TFLite")):
        p = rows.get(f"nm_int8/{runtime}", {})
        s = p.get("download_over_fp32")
        packed = "packed" if p.get("packed") else "not packed"
        out.append(_target(f"2:4 + int8 {label} device download ≤ {PACKED_BYTES_TARGET}× the fp32 one",
                           "—" if s is None else f"{s:.3f}× ({packed}; model file alone {p['file_over_fp32']:.3f}×)",
                           None if s is None else s <= PACKED_BYTES_TARGET))
    for key, label in (("fp32_a05", "ONNX"), ("tflite_fp32_a05", "TFLite")):
        a = c.get("adaptable_over_folded", {}).get(key)
        out.append(_target(f"adaptable {label} fp32 batch 64 ≤ {ADAPTABLE_TARGET}× folded (α = 0.5, statistics on)",
                           fmt(a, 3, "×"), None if a is None else a <= ADAPTABLE_TARGET))
    return out


def run(quick: bool) -> dict[str, Any]:
    """Measure every case (``--quick``: MNIST only, 1,000 test images, no fine-tune, 3 rounds)."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    cases: dict[str, Any] = {}
    for case in CASES[:1] if quick else CASES:
        t0 = time.perf_counter()
        cases[case.key] = measure_case(case, quick)
        derive(cases[case.key])
        cases[case.key]["targets"] = targets(cases[case.key])
        cases[case.key]["seconds"] = round(time.perf_counter() - t0, 1)
    return {"cases": cases, "torch_threads": TORCH_THREADS, "runtime_threads": RUNTIME_THREADS,
            "batches": list(BATCHES), "skipped_cases": [c.key for c in CASES if c.key not in cases]}


# -- markdown --------------------------------------------------------------------------------------------------
LABELS = {v.key: v.label for v in VARIANTS}


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _table(c: dict[str, Any]) -> str:
    rows = []
    for v in VARIANTS:
        for runtime in RUNTIMES:
            r = c["rows"][f"{v.key}/{runtime}"]
            label = v.label if v.key in HEADLINE else f"_{v.label}_"
            if "error" in r:
                rows.append([label, runtime, "export failed", "—", "—", "—", "—", "—", "—"])
                continue
            rows.append([label, runtime, f"{r['file_bytes']:,}", f"{r['download_bytes']:,}",
                         fmt(r["download_over_fp32"], 3, "×"), f"{r['top1'] * 100:.2f}",
                         fmt(r["top1_delta_points"], 2), fmt(r["b1_over_torch"], 2, "×"),
                         fmt(r["b64_over_torch"], 2, "×")])
    return md_table(["variant", "runtime", "model file B", "download B", "× fp32 download", "top-1 %",
                     "Δ vs fp32 (pt)", "batch 1 × torch", "batch 64 × torch"], rows)


def _files(c: dict[str, Any]) -> str:
    rows = []
    for v in VARIANTS:
        for runtime in RUNTIMES:
            r = c["rows"][f"{v.key}/{runtime}"]
            if "error" in r:
                continue
            rows.append([f"{v.label} / {runtime}", f"`{r['file']}`", f"{r['unpacked_bytes']:,}",
                         _ms(r["b1_ms"]), _ms(r["b64_ms"])])
    lat = c["latency_ms"]
    rows.append(["torch eager fp32 (uncompressed checkpoint)", "—", "—", _ms(lat["1"]["torch"]["median"]),
                 _ms(lat["64"]["torch"]["median"])])
    return md_table(["variant / runtime", "shipped file", "unpacked B", "batch 1 ms", "batch 64 ms"], rows)


def _adaptable(c: dict[str, Any]) -> str:
    b64 = c["latency_ms"]["64"]
    rows = []
    for key, name, alpha, folded in ADAPTABLE:
        if f"adaptable/{key}" not in b64 or folded not in b64:
            continue
        variant, runtime = folded.split("/")
        rows.append([f"adaptable `{name}` (α = {alpha:g})", _ms(b64[f"adaptable/{key}"]["median"]),
                     f"folded `{model_name(runtime, variant == 'int8')}`", _ms(b64[folded]["median"]),
                     fmt(c["adaptable_over_folded"].get(key), 2, "×")])
    return md_table(["graph", "batch 64 ms", "against", "batch 64 ms", "ratio"], rows)


def _targets_table(c: dict[str, Any]) -> str:
    verdict = {True: "**passes**", False: "**fails**", None: "not measured"}
    return md_table(["target", "measured", "verdict"],
                    [[t["target"], t["measured"], verdict[t["passes"]]] for t in targets(c)])  # from the numbers


def _ops(c: dict[str, Any]) -> str:
    parts = []
    for key, ops in c["optimized_ops"].items():
        variant, runtime = key.split("/")
        shown = ", ".join(f"{op} {n}" for op, n in ops.items())
        parts.append(f"{LABELS[variant]} ({runtime}): {shown}")
    return "; ".join(parts)


def _profile(c: dict[str, Any], top: int = 4) -> str:
    parts = []
    for key, nodes in c.get("node_profile_b64", {}).items():
        total = sum(n["ms"] for n in nodes)
        shown = ", ".join(f"`{n['node']}` ({n['op']}) {n['ms']:.3f}" for n in nodes[:top])
        parts.append(f"{LABELS[key.split('/')[0]]}: {shown} (all nodes {total:.3f})")
    return "; ".join(parts)


def _interpretation(c: dict[str, Any]) -> list[str]:
    """Sentences that follow from the measured numbers (every comparison phrased from them)."""
    rows, lines = c["rows"], []
    r8, r32 = rows.get("int8/onnxruntime", {}), rows.get("fp32/onnxruntime", {})
    if "b64_ms" in r8 and "b64_ms" in r32:
        q = r8["b64_ms"] / r32["b64_ms"]
        ops8 = c["optimized_ops"].get("int8/onnxruntime", {})
        fused = sum(n for op, n in ops8.items() if op.startswith("QLinear") or op in ("ConvInteger", "MatMulInteger"))
        qdq = sum(n for op, n in ops8.items() if op in ("QuantizeLinear", "DequantizeLinear"))
        line = (f"int8 onnxruntime runs batch 64 in {q:.2f}× the fp32 folded model's time "
                f"({'faster' if q < 1 else 'not faster'}); after onnxruntime's optimisations its graph has "
                f"{fused} integer compute nodes (QLinear*/…Integer) and {qdq} Quantize/DequantizeLinear nodes left")
        if fused == 0 and qdq:
            line += ": the QDQ pairs were not fused into integer kernels, so it computes in float plus (de)quantize"
        lines.append(line + ".")
        prof = c.get("node_profile_b64", {})
        p8, p32 = prof.get("int8/onnxruntime"), prof.get("fp32/onnxruntime")
        if p8 and p32 and q >= 1:
            top = p8[0]
            total8, total32 = sum(n["ms"] for n in p8), sum(n["ms"] for n in p32)
            lines.append(
                f"Profiled at batch 64 (median per node), the int8 graph's node time is {total8:.2f} ms against "
                f"{total32:.2f} ms for fp32; its largest node is `{top['node']}` ({top['op']}, {top['ms']:.2f} ms, "
                f"{top['ms'] / total8:.0%} of it; by itself {top['ms'] / total32:.2f}× the whole fp32 graph).")
    for runtime in RUNTIMES:
        a, b = rows.get(f"int8/{runtime}", {}), rows.get(f"fp32/{runtime}", {})
        if "b64_ms" in a and "b64_ms" in b:
            lines.append(f"{runtime}: int8 / fp32 at batch 64 = {a['b64_ms'] / b['b64_ms']:.2f}×, at batch 1 = "
                         f"{a['b1_ms'] / b['b1_ms']:.2f}×.")
    nm, fp = rows.get("nm/onnxruntime", {}), rows.get("fp32/onnxruntime", {})
    if "b64_ms" in nm and "b64_ms" in fp:
        ops = c["optimized_ops"]
        same = ops.get("nm/onnxruntime") == ops.get("fp32/onnxruntime")
        lines.append(f"2:4 sparsity changes onnxruntime's batch-64 time by {nm['b64_ms'] / fp['b64_ms']:.2f}×"
                     + (" (its optimised graph runs the same dense operators as fp32, zeros included)" if same else "")
                     + f"; its bytes shrink only in the packed transport encoding ({nm['file_bytes']:,} B shipped for "
                     f"{nm['unpacked_bytes']:,} B of ONNX).")
    lt = rows.get("nm/litert", {})
    if "file_bytes" in lt:
        lines.append(f"TFLite: the 2:4 fp32 file ships as {lt['file_bytes']:,} B for {lt['unpacked_bytes']:,} B of "
                     "TFLite (packed along torch's input order, its OHWI filters included)." if lt["packed"] else
                     "TFLite files ship unpacked, so 2:4 saves no LiteRT bytes.")
    p = rows.get("nm_int8/onnxruntime", {})
    if "download_bytes" in p:
        over = sum(p["overhead_bytes"].values())
        lines.append(f"Of the 2:4 + int8 download ({p['download_bytes']:,} B), the fixed files (manifest, signature, "
                     f"golden vectors, source feature statistics) are {over:,} B ({over / p['download_bytes']:.0%}); "
                     f"the model's golden vectors are {p['overhead_bytes']['golden']:,} B.")
        if p.get("class_statistics_bytes"):
            extra = sum(p["class_statistics_bytes"].values())
            fp = rows.get("fp32/onnxruntime", {})
            with_fp = fp.get("download_with_class_statistics_bytes")
            lines.append(f"A device that also fetches the class-conditional statistics (Mahalanobis drift, T3A "
                         f"prototypes) downloads {extra:,} B more: {p['download_with_class_statistics_bytes']:,} B"
                         + (f", {p['download_with_class_statistics_bytes'] / with_fp:.3f}× the fp32 download with "
                            f"them ({with_fp:,} B)." if with_fp else "."))
    return lines


def _case(c: dict[str, Any]) -> str:
    lr = c["low_rank"]
    probe = lr["energy_probe"]["4"]
    lr_line = (f"Low-rank: `{lr['spec']}`" + (f" ({lr['why']})" if lr["why"] else "") +
               f"; {LOW_RANK_ENERGY} would keep {probe['kept']:.0%} of the targeted weights (ranks rounded to "
               f"multiples of 4).")
    comp = []
    for name, b in c["bundles"].items():
        if b["error"]:
            comp.append(f"`{name}`: **export failed** — {b['error']}")
            continue
        s = b["compression"] or {}
        bits = []
        if "low_rank" in s:
            ranks = ", ".join(f"{k} {r}/{f}" for k, (r, f) in s["low_rank"]["ranks"].items()) or "none factorized"
            weights = s["low_rank"]
            bits.append(f"ranks {ranks}; weights {weights['params_before']:,} → {weights['params_after']:,}")
        if "nm" in s:
            bits.append(f"2:4 on {len(s['nm']['layers'])} layers")
        comp.append(f"`{name}` ({b['seconds']:.0f} s" + (f"; {'; '.join(bits)}" if bits else "") + ")")
    commit = (c.get("git") or {}).get("commit") or "unknown"
    dirty = (c.get("git") or {}).get("uncommitted_code_files") or []
    code = f"code at commit `{commit[:10]}`" + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "")
    epochs = c["fine_tune_epochs"]
    tune = (f"Fine-tune: {epochs} epoch{'s' if epochs > 1 else ''} over the training set after each torch pass."
            if epochs else "No fine-tune (quick run): the 2:4 and low-rank rows are compression alone.")
    head = (f"**{c['arch']} on {c['dataset']}** ({code}; `{c['checkpoint']}`, torch eager fp32 top-1 "
            f"{c['torch_top1'] * 100:.2f} % on {c['test_samples']:,} test images). N:M and low-rank exclude "
            f"{c['exclude_why']}. {tune} {lr_line} Bundles (export wall time): {', '.join(comp)}.")
    return "\n\n".join([
        head, _table(c),
        f"Latency (median over {c['rounds']} interleaved rounds of about {c['target_block_s'] * 1e3:.0f} ms per "
        "callable) and the shipped files:", _files(c),
        "Adaptable graphs (`base` bundle, statistics outputs on) against the folded graph of the same runtime:",
        _adaptable(c),
        "Targets:", _targets_table(c),
        "onnxruntime's optimised graphs (operator counts): " + _ops(c) + ".",
        "onnxruntime per-node kernel time at batch 64 (its profiler, ms per run, largest nodes): " + _profile(c) + ".",
        " ".join(_interpretation(c)),
    ])


def render(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section body: setup, then per model the table, latency, targets, interpretation."""
    intro = (
        f"Each variant is a folded model in a bundle built by `run_export` (ONNX + TFLite, adaptable and folded, "
        f"fp32 and int8 in every bundle). **Device download** = manifest.json + manifest.sig + every file "
        f"`Manifest.files_for` names for the model — the one model file the device runs (packed `*.onnx.nmpack` "
        f"when the bundle ships it packed), its golden block and the source feature statistics; the "
        f"class-conditional statistics only a device running Mahalanobis drift or T3A prototypes fetches are "
        f"reported separately; `× fp32 download` compares it with the fp32 variant in the same runtime. Top-1 is "
        f"measured through `Predictor` on the loaded bundle (batch {EVAL_BATCH}). Latency: the runtime session's "
        f"`run` against torch eager fp32 of the uncompressed checkpoint, all interleaved in one run; torch with "
        f"{r['torch_threads']} thread (`torch.set_num_threads(1)`), onnxruntime with 1 intra-op and 1 inter-op "
        f"thread, LiteRT with {r['runtime_threads']} thread. Rows in italics are extra (int8 of the 2:4 and "
        f"low-rank bundles); the 2:4 + int8 row is the one the packed-bytes target names."
    )
    parts = [intro] + [_case(c) for c in r["cases"].values()]
    if r["skipped_cases"]:
        parts.append(f"Not measured in this run: {', '.join(r['skipped_cases'])} (quick runs cover MNIST only).")
    return "\n\n".join(parts)
