"""Shared helpers of the benchmark suite: machine description, interleaved timing, shared trained models.

Ratios are only meaningful when both sides ran under the same conditions, and the machines here are shared
and noisy, so :func:`interleaved` runs every variant in each round (in a shuffled order) and keeps one
per-call time per round and variant; callers report medians over rounds and ratios of those medians.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib.metadata
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_CORES = 2  # the project's reference machine: 2 shared cores


# -- machine ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo, else :func:`platform.processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    """MemTotal of /proc/meminfo in bytes (None when unavailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), falling back to ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, RAM, OS and the versions of Python and the libraries that set the numbers."""
    return {
        "cpu_model": _cpu_model(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": _mem_total_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime"),
        "torch": _version("torch"),
        "grpcio": _version("grpcio"),
    }


def describe_machine(m: Mapping[str, Any]) -> str:
    """One line: ``AMD EPYC, 2 cores, 23.4 GiB RAM; Python 3.11.7, onnxruntime 1.32.0, torch 2.13.0``."""
    ram = f"{m['ram_bytes'] / 2**30:.1f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    return (f"{m.get('cpu_model')}, {m.get('cores')} cores, {ram}; Python {m.get('python')}, "
            f"onnxruntime {m.get('onnxruntime')}, torch {m.get('torch')}")


def now_iso() -> str:
    """The current UTC time, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def gpu_available() -> bool:
    """Whether torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


# -- statistics and timing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """Median and quartiles of a list of measurements."""

    median: float
    p25: float
    p75: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """A JSON-friendly dict."""
        return {"median": self.median, "p25": self.p25, "p75": self.p75, "n": self.n}


def summarize(samples: Sequence[float]) -> Summary:
    """Median and quartiles of ``samples`` (at least one)."""
    if not samples:
        raise ValueError("no samples to summarize")
    arr = np.asarray(samples, dtype=np.float64)
    p25, median, p75 = np.percentile(arr, [25, 50, 75])
    return Summary(float(median), float(p25), float(p75), int(arr.size))


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when the denominator is not positive."""
    return numerator / denominator if denominator > 0 else None


def time_calls(fn: Callable[[], object], calls: int) -> float:
    """Mean wall seconds per call of ``fn`` over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def calls_for(fn: Callable[[], object], target_s: float, warmup: int = 3) -> int:
    """How many back-to-back calls of ``fn`` take about ``target_s`` (after ``warmup`` calls), at least 1."""
    for _ in range(warmup):
        fn()
    once = time_calls(fn, 3)
    return max(1, round(target_s / max(once, 1e-9)))


def interleaved(
    variants: Mapping[str, Callable[[], object]], rounds: int, target_block_s: float = 0.02, seed: int = 0
) -> dict[str, list[float]]:
    """Per-call seconds of each variant, one sample per round.

    Each variant is warmed up and given a block size (calls per block) of about ``target_block_s``; each
    round then runs one block of every variant in a freshly shuffled order, so slow phases of a shared
    machine hit all variants alike.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    calls = {name: calls_for(fn, target_block_s) for name, fn in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        gc.collect()
        for name in order:
            samples[name].append(time_calls(variants[name], calls[name]))
    return samples


# -- scratch space and shared models -------------------------------------------------------------------------
@functools.cache
def _scratch_root() -> Path:
    """This process's temporary root, removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="edgeloop-bench-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def scratch_dir(name: str) -> Path:
    """A fresh directory under this process's temporary root (removed at exit)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_scratch_root()))


@dataclass(frozen=True)
class StudentArtifacts:
    """The small_cnn digits student: its checkpoint, its exported bundle (fp32 + int8) and training metrics."""

    checkpoint: Path
    bundle: Path
    metrics: dict[str, Any]


@functools.cache
def student_artifacts() -> StudentArtifacts:
    """Train small_cnn on digits (single-threaded, seeded) and export it; cached for the process."""
    from edgeloop import pipeline

    root = scratch_dir("student")
    started = time.perf_counter()
    metrics = pipeline.train_checkpoint(arch="small_cnn", dataset="digits", out=root / "student.pt", epochs=15,
                                        seed=0, threads=1)
    bundle = pipeline.export_checkpoint(root / "student.pt", out=root / "bundle", seed=0,
                                        key_path=root / "signing_key.pem")
    log.info("student trained and exported in %.1f s", time.perf_counter() - started)
    return StudentArtifacts(root / "student.pt", bundle, metrics)


@functools.cache
def teacher_checkpoint(epochs: int = 3) -> Path:
    """A short wide_cnn digits training, single-threaded: enough for throughput, not a good teacher."""
    from edgeloop import pipeline

    out = scratch_dir("teacher") / "teacher.pt"
    pipeline.train_checkpoint(arch="wide_cnn", dataset="digits", out=out, epochs=epochs, seed=0, threads=1)
    return out


# -- markdown ---------------------------------------------------------------------------------------------
def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; the first column is left-aligned, the others right-aligned."""
    align = [":--"] + ["--:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """``value`` with ``digits`` decimals and ``suffix``, or an em dash for None."""
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def side_venv(name: str, packages: Sequence[str], check: str, install_timeout: float = 1800.0
              ) -> tuple[Path | None, str | None]:
    """The interpreter of a comparison tool's own virtual environment ``<bench cache>/<name>`` (created with
    ``pip install packages`` on first use, never a project dependency), checked by running ``check`` in it;
    or None and the reason it is unavailable."""
    from benchmarks.trained import cache_dir

    venv = cache_dir() / name
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            log.info("creating %s with %s", venv, " ".join(packages))
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, capture_output=True,
                           timeout=install_timeout)
        subprocess.run([str(python), "-c", check], check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"{type(exc).__name__}: {exc} {detail.decode(errors='replace')[-500:]}"
    return python, None
