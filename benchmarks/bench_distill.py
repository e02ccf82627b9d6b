"""Server distillation throughput: :class:`server.distill.TorchDistiller` against a bare torch loop, CPU and GPU.

Two settings, each run on every device measured (``cpu``, and ``cuda`` when torch sees a GPU):

* ``digits``: 512 corrupted digits samples (1×8×8), the small_cnn student and a short-trained wide_cnn
  teacher, batch 64, 50 steps. The server's everyday round.
* ``cifar``: 1024 synthetic CIFAR-shaped samples (3×32×32), the ResNet-8 student and the wide_cnn teacher
  (64…256 channels, about 10× ResNet-8's multiply-adds), untrained and seeded (the cost does not depend on
  the weights or the pixels), batch 256, 50 steps: the setting where a GPU matters.

Per setting and device the variants run interleaved (the order rotates every repeat), each call once per
repeat; medians and p25–p75 over the repeats are reported:

* ``distiller``: one ``TorchDistiller.distill`` call as a server round makes it (the teacher copy reset and
  adapted with 3 Tent steps, teacher logits over all samples, KL before/after over all samples, 50 student
  steps, results back on the host); throughput = steps × batch / wall seconds of the call. Its own
  train-loop-only rate (``samples_per_s`` metric) is recorded as well.
* ``bare``: per step, a no-grad teacher forward on the minibatch, the student's adaptable forward
  (:func:`exporter.adaptable.functional_forward`), the KD loss, backward and an Adam step on the BN affine,
  with the distiller's precision and memory format on that device (bf16 autocast, channels-last and fused
  Adam on CUDA; fp32 NCHW on CPU); data moved once, one wait for the GPU at the end.
* ``bare_cached``: the same, with the teacher's logits computed once over all samples.
* ``distiller_eager`` and ``distiller_fp32`` (CUDA only): the distiller without its CUDA graph, and without
  graph, autocast and channels-last (plain eager fp32), to show what those buy.

CPU runs use one torch thread (the server's reference machine has two shared cores). The ``cifar`` setting
gets fewer repeats on the CPU, where one repeat takes minutes.

CPU and GPU results come from different machines, so the results JSON keeps one section per device, each
with its own machine, device name and date, and BENCHMARKS.md shows where each part was measured:

1. On the GPU machine: ``python -m benchmarks.bench_distill --devices cuda --out OUT/distill.json``
   (``python -m benchmarks.run --only distill`` there measures its CPU as well).
2. Here: ``python -m benchmarks.run --only distill`` measures the CPU; a run on a machine without a GPU keeps
   the ``cuda`` section already in ``benchmarks/results/distill.json``.
3. ``python -m benchmarks.bench_distill --merge-from OUT/distill.json`` copies that file's ``cuda`` section
   into ``benchmarks/results/distill.json``; then ``python -m benchmarks.run --render-only``.

``EDGELOOP_BENCH_DISTILL_DEVICES`` (e.g. ``cuda``) and ``EDGELOOP_BENCH_DISTILL_SETTINGS`` (e.g. ``digits``)
restrict what :func:`run` measures; ``--devices``/``--settings`` set them for the command line.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO_ROOT,
    fmt,
    gpu_available,
    machine_info,
    md_table,
    now_iso,
    ratio,
    scratch_dir,
    summarize,
)

log = logging.getLogger(__name__)

NAME = "distill"
TITLE = "Cloud distillation throughput (CPU and GPU)"
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / f"{NAME}.json"
DEVICES_ENV = "EDGELOOP_BENCH_DISTILL_DEVICES"
SETTINGS_ENV = "EDGELOOP_BENCH_DISTILL_SETTINGS"
CPU_THREADS = 1
TEACHER_EPOCHS = 3
STUDENT_EPOCHS = 15
CORRUPTIONS = ("gaussian_noise", "contrast", "defocus_blur", "impulse_noise")
TARGET_RATIO = 0.9
VARIANTS = ("distiller", "bare", "bare_cached", "distiller_eager", "distiller_fp32")
LABELS = {
    "distiller": "`TorchDistiller.distill` (whole round call)",
    "distiller_train_loop": "… its student train loop only (its own metric)",
    "bare": "bare torch loop (teacher fwd + student fwd/bwd per step)",
    "bare_cached": "bare torch loop, teacher logits computed once",
    "distiller_eager": "`TorchDistiller.distill`, eager student steps (no CUDA graph)",
    "distiller_fp32": "`TorchDistiller.distill`, eager fp32 NCHW (no graph, autocast, channels-last)",
}


@dataclass(frozen=True)
class Setting:
    """One workload: data, models, batch and steps, and repeats per device type."""

    name: str
    description: str
    samples: int
    batch: int
    steps: int
    student: str
    teacher: str
    repeats: dict[str, int]


SETTINGS = {
    "digits": Setting("digits", "corrupted digits 1×8×8; small_cnn student, wide_cnn teacher trained "
                      f"{TEACHER_EPOCHS} epochs", 512, 64, 50, "small_cnn", "wide_cnn", {"cpu": 9, "cuda": 9}),
    "cifar": Setting("cifar", "synthetic 3×32×32; ResNet-8 student, wide_cnn teacher (untrained, seeded)",
                     1024, 256, 50, "resnet8", "wide_cnn", {"cpu": 3, "cuda": 9}),
}


# -- inputs ---------------------------------------------------------------------------------------------------
def corrupted_samples(n: int) -> tuple[np.ndarray, str]:
    """``n`` digits test images, a quarter each under four corruptions at severity 4; synthetic when the
    digits set (scikit-learn) or the corruptions (SciPy) are unavailable. Returns the array and its origin."""
    try:
        from edgeloop.data import corrupt, load_dataset

        x = load_dataset("digits", "test").x[:n]
    except ImportError as exc:
        log.warning("digits unavailable (%s): synthetic 1×8×8 samples instead", exc)
        return synthetic_images(n, 1, 8), f"synthetic (digits unavailable: {exc})"
    parts = np.array_split(np.arange(len(x)), len(CORRUPTIONS))
    x = np.concatenate([corrupt(x[idx], name, 4, seed=i) for i, (name, idx) in
                        enumerate(zip(CORRUPTIONS, parts, strict=True))]).astype(np.float32)
    return x, "digits test, 4 corruptions at severity 4"


def synthetic_images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """Seeded smooth random images in [0, 1]: a coarse random grid upsampled, plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, channels, max(1, size // 4), max(1, size // 4)), dtype=np.float32)
    up = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)[:, :, :size, :size]
    noisy = up + 0.1 * rng.standard_normal(up.shape, dtype=np.float32)
    return np.ascontiguousarray(np.clip(noisy, 0.0, 1.0), dtype=np.float32)


