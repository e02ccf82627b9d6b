"""Run the benchmark suite and regenerate BENCHMARKS.md.

``python -m benchmarks.run`` runs every registered benchmark; ``--only NAME`` (repeatable) runs some;
``--quick`` uses fewer repeats (a smoke test; its sections are marked as such). Each benchmark writes
``benchmarks/results/<name>.json``; BENCHMARKS.md is then rebuilt from every result file present, so running
one benchmark keeps the other sections.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import (
    bench_compression,
    bench_demo,
    bench_distill,
    bench_drift,
    bench_fedbuff,
    bench_federated,
    bench_fleet,
    bench_inference,
    bench_load,
    bench_selection,
    bench_tta,
    bench_upload,
)
from benchmarks.common import REPO_ROOT, describe_machine, machine_info, now_iso

log = logging.getLogger("benchmarks")

BENCHMARKS: dict[str, ModuleType] = {
    bench_demo.NAME: bench_demo,
    bench_inference.NAME: bench_inference,
    bench_upload.NAME: bench_upload,
    bench_load.NAME: bench_load,
    bench_distill.NAME: bench_distill,
    bench_compression.NAME: bench_compression,
    bench_tta.NAME: bench_tta,
    bench_drift.NAME: bench_drift,
    bench_selection.NAME: bench_selection,
    bench_federated.NAME: bench_federated,
    bench_fleet.NAME: bench_fleet,
    bench_fedbuff.NAME: bench_fedbuff,
}
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MARKDOWN = REPO_ROOT / "BENCHMARKS.md"

INTRO = """# Benchmarks

Speed and memory of edgeloop's parts, measured by the code in `benchmarks/` (one `bench_<name>.py` per
benchmark) on the machine named in each section. Nothing here is typed in by hand: this file is generated
from `benchmarks/results/<name>.json` by `benchmarks/run.py`.

- `make bench` runs every benchmark and regenerates this file.
- `python -m benchmarks.run --only NAME` runs one ({names}); the other sections are kept from their JSON.
- `--quick` is a smoke run with fewer repeats; sections produced by it say so and are not for quoting.

The machines are shared and noisy, so every comparison runs its variants interleaved in one run, repeats
them, and reports medians (with p25–p75 where useful) and ratios of medians."""


def run_benchmark(name: str, quick: bool, results_dir: Path) -> Path:
    """Run one benchmark and write its JSON (results plus date, machine and duration); return the path."""
    module = BENCHMARKS[name]
    started_at, t0 = now_iso(), time.perf_counter()
    results = module.run(quick)
    payload = {
        "benchmark": name, "title": module.TITLE, "date": started_at, "quick": quick,
        "duration_s": round(time.perf_counter() - t0, 1), "machine": machine_info(), "results": results,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


RESULT_KEYS = ("benchmark", "date", "quick", "duration_s", "machine", "results")


class ResultsFileError(ValueError):
    """A results JSON cannot be rendered: unreadable, not JSON, or not what :func:`run_benchmark` writes."""


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every registered benchmark's JSON found in ``results_dir``, in registry order; a file that is not a
    results file of that benchmark raises :class:`ResultsFileError` naming it."""
    found = {}
    for name in BENCHMARKS:
        path = results_dir / f"{name}.json"
        if not path.is_file():
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResultsFileError(f"{path}: not a readable results file ({exc})") from exc
        missing = [k for k in RESULT_KEYS if k not in payload] if isinstance(payload, dict) else list(RESULT_KEYS)
        if missing or payload["benchmark"] != name:
            raise ResultsFileError(f"{path}: not a results file of benchmark {name!r} (missing {missing} or a "
                                   f"different 'benchmark'); rerun it with --only {name} or remove the file")
        found[name] = payload
    return found


def render_section(payload: dict[str, Any]) -> str:
    """One ``##`` section: title, when/where/how long, then the benchmark's own body."""
    module = BENCHMARKS[payload["benchmark"]]
    mode = "**quick smoke run (fewer repeats) — not for quoting**" if payload["quick"] else "full run"
    meta = (f"_Measured {payload['date']} ({mode}, {payload['duration_s']:.0f} s) on "
            f"{describe_machine(payload['machine'])}. Raw: `benchmarks/results/{payload['benchmark']}.json`._")
    return f"## `{payload['benchmark']}` — {module.TITLE}\n\n{meta}\n\n{module.render(payload['results'])}"


def render_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The whole BENCHMARKS.md."""
    parts = [INTRO.format(names=", ".join(BENCHMARKS))]
    missing = [n for n in BENCHMARKS if n not in results]
    if missing:
        parts.append(f"Not yet run here: {', '.join(missing)}.")
    parts += [render_section(results[name]) for name in results]
    return "\n\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="fewer repeats: a smoke test, not numbers to quote")
    p.add_argument("--render-only", action="store_true", help="run nothing; regenerate the markdown from the JSON")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON results live")
    p.add_argument("--markdown", type=Path, default=MARKDOWN, help="the markdown file to regenerate")
    args = p.parse_args(argv)
    if args.render_only and args.only:
        p.error("--render-only regenerates the whole markdown from every results file; --only does not apply")
    # checked before any benchmark runs: a bad path would otherwise only fail after the whole run
    if args.results_dir.exists() and not args.results_dir.is_dir():
        p.error(f"--results-dir {args.results_dir} exists and is not a directory")
    if not args.markdown.parent.is_dir():
        p.error(f"--markdown {args.markdown}: directory {args.markdown.parent} does not exist")
    if args.markdown.is_dir():
        p.error(f"--markdown {args.markdown} is a directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks, then regenerate the markdown; exit status 1 if any benchmark failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    failed = []
    for name in [] if args.render_only else args.only or list(BENCHMARKS):
        log.info("running %s%s …", name, " (quick)" if args.quick else "")
        t0 = time.perf_counter()
        try:
            path = run_benchmark(name, args.quick, args.results_dir)
        except Exception:
            failed.append(name)
            log.error("benchmark %s failed; its previous result (if any) is kept:\n%s", name, traceback.format_exc())
            continue
        log.info("%s done in %.1f s → %s", name, time.perf_counter() - t0, path)
    try:
        results = load_results(args.results_dir)
    except ResultsFileError as exc:
        log.error("%s; %s not regenerated", exc, args.markdown)
        return 1
    args.markdown.write_text(render_markdown(results))
    log.info("wrote %s", args.markdown)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
