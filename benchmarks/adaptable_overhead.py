"""Cost of the adaptable ONNX graph against the folded export of the same model (onnxruntime CPU).

Run ``python -m benchmarks.adaptable_overhead`` (``--quick`` for a smoke run, ``--accuracy`` for the
α-BN variants on corrupted digits streams, ``--stream-accuracy`` for the device's α-BN with exact and with
first-16-sample statistics on the TTA benchmark's MNIST and CIFAR-10 streams, ``--json PATH`` to keep the
raw numbers). Not wired into ``benchmarks/run.py``.

For ``small_cnn`` (digits, 1×8×8), ``smallcnn`` (MNIST, 1×28×28) and ``resnet8`` (CIFAR, 3×32×32), with
seeded random weights and BN statistics calibrated on random inputs (latency does not depend on the values),
every graph form is exported from the same torch model and timed interleaved (median per call over rounds,
one intra-op thread, then onnxruntime's default thread count):

* ``folded``: :func:`exporter.onnx_fold.export_folded_onnx` (eval mode, BatchNorm folded, no statistics);
* ``traced``: the previous adaptable graph (the torch α-mix traced as is);
* ``lean``: the adaptable graph :func:`exporter.onnx_export.export_adaptable_onnx` builds now (statistics on);
* ``lean_stats16``: the lean graph with its batch statistics from the first 16 samples of the batch
  (``LeanOptions(stats_samples=16)``, opt-in: the rest of the batch runs as a second stream without
  statistics), at every batch size;
* at batch 64, ablations of the lean graph (one rewrite off at a time) and ``lean_nostats``: the α = 0 graph
  without statistics outputs (fed reference statistics, the normalisation still a graph input);
* int8 (static QDQ, :func:`exporter.quantize.quantize_int8`) of ``traced`` and ``lean``, and of ``lean`` with
  the convolutions on fewer than 8 input channels left float (``lean_int8_float_stem``).

Each adaptable graph is fed α = 0.5 (one-pass α-mix; α does not change the work done).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import interleaved, machine_info, md_table, scratch_dir, summarize

log = logging.getLogger(__name__)

ARCHS: dict[str, dict[str, Any]] = {
    "small_cnn": {"dataset": "digits", "channels": 1, "size": 8, "mean": (0.3,), "std": (0.4,)},
    "smallcnn": {"dataset": "mnist", "channels": 1, "size": 28, "mean": (0.1307,), "std": (0.3081,)},
    "resnet8": {"dataset": "cifar10", "channels": 3, "size": 32, "mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)},
}
BATCHES = (1, 16, 64)
RATIO_BATCH = 64
ALPHA = 0.5
STATS_SAMPLES = 16  # the opt-in split graph's statistics sample (lean_stats16)
ALL_BATCHES = ("folded", "traced", "lean", "lean_stats16")  # variants timed at every batch size


@dataclass(frozen=True)
class Exported:
    """The ONNX files of one architecture, keyed by variant name, and their node counts."""

    arch: str
    files: dict[str, Path]
    nodes: dict[str, int]
    params: dict[str, np.ndarray]
    shape: tuple[int, int, int]


def _model(arch: str) -> Any:
    """A seeded random-weight model in eval mode, BN statistics calibrated on random [0, 1] inputs."""
    import torch

    from exporter.models import ModelSpec, build_model

    a = ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(arch, ModelSpec(a["channels"], 10, a["size"], a["mean"], a["std"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration batches
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(4):
            model(torch.rand(32, a["channels"], a["size"], a["size"]))
    return model.eval()


def _lean_variants() -> dict[str, Any]:
    from exporter.onnx_graph import LeanOptions

    return {
        "lean": LeanOptions(),
        "lean_no_pool_first": LeanOptions(pool_first=False),
        "lean_reducemean_stats": LeanOptions(gap_stats=False),
        "lean_no_shift": LeanOptions(shift=False),
        "lean_mean_through_conv": LeanOptions(mean_through_conv=True),
        "lean_nostats": LeanOptions(statistics=False),
        "lean_stats16": LeanOptions(stats_samples=STATS_SAMPLES),
    }


def export_all(arch: str, out: Path, int8: bool = True) -> Exported:
    """Export every variant of ``arch`` into ``out`` (parity-checked by the exporters)."""
    import onnx
    import torch

    from exporter.onnx_export import export_adaptable_onnx, params_numpy
    from exporter.onnx_fold import export_folded_onnx
    from exporter.onnx_graph import build_lean_adaptable
    from exporter.quantize import Int8Config, quantize_int8

    a = ARCHS[arch]
    model = _model(arch)
    rng = np.random.default_rng(0)
    x = rng.random((64, a["channels"], a["size"], a["size"]), dtype=np.float32)
    example = torch.from_numpy(x[:2])
    files = {"folded": out / "folded.onnx", "traced": out / "traced.onnx"}
    export_folded_onnx(model, files["folded"], example, parity_x=x)
    export_adaptable_onnx(model, files["traced"], example, parity_x=x, lean=False)
    for name, options in _lean_variants().items():
        files[name] = out / f"{name}.onnx"
        if name == "lean":
            export_adaptable_onnx(model, files[name], example, parity_x=x, lean=options)
        else:
            build_lean_adaptable(model, files[name], example, options)
    params = params_numpy(model)
    if int8:
        config = Int8Config(min_agreement=0.0)  # random weights: agreement is not the point here
        for name in ("traced", "lean"):
            files[f"{name}_int8"] = out / f"{name}_int8.onnx"
            quantize_int8(files[name], files[f"{name}_int8"], x, params, config)
        files["lean_int8_float_stem"] = out / "lean_int8_float_stem.onnx"
        _quantize_float_stem(files["lean"], files["lean_int8_float_stem"], x, params)
    nodes = {k: len(onnx.load(str(p)).graph.node) for k, p in files.items()}
    return Exported(arch, files, nodes, params, (a["channels"], a["size"], a["size"]))


def _quantize_float_stem(src: Path, dst: Path, x: np.ndarray, params: Mapping[str, np.ndarray]) -> None:
    """Like :func:`exporter.quantize.quantize_int8`, but convolutions with < 8 input channels stay float.

    onnxruntime's ``QLinearConv`` on one to three input channels measured several times slower than the
    float convolution it replaces; this variant shows what excluding them would buy.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from exporter.quantize import CalibrationReader

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    proto = onnx.load(str(pre))
    inits = {i.name: i for i in proto.graph.initializer}
    stem = [n.name for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in inits
            and inits[n.input[1]].dims[1] < 8]
    head = [n.name for n in proto.graph.node if "logits" in n.output]
    quantize_static(str(pre), str(dst), CalibrationReader(x, params), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=stem + head,
                    calibrate_method=CalibrationMethod.MinMax)


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _callables(exp: Exported, names: list[str], x: np.ndarray, threads: int | None) -> dict[str, Callable[[], object]]:
    """One ``session.run`` (every output) per variant."""
    from exporter.onnx_export import make_feeds

    out: dict[str, Callable[[], object]] = {}
    for name in names:
        sess = _session(exp.files[name], threads)
        wanted = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in make_feeds(x, exp.params, ALPHA).items() if k in wanted}
        out[name] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
    return out