def digits_checkpoints() -> tuple[Path, Path]:
    """(teacher, student): wide_cnn trained ``TEACHER_EPOCHS`` and small_cnn ``STUDENT_EPOCHS`` epochs on digits,
    single-threaded and seeded (the student is the one :func:`benchmarks.common.student_artifacts` trains)."""
    from edgeloop import pipeline

    root = scratch_dir("distill-digits")
    try:
        for arch, epochs in (("wide_cnn", TEACHER_EPOCHS), ("small_cnn", STUDENT_EPOCHS)):
            pipeline.train_checkpoint(arch=arch, dataset="digits", out=root / f"{arch}.pt", epochs=epochs, seed=0,
                                      threads=1)
    except ImportError as exc:
        log.warning("cannot train on digits (%s): untrained checkpoints instead", exc)
        return random_checkpoints(root, "wide_cnn", "small_cnn", 1, 8)
    return root / "wide_cnn.pt", root / "small_cnn.pt"


def random_checkpoints(root: Path, teacher: str, student: str, channels: int, size: int) -> tuple[Path, Path]:
    """Seeded untrained (teacher, student) checkpoints for ``channels``×``size``² inputs, 10 classes."""
    import torch

    from exporter.checkpoint import save_checkpoint
    from exporter.models import ModelSpec, build_model

    spec = ModelSpec(channels, 10, size, (0.5,) * channels, (0.25,) * channels)
    paths = []
    for seed, arch in enumerate((teacher, student)):
        torch.manual_seed(seed)
        path = root / f"{arch}-{seed}.pt"
        save_checkpoint(build_model(arch, spec), arch, spec, path, {"dataset": "synthetic", "untrained": True})
        paths.append(path)
    return paths[0], paths[1]


