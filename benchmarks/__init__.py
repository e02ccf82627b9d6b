"""The benchmark suite: one ``bench_<name>.py`` module per benchmark, run and recorded by :mod:`benchmarks.run`.

Speed and memory numbers live here, never in unit tests. Each module exposes ``run(quick) -> dict`` (the
measurements, JSON-serialisable) and ``render(results) -> str`` (its BENCHMARKS.md section body).
"""