def time_arch(exp: Exported, threads: int | None, rounds: int, block_s: float = 0.005, ablations: bool = True
              ) -> dict[str, dict[str, dict[str, float]]]:
    """Per batch size and variant: median ms per call and the median over rounds of the ratio to ``folded``.

    Every round runs every variant back to back (shuffled), so the per-round ratio cancels the slow phases
    of a shared machine better than the ratio of medians. Ablations run at :data:`RATIO_BATCH` only.
    """
    rng = np.random.default_rng(1)
    result: dict[str, dict[str, dict[str, float]]] = {}
    for batch in BATCHES:
        x = rng.random((batch, *exp.shape), dtype=np.float32)
        names = [*(n for n in ALL_BATCHES if n in exp.files), *(n for n in exp.files if "_int8" in n)]
        if batch == RATIO_BATCH and ablations:
            names += [n for n in exp.files if n.startswith("lean_") and "_int8" not in n and n not in names]
        samples = interleaved(_callables(exp, names, x, threads), rounds=rounds, target_block_s=block_s, seed=batch)
        base = np.asarray(samples["folded"])
        result[str(batch)] = {}
        for k, v in samples.items():
            r25, r50, r75 = np.percentile(np.asarray(v) / base, [25, 50, 75])
            result[str(batch)][k] = {"ms": summarize(v).median * 1e3, "ratio": float(r50), "ratio_p25": float(r25),
                                     "ratio_p75": float(r75)}
    return result


