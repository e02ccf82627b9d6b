"""Per-batch latency of the bundle's adaptable graph on onnxruntime, against the wrapper and a folded export.

For the digits small_cnn bundle (fp32 and int8 models) at batch 1, 16 and 64, interleaved in one run:

* ``raw``: a bare ``onnxruntime.InferenceSession.run`` on the adaptable graph with the feeds the wrapper
  builds at α = 0 (input, α and every ``bnK.*`` parameter);
* ``source``: ``runtime.AdaptableModel.forward(x, alpha=0)`` (parameter copy, input checks, checked session);
* ``alpha_bn``: the ``alpha_bn`` TTA method's ``adapt_and_predict`` (α-mixed statistics, running estimate);
* ``folded``: the same trained torch model exported plainly (legacy exporter, opset 17, dynamic batch), so
  BatchNorm is folded into the convolutions by the exporter or onnxruntime's optimiser.

Every session runs with one intra-op (and one inter-op) thread so numbers are stable on shared cores.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import fmt, interleaved, md_table, ratio, scratch_dir, student_artifacts, summarize

NAME = "inference"
TITLE = "Inference latency: adaptable graph vs wrapper vs folded export"
BATCHES = (1, 16, 64)
MODELS = ("fp32", "int8")
RATIO_BATCH = 64


def _ort_session(path: Path) -> Any:
    """A bare onnxruntime CPU session with 1 intra-op and 1 inter-op thread (default optimisation level)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_folded(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Export the checkpoint's model as a plain inference graph; return its path, size and BN node count."""
    import onnx
    import torch

    from exporter.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    spec = info["spec"]
    example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(out), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    nodes = [n.op_type for n in onnx.load(str(out)).graph.node]
    return {"path": out, "bytes": out.stat().st_size, "batchnorm_nodes_in_file": nodes.count("BatchNormalization"),
            "nodes_in_file": len(nodes)}


def _node_counts(path: Path) -> dict[str, int]:
    """Total nodes of an ONNX file and how many are QuantizeLinear/DequantizeLinear."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return {"nodes": len(ops), "qdq_nodes": sum(op in ("QuantizeLinear", "DequantizeLinear") for op in ops)}


def _variants(bundle: Path, folded: Path, x: np.ndarray) -> tuple[dict[str, Any], dict[str, float]]:
    """The timed callables for one batch (keys ``model/variant`` and ``folded``) and output agreement checks."""
    from device_agents.tta import create_tta_method
    from runtime import AdaptableModel, load_bundle

    variants: dict[str, Any] = {}
    checks: dict[str, float] = {}
    folded_sess = _ort_session(folded)
    folded_logits = folded_sess.run(["logits"], {"input": x})[0]
    variants["folded"] = lambda: folded_sess.run(None, {"input": x})
    for name in MODELS:
        loaded = load_bundle(bundle, model=name, threads=1)
        model = AdaptableModel(loaded)
        m = model.manifest
        raw = _ort_session(bundle / loaded.model.file)
        feeds = {**model.params, m.input.name: x, m.alpha_input: np.asarray(0.0, dtype=np.float32)}
        method = create_tta_method("alpha_bn")
        variants[f"{name}/raw"] = lambda raw=raw, feeds=feeds: raw.run(None, feeds)
        variants[f"{name}/source"] = lambda model=model: model.forward(x, alpha=0.0)
        variants[f"{name}/alpha_bn"] = lambda model=model, method=method: method.adapt_and_predict(model, x)
        logits = model.forward(x, alpha=0.0).logits
        checks[f"{name}_vs_folded_max_abs_logit_diff"] = float(np.abs(logits - folded_logits).max())
    return variants, checks


def _timings(bundle: Path, folded: Path, x_all: np.ndarray, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median latency (ms) per batch size and variant, plus the output agreement checks at the largest batch."""
    per_batch: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    for batch in BATCHES:
        x = np.ascontiguousarray(x_all[:batch], dtype=np.float32)
        variants, checks = _variants(bundle, folded, x)
        samples = interleaved(variants, rounds=rounds, seed=batch)
        per_batch[str(batch)] = {
            name: {k: v * 1e3 if k != "n" else v for k, v in summarize(s).as_dict().items()}
            for name, s in samples.items()
        }
    return per_batch, checks


def _ratios(per_batch: dict[str, Any]) -> dict[str, Any]:
    """Ratios of medians: wrapper overhead, int8 vs fp32, adaptable vs folded, for every batch size."""
    out: dict[str, Any] = {}
    for batch, t in per_batch.items():
        med = {name: v["median"] for name, v in t.items()}
        out[batch] = {
            "fp32_raw_over_folded": ratio(med["fp32/raw"], med["folded"]),
            "fp32_source_over_folded": ratio(med["fp32/source"], med["folded"]),
            "int8_raw_over_folded": ratio(med["int8/raw"], med["folded"]),
            "int8_raw_over_fp32_raw": ratio(med["int8/raw"], med["fp32/raw"]),
            **{f"{m}_source_over_raw": ratio(med[f"{m}/source"], med[f"{m}/raw"]) for m in MODELS},
            **{f"{m}_alpha_bn_over_raw": ratio(med[f"{m}/alpha_bn"], med[f"{m}/raw"]) for m in MODELS},
        }
    return out


def run(quick: bool) -> dict[str, Any]:
    """Train and export the digits student, export it folded, time every variant interleaved."""
    from device_agents.tta import AlphaBNConfig
    from edgeloop.data import load_dataset

    art = student_artifacts()
    folded = export_folded(art.checkpoint, scratch_dir("folded") / "small_cnn_folded.onnx")
    x_all = load_dataset("digits", "test").x
    rounds = 5 if quick else 31
    cfg = AlphaBNConfig()
    per_batch, checks = _timings(art.bundle, folded["path"], x_all, rounds)
    sizes = {name: (art.bundle / f"model_{name}.onnx").stat().st_size for name in MODELS}
    return {
        "model": "small_cnn (digits, 1×8×8 input)", "ort_threads": {"intra_op": 1, "inter_op": 1},
        "rounds": rounds, "batches": list(BATCHES), "latency_ms": per_batch, "ratios": _ratios(per_batch),
        "ratio_batch": RATIO_BATCH, "output_checks": checks,
        "sizes_bytes": {"fp32_onnx": sizes["fp32"], "int8_onnx": sizes["int8"], "folded_fp32_onnx": folded["bytes"],
                        "bundle_total": sum(p.stat().st_size for p in art.bundle.rglob("*") if p.is_file())},
        "folded_export": {"batchnorm_nodes_in_file": folded["batchnorm_nodes_in_file"],
                          "nodes_in_file": folded["nodes_in_file"]},
        "node_counts": {name: _node_counts(art.bundle / f"model_{name}.onnx") for name in MODELS},
        "alpha_bn": {"alpha": cfg.alpha, "min_batch_for_batch_stats": cfg.min_batch_for_batch_stats},
        "student_test_accuracy": art.metrics.get("test_accuracy"),
    }


def _interpretation(r: dict[str, Any]) -> list[str]:
    """Sentences that follow from the numbers (every comparison phrased from the measured ratios)."""
    b = str(r["ratio_batch"])
    q = r["ratios"][b]
    lines = []
    adapt = q["fp32_raw_over_folded"]
    if adapt is not None:
        verdict = "within" if adapt <= 1.25 else "above"
        lines.append(f"At batch {b} the adaptable fp32 graph takes {adapt:.2f}× the folded export's time "
                     f"({verdict} the ≤ 1.25× target of a later issue; DESIGN.md measured about 2× for the naive "
                     "graph).")
    i8 = q["int8_raw_over_fp32_raw"]
    if i8 is not None:
        n8, n32 = r["node_counts"]["int8"], r["node_counts"]["fp32"]
        size = r["sizes_bytes"]["int8_onnx"] / r["sizes_bytes"]["fp32_onnx"]
        line = (f"The int8 model runs {max(i8, 1 / i8):.2f}× {'faster' if i8 < 1 else 'slower'} than fp32 at batch {b} "
                f"and its file is {size:.2f}× the fp32 size.")
        if i8 >= 1:
            line += (f" Static QDQ int8 (its graph: {n8['nodes']} nodes, {n8['qdq_nodes']} of them "
                     f"Quantize/DequantizeLinear; fp32: {n32['nodes']}) brings no speed-up on a model this small.")
        lines.append(line)
    small = r["ratios"]["1"]
    lines.append(f"The wrapper (`AdaptableModel.forward`) costs {small['fp32_source_over_raw']:.2f}× the bare "
                 f"session at batch 1 and {q['fp32_source_over_raw']:.2f}× at batch {b}; α-BN costs "
                 f"{small['fp32_alpha_bn_over_raw']:.2f}× / {q['fp32_alpha_bn_over_raw']:.2f}× (below "
                 f"{r['alpha_bn']['min_batch_for_batch_stats']} samples it mixes a running estimate in numpy and "
                 "feeds it as parameters).")
    return lines


def render(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section body: latency table, ratio table, sizes, interpretation."""
    cols = ["folded", "fp32/raw", "fp32/source", "fp32/alpha_bn", "int8/raw", "int8/source", "int8/alpha_bn"]
    rows = [[b, *(fmt(r["latency_ms"][b][c]["median"], 3) for c in cols)] for b in map(str, r["batches"])]
    lat = md_table(["batch", *(f"{c} ms" for c in cols)], rows)
    ratio_rows = [[b, fmt(q["fp32_raw_over_folded"], 2, "×"), fmt(q["int8_raw_over_folded"], 2, "×"),
                   fmt(q["fp32_source_over_raw"], 2, "×"), fmt(q["fp32_alpha_bn_over_raw"], 2, "×"),
                   fmt(q["int8_raw_over_fp32_raw"], 2, "×")] for b, q in r["ratios"].items()]
    rat = md_table(["batch", "adaptable fp32 / folded", "adaptable int8 / folded", "wrapper / raw (fp32)",
                    "α-BN / raw (fp32)", "int8 / fp32 (raw)"], ratio_rows)
    s = r["sizes_bytes"]
    sizes = md_table(["file", "bytes"], [["model_fp32.onnx (adaptable)", f"{s['fp32_onnx']:,}"],
                                         ["model_int8.onnx (adaptable, QDQ)", f"{s['int8_onnx']:,}"],
                                         ["folded fp32 export (reference)", f"{s['folded_fp32_onnx']:,}"],
                                         ["whole bundle directory", f"{s['bundle_total']:,}"]])
    bn_left = r["folded_export"]["batchnorm_nodes_in_file"]
    folded_note = ("the exporter already folded BatchNorm into the convolutions: no BatchNormalization node in the "
                   "file" if bn_left == 0 else f"{bn_left} BatchNormalization nodes in the file, folded by "
                   "onnxruntime's optimiser at load")
    checks = ", ".join(f"{k.split('_vs_')[0]} {v:.1e}" for k, v in r["output_checks"].items())
    return "\n\n".join([
        f"Model: {r['model']}. onnxruntime with 1 intra-op and 1 inter-op thread; median per-batch latency over "
        f"{r['rounds']} interleaved rounds. `raw` is a bare onnxruntime session on the adaptable graph with the "
        "wrapper's feeds at α = 0; `source` is `AdaptableModel.forward(x, alpha=0)`; `alpha_bn` is the α-BN TTA "
        f"method; `folded` is the same torch model exported plainly ({folded_note}).",
        lat, "Ratios of medians:", rat, "Bundle files:", sizes,
        f"Max |logit difference| between the adaptable models at α = 0 and the folded export: {checks}.",
        " ".join(_interpretation(r)),
    ])