@functools.cache
def setting_inputs(name: str) -> tuple[Path, Path, np.ndarray, str]:
    """Teacher and student checkpoints, the samples and where the samples come from (made once per process)."""
    setting = SETTINGS[name]
    if setting.name == "digits":
        x, origin = corrupted_samples(setting.samples)
        teacher, student = digits_checkpoints()
        return teacher, student, x, origin
    teacher, student = random_checkpoints(scratch_dir("distill-cifar"), setting.teacher, setting.student, 3, 32)
    return teacher, student, synthetic_images(setting.samples, 3, 32), "synthetic smooth random 3×32×32"


def _alpha() -> float:
    """The device's α-BN mix (the distiller distils through the same normalisation the device runs)."""
    try:
        from device_agents.tta import AlphaBNConfig
    except ImportError:  # pragma: no cover - the device side is part of the package
        return 1.0
    return float(AlphaBNConfig().alpha)


# -- the measured loops ---------------------------------------------------------------------------------------
def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(teacher_ckpt: Path, student_ckpt: Path, x: np.ndarray, params: dict[str, np.ndarray], alpha: float,
              setting: Setting, device_name: str, *, cache_teacher: bool = False, temperature: float = 2.0,
              lr: float = 1e-2) -> float:
    """Teacher forward + student adaptable forward/backward for ``setting.steps`` minibatches; wall seconds.

    Precision and memory format follow :class:`server.distill.TorchDistiller` on the device (bf16 autocast,
    channels-last and fused Adam on CUDA). ``cache_teacher``: the teacher's logits are computed once over all
    samples (in batches) instead of per step. Model loading and moving is not timed; moving the data is.
    """
    import contextlib

    import torch

    from exporter.adaptable import functional_forward
    from exporter.checkpoint import load_checkpoint
    from server.distill import distillation_loss, resolve_device, use_channels_last

    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    teacher, _ = load_checkpoint(teacher_ckpt)
    student, _ = load_checkpoint(student_ckpt)
    memory_format = torch.channels_last if use_channels_last(student, device) else torch.contiguous_format
    teacher.to(device, memory_format=memory_format)
    student.to(device, memory_format=memory_format).requires_grad_(False)

    def amp() -> contextlib.AbstractContextManager[object]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    gen = torch.Generator(device=device).manual_seed(0)
    batch, n = setting.batch, len(x)
    _sync(device)
    t0 = time.perf_counter()
    xt = torch.from_numpy(x).to(device, memory_format=memory_format)
    flat = torch.from_numpy(np.concatenate([params[k].ravel() for k in sorted(params)])).to(device)
    p, offset = {}, 0
    for k in sorted(params):
        p[k] = flat[offset : offset + params[k].size].view(params[k].shape).clone()
        offset += params[k].size
    trainable = [p[k].requires_grad_(True) for k in sorted(p) if k.endswith((".weight", ".bias"))]
    opt = torch.optim.Adam(trainable, lr=lr, fused=True if cuda else None)
    cached = None
    if cache_teacher:
        with torch.no_grad(), amp():
            cached = torch.cat([teacher(xt[i : i + batch]).float() for i in range(0, n, batch)])
    for _ in range(setting.steps):
        idx = torch.randperm(n, generator=gen, device=device)[:batch]
        xb = xt[idx]
        if cached is not None:
            target = cached[idx]
        else:
            with torch.no_grad(), amp():
                target = teacher(xb)
        with amp():
            logits = functional_forward(student, xb, p, alpha)[0]
        loss = distillation_loss(target, logits, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


def measure(setting: Setting, device_name: str, repeats: int) -> dict[str, Any]:
    """Alternate the variants ``repeats`` times on one device; summaries, ratios and the distiller's metrics."""
    import torch

    from exporter.adaptable import source_params
    from exporter.checkpoint import load_checkpoint
    from server.distill import TorchDistiller

    teacher, student, x, origin = setting_inputs(setting.name)
    alpha = _alpha()
    params = {k: v.numpy().astype(np.float32) for k, v in source_params(load_checkpoint(student)[0]).items()}
    cuda = device_name == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    distillers = {"distiller": TorchDistiller(teacher, student, alpha, device=device_name, batch_size=setting.batch)}
    if cuda:
        distillers["distiller_eager"] = TorchDistiller(teacher, student, alpha, device=device_name,
                                                       batch_size=setting.batch, cuda_graph=False)
        distillers["distiller_fp32"] = TorchDistiller(teacher, student, alpha, device=device_name,
                                                      batch_size=setting.batch, autocast=False, channels_last=False,
                                                      cuda_graph=False)
    sides = [v for v in VARIANTS if v in distillers or v.startswith("bare")]
    out: dict[str, list[float]] = {v: [] for v in sides}
    out.update(distiller_train_loop=[], kl_before=[], kl_after=[])
    work = setting.steps * setting.batch

    def once(side: str, record: bool) -> None:
        if side.startswith("bare"):
            seconds = bare_loop(teacher, student, x, params, alpha, setting, device_name,
                                cache_teacher=side == "bare_cached")
            if record:
                out[side].append(work / seconds)
            return
        t0 = time.perf_counter()
        result = distillers[side].distill(x, params, setting.steps)
        if record:
            out[side].append(work / (time.perf_counter() - t0))
            if side == "distiller":
                out["distiller_train_loop"].append(result.metrics["samples_per_s"])
                out["kl_before"].append(result.metrics["kl_before"])
                out["kl_after"].append(result.metrics["kl_after"])

    if cuda:  # CUDA context, cuDNN handles and kernel selection are first-call costs, not throughput
        for side in sides:
            once(side, record=False)
    for rep in range(repeats):
        for side in sides[rep % len(sides) :] + sides[: rep % len(sides)]:
            once(side, record=True)
    med = {k: summarize(v).as_dict() for k, v in out.items()}
    d = distillers["distiller"]
    result: dict[str, Any] = {
        **{k: v for k, v in asdict(setting).items() if k != "repeats"}, "repeats": repeats, "data": origin,
        "alpha": alpha, "autocast_bf16": d._amp, "channels_last": d.channels_last, "cuda_graph": d.cuda_graph,
        "samples_per_s": {k: med[k] for k in (*sides, "distiller_train_loop")},
        "kl_before": med["kl_before"], "kl_after": med["kl_after"],
        "ratio_distiller_over_bare": ratio(med["distiller"]["median"], med["bare"]["median"]),
        "ratio_distiller_over_bare_cached": ratio(med["distiller"]["median"], med["bare_cached"]["median"]),
        "ratio_train_loop_over_bare": ratio(med["distiller_train_loop"]["median"], med["bare"]["median"]),
        "ratio_train_loop_over_bare_cached": ratio(med["distiller_train_loop"]["median"],
                                                   med["bare_cached"]["median"]),
    }
    if "distiller_eager" in med:
        result["ratio_eager_over_bare"] = ratio(med["distiller_eager"]["median"], med["bare"]["median"])
    for other in ("distiller_eager", "distiller_fp32"):
        if other in med:
            result[f"ratio_distiller_over_{other.removeprefix('distiller_')}"] = ratio(
                med["distiller"]["median"], med[other]["median"])
    if cuda:
        result["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def device_section(device_name: str, quick: bool, settings: Sequence[str]) -> dict[str, Any]:
    """Every setting measured on ``device_name`` (``cpu`` or ``cuda``), with the machine and device described."""
    import torch

    from exporter.train import torch_threads

    started, t0 = now_iso(), time.perf_counter()
    info: dict[str, Any] = {"date": started, "quick": quick, "machine": machine_info(),
                            "torch": torch.__version__}
    if device_name == "cuda":
        info.update(device_label=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), torch_threads=torch.get_num_threads())
    else:
        info.update(device_label=f"CPU: {info['machine']['cpu_model']}", torch_threads=CPU_THREADS)
    results = {}
    for name in settings:
        setting = SETTINGS[name]
        repeats = 2 if quick else setting.repeats[device_name]
        log.info("distill: %s on %s, %d repeats", name, device_name, repeats)
        with torch_threads(CPU_THREADS if device_name == "cpu" else None):
            results[name] = measure(setting, device_name, repeats)
    info["settings"] = results
    info["duration_s"] = round(time.perf_counter() - t0, 1)
    return info


def _selected(env: str, default: Sequence[str], allowed: Sequence[str]) -> list[str]:
    raw = os.environ.get(env, "")
    chosen = [s.strip() for s in raw.split(",") if s.strip()] or list(default)
    unknown = [s for s in chosen if s not in allowed]
    if unknown:
        raise ValueError(f"{env}: unknown {unknown}; choose from {list(allowed)}")
    return chosen


def previous_devices(path: Path = RESULTS_PATH) -> dict[str, Any]:
    """The per-device sections of an existing results file ({} when absent or in an older format)."""
    if not path.is_file():
        return {}
    results = json.loads(path.read_text()).get("results", {})
    devices = results.get("devices", {})
    return devices if isinstance(devices, dict) else {}


def run(quick: bool) -> dict[str, Any]:
    """Measure every setting on each selected device; keep earlier sections of devices not measured now."""
    gpu = gpu_available()
    devices = _selected(DEVICES_ENV, ["cpu", "cuda"] if gpu else ["cpu"], ["cpu", "cuda"])
    if "cuda" in devices and not gpu:
        raise RuntimeError(f"{DEVICES_ENV} asks for cuda, but torch.cuda.is_available() is false")
    settings = _selected(SETTINGS_ENV, list(SETTINGS), list(SETTINGS))
    measured = {d: device_section(d, quick, settings) for d in devices}
    kept = {d: {**s, "carried_over": True} for d, s in previous_devices().items() if d not in measured}
    if kept:
        log.info("distill: keeping earlier sections for %s from %s", sorted(kept), RESULTS_PATH)
    return {"target_ratio": TARGET_RATIO, "gpu_available_here": gpu, "devices": {**measured, **kept}}


# -- merging a result file from another machine ------------------------------------------------------------------
def merge(source: Path, target: Path = RESULTS_PATH, devices: Sequence[str] = ("cuda",)) -> list[str]:
    """Copy ``devices`` sections of the results file ``source`` into ``target``; return the sections copied."""
    src = json.loads(Path(source).read_text())
    dst = json.loads(Path(target).read_text())
    if src.get("benchmark") != NAME or dst.get("benchmark") != NAME:
        raise ValueError(f"both files must be {NAME} results")
    into = dst["results"].setdefault("devices", {})
    copied = []
    for name in devices:
        section = src["results"].get("devices", {}).get(name)
        if section is None:
            continue
        into[name] = {**section, "carried_over": False, "merged_from": Path(source).name}
        copied.append(name)
    if not copied:
        raise ValueError(f"{source} has none of the sections {list(devices)}")
    Path(target).write_text(json.dumps(dst, indent=2, default=str) + "\n")
    return copied


def _payload(quick: bool) -> dict[str, Any]:
    """What :func:`benchmarks.run.run_benchmark` writes, for a run of this module alone."""
    started, t0 = now_iso(), time.perf_counter()
    results = run(quick)
    return {"benchmark": NAME, "title": TITLE, "date": started, "quick": quick,
            "duration_s": round(time.perf_counter() - t0, 1), "machine": machine_info(), "results": results}


def main(argv: Sequence[str] | None = None) -> int:
    """``--out FILE``: run and write a results file; ``--merge-from FILE``: merge another machine's sections."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_distill", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="run the benchmark and write its results JSON here")
    p.add_argument("--devices", help=f"comma list of devices to measure (sets {DEVICES_ENV})")
    p.add_argument("--settings", help=f"comma list of settings: {', '.join(SETTINGS)} (sets {SETTINGS_ENV})")
    p.add_argument("--quick", action="store_true", help="2 repeats: a smoke test")
    p.add_argument("--merge-from", type=Path, help="copy this results file's device sections into --into")
    p.add_argument("--merge-devices", default="cuda", help="which sections --merge-from copies (comma list)")
    p.add_argument("--into", type=Path, default=RESULTS_PATH, help="the results file --merge-from updates")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.devices:
        os.environ[DEVICES_ENV] = args.devices
    if args.settings:
        os.environ[SETTINGS_ENV] = args.settings
    if args.out is None and args.merge_from is None:
        p.error("give --out and/or --merge-from")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_payload(args.quick), indent=2, default=str) + "\n")
        log.info("wrote %s", args.out)
    if args.merge_from is not None:
        try:
            copied = merge(args.merge_from, args.into, [d for d in args.merge_devices.split(",") if d])
        except (OSError, ValueError, KeyError, AttributeError) as exc:  # missing, not JSON, not a results file
            p.error(f"--merge-from {args.merge_from} into {args.into}: {type(exc).__name__}: {exc}")
        log.info("merged %s from %s into %s", copied, args.merge_from, args.into)
    return 0


# -- markdown -------------------------------------------------------------------------------------------------
def _cell(s: dict[str, float] | None) -> str:
    if s is None:
        return "—"
    return f"{fmt(s['median'], 0)} ({s['p25']:.0f}–{s['p75']:.0f})"


def _where(name: str, sec: dict[str, Any]) -> str:
    m = sec["machine"]
    ram = f"{m['ram_bytes'] / 2**30:.0f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    host = f"{m.get('cpu_model')}, {m.get('cores')} cores, {ram}"
    origin = (" (kept from an earlier run on that machine)" if sec.get("carried_over")
              else f" (merged from `{sec['merged_from']}`, measured on that machine)" if sec.get("merged_from")
              else "")
    quick = " **quick smoke run, not for quoting**" if sec.get("quick") else ""
    if name == "cuda":
        what = (f"**{sec['device_label']}** (CUDA {sec.get('cuda')}, cuDNN {sec.get('cudnn')}), host {host}; "
                f"torch {sec['torch']}")
    else:
        what = f"**{host}**, {sec['torch_threads']} torch thread; torch {sec['torch']}"
    return f"- `{name}`: {what}; measured {sec['date']}, {sec['duration_s']:.0f} s{origin}.{quick}"


def render(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section body: where each device was measured, then one table per setting."""
    devices: dict[str, Any] = r.get("devices", {})
    order = [d for d in ("cpu", "cuda") if d in devices]
    target = r["target_ratio"]
    lines = [
        "Samples per second of distillation (steps × batch / wall seconds; median over interleaved repeats, "
        "p25–p75 in brackets) of a whole `TorchDistiller.distill` round call and of a bare torch loop of the "
        "same teacher and student forward/backward, on the same device in the same run. On CUDA both run with "
        "bf16 autocast, channels-last and fused Adam, and the distiller replays its student steps from a CUDA "
        "graph (the bare loop is eager); on the CPU both run eagerly in fp32. Each device's section was measured on "
        "its own machine:",
        "\n".join(_where(d, devices[d]) for d in order) if order else "No device section yet.",
    ]
    if "cuda" not in devices:
        lines.append("**No GPU result yet**: torch.cuda.is_available() was false here; see the module docstring "
                     "for measuring on a GPU machine and merging.")
    names = [n for n in SETTINGS if any(n in devices[d]["settings"] for d in order)]
    for name in names:
        per = {d: devices[d]["settings"][name] for d in order if name in devices[d]["settings"]}
        first = next(iter(per.values()))
        head = (f"**`{name}`**: {first['samples']} samples ({first['data']}), {first['description']}, batch "
                f"{first['batch']}, {first['steps']} steps; repeats: "
                + ", ".join(f"{d} {v['repeats']}" for d, v in per.items()) + ".")
        rows = [[LABELS[k]] + [_cell(v["samples_per_s"].get(k)) for v in per.values()]
                for k in ("distiller", "distiller_train_loop", "bare", "bare_cached", "distiller_eager",
                          "distiller_fp32")
                if any(k in v["samples_per_s"] for v in per.values())]
        table = md_table(["variant", *(f"`{d}` samples/s (p25–p75)" for d in per)], rows)
        ratios = [
            ["distiller / bare loop", *(fmt(v["ratio_distiller_over_bare"], 2, "×") for v in per.values())],
            ["distiller / bare loop, teacher logits once",
             *(fmt(v["ratio_distiller_over_bare_cached"], 2, "×") for v in per.values())],
            ["distiller train loop / bare loop, teacher logits once",
             *(fmt(v.get("ratio_train_loop_over_bare_cached"), 2, "×") for v in per.values())],
        ]
        if any("ratio_eager_over_bare" in v for v in per.values()):
            ratios.append(["distiller with eager steps (like the bare loop) / bare loop",
                           *(fmt(v.get("ratio_eager_over_bare"), 2, "×") for v in per.values())])
        for key, label in (("eager", "distiller / distiller with eager steps"),
                           ("fp32", "distiller / distiller in eager fp32 NCHW")):
            if any(f"ratio_distiller_over_{key}" in v for v in per.values()):
                ratios.append([label, *(fmt(v.get(f"ratio_distiller_over_{key}"), 2, "×") for v in per.values())])
        verdicts = []
        for d, v in per.items():
            rt = v["ratio_distiller_over_bare"]
            ok = "meets" if rt is not None and rt >= target else "misses"
            kl = f"median KL {v['kl_before']['median']:.3f} → {v['kl_after']['median']:.3f}"
            mem = (f", peak GPU memory {v['peak_gpu_memory_bytes'] / 2**20:.0f} MiB"
                   if "peak_gpu_memory_bytes" in v else "")
            verdicts.append(f"`{d}`: distiller / bare loop {fmt(rt, 2, '×')} {ok} the ≥ {target} target; {kl}{mem}")
        if "cpu" in per and "cuda" in per:
            speedup = ratio(per["cuda"]["samples_per_s"]["distiller"]["median"],
                            per["cpu"]["samples_per_s"]["distiller"]["median"])
            verdicts.append(f"the GPU round call is {fmt(speedup, 1, '×')} the CPU's (different machines)")
        lines += [head, table, md_table(["ratio of medians", *(f"`{d}`" for d in per)], ratios),
                  "; ".join(verdicts) + "."]
    lines.append(
        "The bare loop pays a teacher forward per step; the distiller computes the teacher's logits once, which "
        "is why it can beat that loop. Against the bare loop that also computes them once, the difference is what "
        "a round adds on top: a Tent-adapted teacher, KL and agreement over all samples before and after, and "
        "the copy of the results back to the host.")
    return "\n\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