def _ratio_table(timings: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], threads: str) -> str:
    rows = []
    for arch, per_batch in timings.items():
        for batch, t in per_batch.items():
            def r(name: str, t: Mapping[str, Mapping[str, float]] = t) -> str:
                return f"{t[name]['ratio']:.2f}×" if name in t else "—"

            lean = f"{t['lean']['ratio']:.2f}× ({t['lean']['ratio_p25']:.2f}–{t['lean']['ratio_p75']:.2f})"
            rows.append([arch, batch, f"{t['folded']['ms']:.3f}", f"{t['lean']['ms']:.3f}", r("traced"), lean,
                         r("lean_stats16"), r("lean_nostats"), r("traced_int8"), r("lean_int8"),
                         r("lean_int8_float_stem")])
    return (f"threads: {threads} (ratios: median over rounds of variant / folded in the same round)\n" + md_table(
        ["model", "batch", "folded ms", "lean ms", "traced", "lean, stats on (p25–p75)",
         f"lean, stats of first {STATS_SAMPLES}", "lean, stats off", "traced int8", "lean int8",
         "lean int8, float stem"], rows))


def _ablation_table(timings: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> str:
    names = [n for n in _lean_variants() if n not in ("lean", "lean_stats16")]
    rows = []
    for arch, per_batch in timings.items():
        t = per_batch[str(RATIO_BATCH)]
        rows.append([arch, f"{t['lean']['ratio']:.2f}×", *(f"{t[n]['ratio']:.2f}×" if n in t else "—" for n in names)])
    return md_table(["model", "lean", *names], rows)


def run_latency(archs: list[str], thread_settings: list[int | None], rounds: int, int8: bool, block_s: float,
                ablations: bool) -> dict[str, Any]:
    """Export and time every architecture under every thread setting."""
    exported = {arch: export_all(arch, scratch_dir(arch), int8) for arch in archs}
    out: dict[str, Any] = {"nodes": {a: e.nodes for a, e in exported.items()}, "timings_ms": {}, "rounds": rounds,
                           "block_s": block_s}
    for threads in thread_settings:
        key = "default" if threads is None else str(threads)
        out["timings_ms"][key] = {arch: time_arch(e, threads, rounds, block_s, ablations)
                                  for arch, e in exported.items()}
    return out


# -- accuracy: exact one-pass α-mix vs statistics of earlier batches ------------------------------------------
STREAM_DOMAINS = (
    ("clean", "gaussian_noise@5", "defocus_blur@4"),
    ("clean", "contrast@4", "impulse_noise@4"),
    ("pixelate@5", "motion_blur@5", "shot_noise@5"),
    ("brightness@5", "jpeg_compression@5", "elastic_transform@5"),
)


class StaleStatsBN:
    """α-BN fed with statistics of earlier batches only (the α = 0 path of the device's ``AlphaBN``).

    Every batch runs at α = 0 with ``L.mean``/``L.var`` = (1-α)·reference + α·running estimate, where the
    running estimate (first and second moments, per-sample momentum ``m``, as in ``AlphaBN``) takes the
    statistics the graph returned for the batch just predicted, but only every ``every``-th batch: with
    ``every`` = 1 this is ``AlphaBN`` below its batch threshold; with ``every`` = k a device would run the
    statistics-free graph on the other k-1 batches.
    """

    def __init__(self, alpha: float, every: int, momentum: float = 0.95) -> None:
        self.alpha, self.every, self.momentum = alpha, every, momentum
        self.state: dict[str, np.ndarray] = {}
        self.batches = 0

    def _feeds(self, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = self.alpha
        feeds = {}
        for layer in {k.rsplit(".", 1)[0] for k in reference if k.endswith(".mean")}:
            mean, sq = self.state[f"{layer}.m1"], self.state[f"{layer}.m2"]
            var = np.maximum(sq - mean**2, 0.0)
            feeds[f"{layer}.mean"] = ((1 - a) * reference[f"{layer}.mean"] + a * mean).astype(np.float32)
            feeds[f"{layer}.var"] = ((1 - a) * reference[f"{layer}.var"] + a * var).astype(np.float32)
        return feeds

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Logits of ``x``; folds its statistics into the estimate on every ``every``-th batch."""
        reference = model.params
        if not self.state:
            for k, v in reference.items():
                if k.endswith(".mean"):
                    layer = k.rsplit(".", 1)[0]
                    self.state[f"{layer}.m1"] = v.astype(np.float64)
                    self.state[f"{layer}.m2"] = reference[f"{layer}.var"].astype(np.float64) + v.astype(np.float64)**2
        result = model.forward(x, alpha=0.0, params=self._feeds(reference))
        if self.batches % self.every == 0:
            keep = self.momentum ** len(x)
            for layer, (mean, var) in result.batch_stats.items():
                m = np.asarray(mean, np.float64)
                self.state[f"{layer}.m1"] = keep * self.state[f"{layer}.m1"] + (1 - keep) * m
                self.state[f"{layer}.m2"] = keep * self.state[f"{layer}.m2"] + (1 - keep) * (var + m**2)
        self.batches += 1
        return result.logits


@functools.cache
def _digits_bundle() -> Path:
    """Train small_cnn on the digits train split (seeded, one thread) and export an fp32 bundle (once)."""
    from edgeloop.data import load_dataset
    from exporter.bundle import export_bundle
    from exporter.train import TrainConfig, train_model

    train = load_dataset("digits", "train")
    model, spec, _ = train_model("small_cnn", train.x, train.y, TrainConfig(epochs=15, seed=0, threads=1))
    out = scratch_dir("digits") / "bundle"
    return export_bundle((model, "small_cnn", spec, "0" * 64), out, labels=train.labels, calibration_x=train.x[:256],
                         golden_x=train.x[:8], source_x=train.x, source_y=train.y, int8=False)


def run_accuracy(batch: int, per_domain: int, every: tuple[int, ...]) -> dict[str, Any]:
    """Top-1 on corrupted digits streams: source, exact one-pass α-mix, statistics of earlier batches."""
    from device_agents.tta import AlphaBN, AlphaBNConfig, SourceModel
    from edgeloop.data import build_stream, iter_batches, load_dataset
    from runtime import AdaptableModel, load_bundle

    model = AdaptableModel(load_bundle(_digits_bundle(), threads=1))
    test = load_dataset("digits", "test")
    alpha = AlphaBNConfig().alpha
    correct: dict[str, int] = collections.Counter()
    total = 0
    for i, domains in enumerate(STREAM_DOMAINS):
        stream = build_stream(test, domains, per_domain, seed=i)
        methods: dict[str, Any] = {
            "source": SourceModel(), "exact_alpha_mix": AlphaBN(AlphaBNConfig(min_batch_for_batch_stats=1)),
            # the device's AlphaBN held on its small-batch path: statistics of the batches before this one
            "alpha_bn_running_estimate": AlphaBN(AlphaBNConfig(min_batch_for_batch_stats=batch + 1)),
            **{f"earlier_batches_every_{k}": StaleStatsBN(alpha, k) for k in every},
        }
        for _, x, y in iter_batches(stream, batch):
            for name, method in methods.items():
                logits = (method.predict(model, x) if isinstance(method, StaleStatsBN)
                          else method.adapt_and_predict(model, x).logits)
                correct[name] += int((logits.argmax(1) == y).sum())
            total += len(y)
    return {"alpha": alpha, "batch": batch, "samples": total, "streams": [list(d) for d in STREAM_DOMAINS],
            "accuracy": {k: v / total for k, v in correct.items()}}


# -- accuracy: α-BN with statistics of the first k samples, on the TTA benchmark's streams --------------------
class _GraphModel:
    """The parts of :class:`runtime.AdaptableModel` that :class:`device_agents.tta.AlphaBN` uses, over an ONNX
    file that is no bundle (so that graph variants built here can run the device's method unchanged)."""

    def __init__(self, path: Path, params: Mapping[str, np.ndarray], layers: list[str]) -> None:
        import types

        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self._sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._names = [o.name for o in self._sess.get_outputs()]
        self.params = dict(params)
        self.layers = layers
        self.manifest = types.SimpleNamespace(layers=[types.SimpleNamespace(name=n) for n in layers])

    def forward(self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None) -> Any:
        """One adaptable pass: logits, features and per-layer batch statistics."""
        from runtime.model import ForwardResult

        feeds = {**self.params, **(params or {}), "input": np.ascontiguousarray(x, dtype=np.float32),
                 "alpha": np.asarray(alpha, dtype=np.float32)}
        out = dict(zip(self._names, self._sess.run(None, feeds), strict=True))
        stats = {n: (out[f"{n}.batch_mean"], out[f"{n}.batch_var"]) for n in self.layers}
        return ForwardResult(out["logits"], out["features"], stats)


def run_stream_accuracy(case_key: str, per_domain: int, samples: int = STATS_SAMPLES) -> list[dict[str, Any]]:
    """Top-1 of source and of the device's α-BN with exact batch statistics and with the statistics of the
    first ``samples`` samples, on the TTA benchmark's continual streams (its cached checkpoint, every
    corruption at severities 5 and 3, both orders, batches 64 and 16; ``per_domain`` images per corruption)."""
    import torch

    from benchmarks.bench_tta import CASES, SEED, checkpoint
    from device_agents.tta import AlphaBN, SourceModel
    from edgeloop.data import CORRUPTIONS, ORDERS, build_stream, iter_batches, load_dataset
    from exporter.adaptable import norm_layers
    from exporter.checkpoint import load_checkpoint
    from exporter.onnx_export import params_numpy
    from exporter.onnx_graph import LeanOptions, build_lean_adaptable

    case = next(c for c in CASES if c.key == case_key)
    model, _ = load_checkpoint(checkpoint(case))
    model.eval()
    test = load_dataset(case.dataset, "test")
    root = scratch_dir(f"stream-accuracy-{case_key}")
    params, layers = params_numpy(model), [layer.name for layer in norm_layers(model)]
    graphs = {}
    for label, options in (("exact", LeanOptions()), (f"first_{samples}", LeanOptions(stats_samples=samples))):
        build_lean_adaptable(model, root / f"{label}.onnx", torch.from_numpy(test.x[:2].copy()), options)
        graphs[label] = _GraphModel(root / f"{label}.onnx", params, layers)
    rows = []
    for severity in (5, 3):
        for order in ORDERS:
            stream = build_stream(test, [f"{c}@{severity}" for c in CORRUPTIONS], per_domain, seed=SEED, order=order)
            for batch in (64, 16):
                row: dict[str, Any] = {"case": case_key, "severity": severity, "order": order, "batch": batch}
                for name, graph, method in [("source", graphs["exact"], SourceModel()),
                                            *((f"alpha_bn_{k}", g, AlphaBN()) for k, g in graphs.items())]:
                    hits = [method.adapt_and_predict(graph, x).logits.argmax(1) == y
                            for _, x, y in iter_batches(stream, batch)]
                    row[name] = float(np.concatenate(hits).mean())
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print markdown tables (and write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds, batch-64 ratios only worth a glance")
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--block-ms", type=float, default=5.0, help="calls per variant and round last about this")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--threads", default="1,default", help="comma list of 1 | 2 | default")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--accuracy", action="store_true", help="also the α-BN variants on corrupted digits")
    parser.add_argument("--stream-accuracy", action="store_true",
                        help=f"also α-BN with the statistics of the first {STATS_SAMPLES} samples on the TTA streams")
    parser.add_argument("--stream-per-domain", type=int, default=256, help="images per corruption there")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    threads = [None if t == "default" else int(t) for t in args.threads.split(",")]
    report: dict[str, Any] = {"machine": machine_info()}
    report["latency"] = run_latency(args.archs.split(","), threads, 5 if args.quick else args.rounds,
                                    not args.no_int8, args.block_ms / 1e3, not args.no_ablations)
    for key, timings in report["latency"]["timings_ms"].items():
        print(_ratio_table(timings, key), "\n")
        if not args.no_ablations:
            print(f"batch-{RATIO_BATCH} ablations, threads {key} (each / folded; above lean's means the idea helps):")
            print(_ablation_table(timings), "\n")
    print("nodes per file:", json.dumps(report["latency"]["nodes"]), "\n")
    if args.accuracy:
        runs = [run_accuracy(b, 128 if args.quick else 512, (1, 4, 8)) for b in (16, 64)]
        report["accuracy"] = runs
        names = list(runs[0]["accuracy"])
        print(md_table(["α-BN variant (digits small_cnn, 4 corrupted streams)", *(f"top-1, batch {r['batch']}"
                                                                                 for r in runs)],
                       [[k, *(f"{r['accuracy'][k]:.4f}" for r in runs)] for k in names]))
    if args.stream_accuracy:
        rows = [r for key in ("mnist", "cifar10") for r in run_stream_accuracy(key, args.stream_per_domain)]
        report["stream_accuracy"] = rows
        cols = [k for k in rows[0] if k not in ("case", "severity", "order", "batch")]
        print(md_table(["case", "severity", "order", "batch", *(f"{c} top-1 %" for c in cols)],
                       [[r["case"], r["severity"], r["order"], r["batch"], *(f"{100 * r[c]:.2f}" for c in cols)]
                        for r in rows]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
