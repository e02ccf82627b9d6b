"""The bundle writer: adaptable ONNX models (fp32 and int8), golden vectors and ``manifest.json``.

A bundle is a directory laid out as in ``docs/CONTRACT.md`` (schema version 2). It is built in a temporary
directory beside the destination and renamed into place, so a reader never sees a half-written bundle.

What a device downloads is kept lean: the manifest holds what a device must know to pick, verify and run a
model; numeric blocks (the adaptable graph's initial parameters, the source statistics) are compressed binary
files (:mod:`runtime.blocks`) fetched only by a device that needs them (:meth:`runtime.manifest.Manifest.files_for`);
golden vectors are a compressed block per model; and what documents the export — parity against torch,
quantization and compression reports, the packed tensors — is in ``export_report.json``, listed with its sha256
(so signed) but fetched by no device (:func:`export_details` merges it back for tools).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from exporter.adaptable import AdaptableGraph, norm_layers
from exporter.bundle_dir import golden_file, install, out_path, prepare_out_dir
from exporter.bundle_models import BuildOptions, BuiltModel, build_models, feeds_for, session_for
from exporter.checkpoint import load_checkpoint
from exporter.compress.nm import check_pattern
from exporter.compress.onnx_nm import require_onnx_nm, weight_initializers
from exporter.models import ModelSpec
from exporter.onnx_export import ExportError, make_feeds, ort_session, params_numpy
from exporter.quantize import Int8Config
from exporter.signing import sign_bundle
from exporter.statistics import STATISTICS as STATISTICS  # re-exported: the file name and the helpers
from exporter.statistics import check_source_data, output_statistics, write_statistic_blocks
from exporter.statistics import class_gaussians as class_gaussians
from exporter.train import check_images
from runtime.blocks import encode_block, encode_image_u8
from runtime.bundle_info import merge_export_report
from runtime.checks import is_finite_number
from runtime.manifest import checked_invariances
from runtime.model import softmax
from runtime.signing import SIGNATURE_NAME

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ADAPTABLE_FILE = "adaptable_initial.bin"
REPORT_FILE = "export_report.json"
# model-entry fields that document the export rather than tell a device how to run the file: kept in the report
REPORT_ONLY = ("parity", "quantization")
PACKED_DEVICE_KEYS = ("file", "encoding", "n", "m", "compression", "unpacked_bytes")
FP32_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}
# int8 kernels differ between CPUs (VNNI or not, x86 or ARM, fused QLinearConv or float-emulated QDQ):
# a value landing on a rounding boundary moves by one quantization step. On the digits model the fused and
# the reference (unoptimised) paths differed by up to 1.3e-2 on ``features``; the tolerance is this floor
# or 4x the difference measured on the golden inputs, whichever is larger. An fp32 model run in place of the
# int8 one differs by ~0.1 on the logits and is still caught.
INT8_ATOL_FLOOR = 5e-2
INT8_RTOL = 1e-3
INT8_MARGIN = 4.0

ModelSource = Path | str | tuple[nn.Module, str, ModelSpec, str]


TRAINABLE_FILE = "trainable.bin"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_id(path: Path | str) -> str:
    """The bundle's id: sha256 hex of its ``manifest.json`` bytes (``path``: the bundle or the manifest)."""
    path = Path(path)
    manifest = path / MANIFEST if path.is_dir() else path
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST} at {path}")
    return sha256_file(manifest)


def _resolve_source(source: ModelSource) -> tuple[nn.Module, str, ModelSpec, str]:
    if isinstance(source, tuple):
        if len(source) != 4:
            raise ValueError(f"source must be a checkpoint path or (model, arch, spec, ckpt_sha), got {source!r}")
        model, arch, spec, sha = source
        return model.eval(), arch, spec, sha
    model, info = load_checkpoint(Path(source))
    return model, info["arch"], info["spec"], info["sha256"]


def check_finite_weights(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter or buffer of ``model`` holding NaN or infinite values
    (a bundle exported from it would carry non-finite outputs no device can verify)."""
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for tensor_name, tensor in tensors:
            if tensor.is_floating_point() and not bool(tensor.detach().isfinite().all()):
                raise ValueError(f"model {kind} {tensor_name!r} holds NaN or infinite values; "
                                 "a bundle needs finite weights")


def _check_inputs(spec: ModelSpec, labels: Sequence[str], **arrays: np.ndarray) -> dict[str, np.ndarray]:
    if isinstance(labels, str | bytes):  # a string is a sequence of one-character labels: never what is meant
        raise ValueError(f"labels must be a list of {spec.num_classes} strings, got the single string {labels!r}")
    if len(labels) != spec.num_classes or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"labels must be {spec.num_classes} strings, got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {list(labels)!r}")
    expected = (spec.in_channels, spec.image_size, spec.image_size)
    out = {}
    for name, arr in arrays.items():
        checked = check_images(arr, name)
        if checked.shape[1:] != expected:
            raise ValueError(f"{name} has sample shape {checked.shape[1:]}, the model expects {expected}")
        out[name] = checked
    return out


def _check_options(golden_alpha: float, nm: tuple[int, int] | None) -> None:
    """Refuse a ``golden_alpha`` outside [0, 1] (or a bool) and an ``nm`` that is not an ``(n, m)`` pattern."""
    if not is_finite_number(golden_alpha) or not 0.0 <= golden_alpha <= 1.0:
        raise ValueError(f"golden_alpha must lie in [0, 1], got {golden_alpha!r}")
    if nm is not None:
        if isinstance(nm, str) or not isinstance(nm, Sequence) or len(nm) != 2:
            raise ValueError(f"nm must be a pair (n, m) such as (2, 4), got {nm!r}")
        check_pattern(*nm)


def _run(path: Path, x: np.ndarray, params: dict[str, np.ndarray], alpha: float, optimize: bool = True
         ) -> dict[str, np.ndarray]:
    sess = ort_session(path, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, make_feeds(x, params, alpha)), strict=True))


def _kernel_variance(path: Path, x: np.ndarray, params: dict[str, np.ndarray], alpha: float) -> float:
    """Largest output difference between the optimised and the unoptimised onnxruntime graph."""
    fast, ref = _run(path, x, params, alpha), _run(path, x, params, alpha, optimize=False)
    return max(float(np.abs(fast[k] - ref[k]).max()) for k in fast)


def source_statistics(
    fp32_path: Path, model: nn.Module, source_x: np.ndarray, source_y: np.ndarray | None
) -> dict[str, Any]:
    """The source statistics: feature mean/var, entropy, accuracy and class-conditional Gaussians (the BN
    running statistics are the adaptable block's initial ``mean``/``var``, stored once).

    Feature and entropy statistics are computed with onnxruntime on ``fp32_path`` at α = 0 (what the device
    computes); ``accuracy`` is None when ``source_y`` is not given.
    """
    params = params_numpy(model)
    logits, features = [], []
    for i in range(0, len(source_x), 256):
        out = _run(fp32_path, source_x[i : i + 256], params, 0.0)
        logits.append(out["logits"])
        features.append(out["features"])
    probs = softmax(np.concatenate(logits))
    return output_statistics(probs, np.concatenate(features), source_y)


def _adaptable_block(model: nn.Module) -> dict[str, Any]:
    """The manifest's ``adaptable`` block: α input, eps and the layers (tensor names only where they differ
    from ``<layer>.<key>``); ``initial`` is filled in by :func:`_write_initial`."""
    layers = norm_layers(model)
    eps = {layer.eps for layer in layers}
    if len(eps) != 1:
        raise ExportError(f"the manifest holds one eps, but the BN layers use {sorted(eps)}")
    entries = []
    for layer in layers:
        names = {"weight": layer.param("weight"), "bias": layer.param("bias"), "mean": layer.param("mean"),
                 "var": layer.param("var"), "batch_mean": f"{layer.name}.batch_mean",
                 "batch_var": f"{layer.name}.batch_var"}
        entries.append({"name": layer.name, "channels": layer.channels,
                        **{k: v for k, v in names.items() if v != f"{layer.name}.{k}"}})
    return {"alpha_input": "alpha", "eps": eps.pop(), "layers": entries}


def _write_initial(tmp: Path, model: nn.Module) -> dict[str, str]:
    """The adaptable graph's initial parameters as a float32 block (fetched with adaptable models only)."""
    params = params_numpy(model)
    initial = {name: np.asarray(params[name], np.float32) for name in AdaptableGraph(model).param_names()}
    (tmp / ADAPTABLE_FILE).write_bytes(encode_block(initial))
    return {"file": ADAPTABLE_FILE}


def _golden_outputs(built: BuiltModel, x: np.ndarray, params: dict[str, np.ndarray], alpha: float,
                    **kwargs: Any) -> dict[str, np.ndarray]:
    return session_for(built.entry, built.path, **kwargs).run(feeds_for(built.entry, x, params, alpha))


def _tolerance(built: BuiltModel, x: np.ndarray, params: dict[str, np.ndarray], alpha: float,
               outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """fp32: fixed; int8: a floor or 4x the gap between two kernel choices of the same runtime, measured here.

    The second execution is onnxruntime without graph optimisations, or LiteRT's built-in kernels instead
    of XNNPACK: the two ends of what devices run.
    """
    if built.entry["precision"] == "fp32" and built.entry["format"] == "onnx":
        return dict(FP32_TOLERANCE)
    if built.entry["format"] == "onnx":
        other = _run_unoptimized(built, x, params, alpha)
    else:
        other = _golden_outputs(built, x, params, alpha, kernels="builtin")
    gap = max(float(np.abs(outputs[k].astype(np.float64) - other[k]).max()) for k in outputs)
    floor = INT8_ATOL_FLOOR if built.entry["precision"] != "fp32" else FP32_TOLERANCE["atol"]
    rtol = INT8_RTOL if built.entry["precision"] != "fp32" else FP32_TOLERANCE["rtol"]
    logger.info("%s: kernel variance on golden inputs %.2e", built.entry["name"], gap)
    return {"atol": max(floor, INT8_MARGIN * gap), "rtol": rtol}


def _run_unoptimized(built: BuiltModel, x: np.ndarray, params: dict[str, np.ndarray], alpha: float
                     ) -> dict[str, np.ndarray]:
    sess = ort_session(built.path, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds_for(built.entry, x, params, alpha)), strict=True))


def compact_floats(value: Any) -> Any:
    """Every float as the shortest decimal that restores the same float32 (what the device reads back):
    about half the JSON of a full float64 repr, with no change to any parameter the runtime uses."""
    if isinstance(value, float):
        return float(np.format_float_positional(np.float32(value), unique=True, trim="-")) if np.isfinite(value) \
            else value
    if isinstance(value, dict):
        return {k: compact_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [compact_floats(v) for v in value]
    return value


def quantize_golden(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Golden inputs snapped to k/255: stored as uint8 (4x smaller), restored exactly as float32 on a device."""
    q = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return q, q.astype(np.float32) / np.float32(255.0)


def _write_golden(tmp: Path, built: list[BuiltModel], golden_x: np.ndarray, params: dict[str, np.ndarray],
                  alpha: float) -> dict[str, dict[str, Any]]:
    """Write one compressed golden block per model (a device fetches only its model's), from the model's own
    runtime: the inputs exactly (uint8 images as their lossless prediction residual) and every output in
    float32; return per-model ``{file, atol, rtol}``. ``golden_x`` must already be on the k/255 grid."""
    q, x = quantize_golden(golden_x)
    if not np.array_equal(x, golden_x):
        raise ExportError("golden inputs must be snapped to k/255 first (quantize_golden)")
    stored: dict[str, np.ndarray] = {"input_denominator": np.asarray(255.0, np.float32)}
    if q.ndim == 4:
        stored["input_u8_residual"] = encode_image_u8(q)
    else:
        stored["input_u8"] = q
    tolerances: dict[str, dict[str, Any]] = {}
    for b in built:
        name = b.entry["name"]
        outputs = _golden_outputs(b, x, params, alpha)
        arrays = {**stored, **{f"{name}/{k}": np.asarray(v, np.float32) for k, v in outputs.items()}}
        (tmp / golden_file(name)).write_bytes(encode_block(arrays))
        tolerances[name] = {"file": golden_file(name), **_tolerance(b, x, params, alpha, outputs)}
    return tolerances


def _manifest(
    name: str, arch: str, spec: ModelSpec, ckpt_sha: str, labels: Sequence[str], model: nn.Module,
    invariances: tuple[str, ...] = (),
) -> dict[str, Any]:
    c, s = spec.in_channels, spec.image_size
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "arch": arch,
        "created_unix_ms": int(time.time() * 1000),
        "source_checkpoint_sha256": ckpt_sha,
        "input": {
            "name": "input", "shape": [-1, c, s, s], "dtype": "float32", "layout": "NCHW",
            "value_range": [0.0, 1.0],
            "normalization": {"mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std],
                              "in_graph": True},
            **({"invariances": list(invariances)} if invariances else {}),
        },
        "labels": list(labels),
        "outputs": {"logits": "logits", "features": "features"},
        "adaptable": _adaptable_block(model),
    }


def _split_entry(entry: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A built model's manifest entry (what a device needs to open and verify it) and its report entry (the
    rest: parity, quantization, packing details; a TFLite file's ``io_names`` when the file embeds them)."""
    device = {k: v for k, v in entry.items() if k not in REPORT_ONLY}
    report = {k: entry[k] for k in REPORT_ONLY if k in entry}
    packed = entry.get("packed")
    if packed:
        device["packed"] = {k: packed[k] for k in PACKED_DEVICE_KEYS if k in packed}
        report["packed"] = {k: v for k, v in packed.items() if k not in PACKED_DEVICE_KEYS or k == "file"}
    if entry["format"] == "tflite" and entry.get("io_names") is not None:
        from runtime.litert import read_io_names_metadata
        from runtime.packing import is_pack, unpack

        data = path.read_bytes()
        if read_io_names_metadata(unpack(data) if is_pack(data) else data) == entry["io_names"]:
            report["io_names"] = device.pop("io_names")
    return device, report


def compression_summary(compression: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``compression`` block: each pass's name and what it did per layer — N:M pattern and
    sparsity, low-rank rank of full rank — and whether the exported weights hold the pattern (the full pass
    reports and the per-tensor check are in the export report)."""
    out: dict[str, Any] = {"passes": [rep.get("pass") for rep in compression.get("passes", [])]}
    for rep in compression.get("passes", []):
        if rep.get("pass") == "nm_sparsity":
            out["nm_sparsity"] = {"pattern": rep.get("pattern"), "excluded": rep.get("excluded", []),
                                  "layers": {k: v.get("sparsity") for k, v in rep.get("layers", {}).items()}}
        elif rep.get("pass") == "low_rank":
            out["low_rank"] = {"layers": {k: [v.get("rank"), v.get("full_rank")]
                                          for k, v in rep.get("layers", {}).items()}}
        elif rep.get("pass") is not None:
            out[str(rep["pass"])] = {k: v for k, v in rep.items() if not isinstance(v, dict | list) and k != "pass"}
    check = compression.get("nm_check")
    if check:
        out["nm_check"] = {"pattern": check.get("pattern"), "verified_tensors": len(check.get("verified_tensors", {})),
                           "all_sparsified_layers_hold": check.get("all_sparsified_layers_hold")}
    return out


def export_details(bundle_dir: Path | str) -> dict[str, Any]:
    """The manifest of a bundle with its export report merged back (checked against the manifest's sha256):
    each model entry with its parity, quantization and full packing record, and the full ``compression``
    reports. For tools and benchmarks; a device never reads the report."""
    root = Path(bundle_dir)
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    ref = manifest.get("report")
    if not ref:
        return manifest
    path = root / ref["file"]
    if sha256_file(path) != manifest["files"].get(ref["file"]):
        raise ExportError(f"{path} does not match its sha256 in the manifest")
    return merge_export_report(manifest, json.loads(path.read_text(encoding="utf-8")))


def _pack(built: list[BuiltModel], nm: tuple[int, int]) -> None:
    """Replace each N:M-sparse ONNX or TFLite file by its packed transport encoding when that is smaller."""
    from exporter.packing import pack_model

    for b in built:
        dst = b.path.with_name(b.path.name + ".nmpack")
        report = pack_model(b.path, dst, nm[0], nm[1], compression="lzma")
        if not report.tensors_packed or report.bytes_after >= report.bytes_before:
            dst.unlink()
            continue
        b.entry["packed"] = {"file": dst.name, "encoding": "nm", "n": nm[0], "m": nm[1], "compression": "lzma",
                             "sha256_unpacked": sha256_file(b.path), "bytes": report.bytes_after,
                             "unpacked_bytes": report.bytes_before, "tensors_packed": report.tensors_packed}
        b.path.unlink()
        logger.info("%s packed: %d -> %d bytes", b.entry["file"], report.bytes_before, report.bytes_after)


def _build(tmp: Path, model: nn.Module, data: dict[str, np.ndarray], opts: dict[str, Any]) -> dict[str, Any]:
    """Write the model files, golden blocks, statistics blocks and the export report into ``tmp``; return the
    manifest's remaining blocks."""
    params = params_numpy(model)
    built = build_models(model, tmp, data, opts["build"])
    tolerances = _write_golden(tmp, built, data["golden_x"], params, opts["golden_alpha"])
    fp32 = next(b.path for b in built if b.entry["name"] == "fp32")
    stats = source_statistics(fp32, model, data["source_x"], opts["source_y"])
    blocks: dict[str, Any] = {
        "source_statistics": write_statistic_blocks(tmp, stats),
        "default_model": "fp32",
        "golden": {"alpha": float(opts["golden_alpha"]), "models": tolerances},
    }
    if opts["compression"] is not None:
        blocks["compression"] = dict(opts["compression"])
    if opts["nm"] is not None:
        nm_reports = [rep for rep in (opts["compression"] or {}).get("passes", []) if rep.get("pass") == "nm_sparsity"]
        sparsified = [layer for rep in nm_reports for layer in rep.get("layers", [])]
        # Weights keep their module path as name, except a bias-free Linear that exports as MatMul with a
        # generated name: name the ones that kept theirs and require at least one satisfied tensor per layer.
        names = {w.name for w in weight_initializers(onnx.load(str(fp32)))}
        expected = [f"model.{layer}.weight" for layer in sparsified if f"model.{layer}.weight" in names]
        # without an nm_sparsity report to say which layers were sparsified, at least one weight must hold it
        minimum = len(sparsified) if nm_reports else 1
        check = require_onnx_nm(fp32, *opts["nm"], minimum=minimum, expected=expected).manifest_block()
        blocks.setdefault("compression", {})["nm_check"] = {**check, "all_sparsified_layers_hold": True}
        if opts["pack"]:
            _pack(built, opts["nm"])
    report: dict[str, Any] = {"models": {}}
    blocks["models"] = []
    for b in built:
        shipped = b.path.with_name(b.entry["packed"]["file"]) if b.entry.get("packed") else b.path
        device, report["models"][b.entry["name"]] = _split_entry(b.entry, shipped)
        blocks["models"].append(device)
    if "compression" in blocks:
        report["compression"] = blocks["compression"]
        blocks["compression"] = compression_summary(blocks["compression"])
    (tmp / REPORT_FILE).write_text(json.dumps(compact_floats(report), separators=(",", ":")) + "\n", encoding="utf-8")
    blocks["report"] = {"file": REPORT_FILE}
    if opts.get("trainable"):
        from edgeloop.federated.weights import trainable_state
        from runtime.arrays import encode_arrays

        weights = trainable_state(model)
        (tmp / TRAINABLE_FILE).write_bytes(encode_arrays(weights))
        blocks["trainable"] = {"file": TRAINABLE_FILE, "architecture": opts["arch"],
                               "shapes": {k: list(v.shape) for k, v in weights.items()}}
    skip = (MANIFEST, SIGNATURE_NAME)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name not in skip}
    golden = blocks.pop("golden")
    return {**blocks, "files": files, "golden": golden}


def export_bundle(
    source: ModelSource,
    out_dir: Path | str,
    *,
    labels: Sequence[str],
    calibration_x: np.ndarray,
    golden_x: np.ndarray,
    source_x: np.ndarray,
    source_y: np.ndarray | None = None,
    int8: bool = True,
    name: str | None = None,
    golden_alpha: float = 0.5,
    int8_config: Int8Config | None = None,
    overwrite: bool = False,
    signing_key: Ed25519PrivateKey | None = None,
    formats: Sequence[str] = ("onnx",),
    folded: bool = False,
    tflite_int8: str = "static",
    parity_x: np.ndarray | None = None,
    compression: dict[str, Any] | None = None,
    nm: tuple[int, int] | None = None,
    pack: bool = True,
    trainable: bool = False,
    invariances: Sequence[str] = (),
) -> Path:
    """Write a signed bundle for ``source`` (a checkpoint path or ``(model, arch, spec, ckpt_sha256)``) to ``out_dir``.

    ``calibration_x`` calibrates int8; ``golden_x`` (a few held-out samples, e.g. 8) are the golden inputs and
    the export parity inputs; ``source_x``/``source_y`` give the source statistics and accuracy (at least 2
    different samples; with ``source_y``, one label per sample and a class with 2 different samples, so that
    the shared class covariance is not zero: :func:`exporter.statistics.check_source_data`). The bundle is
    built beside ``out_dir`` and renamed into place; an existing non-empty ``out_dir`` is refused unless
    ``overwrite``. ``formats`` (onnx always, tflite optionally) and ``folded`` choose the model files (see
    :mod:`exporter.bundle_models`); ``parity_x`` (default ``golden_x``) are the held-out inputs of the parity
    checks. ``compression`` (the passes' reports) is recorded; with ``nm`` the exported weights must hold the
    N:M pattern exactly (checked and recorded) and, with ``pack``, ONNX files ship in the packed N:M encoding.
    With ``trainable`` the bundle also carries the model's full float weights (``trainable.bin``, the
    manifest's ``trainable`` block) for devices that train locally and for full-model federated averaging.
    ``invariances`` (names from :data:`runtime.manifest.INVARIANCES`, e.g. ``("hflip",)`` for a model trained
    with random horizontal flips) are declared in the manifest's ``input`` block, where test-time methods read
    them (FOA's mirrored view); declare only what the training made true.
    ``manifest.sig`` is an Ed25519 signature over manifest.json by ``signing_key``; without one
    a throwaway key is used (integrity only: devices that trust specific keys will refuse the bundle).
    Returns the bundle path.
    """
    out_dir = out_path(out_dir)
    _check_options(golden_alpha, nm)
    model, arch, spec, ckpt_sha = _resolve_source(source)
    check_finite_weights(model)
    declared = checked_invariances(invariances)
    data = _check_inputs(spec, labels, calibration_x=calibration_x, golden_x=golden_x, source_x=source_x,
                         parity_x=golden_x if parity_x is None else parity_x)
    source_y = check_source_data(data["source_x"], source_y, spec.num_classes)
    data["golden_x"] = quantize_golden(data["golden_x"])[1]
    prepare_out_dir(out_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        build = BuildOptions(formats=tuple(formats), folded=folded, int8=int8, int8_config=int8_config,
                             tflite_int8=tflite_int8)
        opts = {"build": build, "golden_alpha": golden_alpha, "source_y": source_y, "compression": compression,
                "nm": nm, "pack": pack, "trainable": trainable, "arch": arch}
        manifest = _manifest(name or out_dir.name, arch, spec, ckpt_sha, labels, model, declared)
        manifest["adaptable"]["initial"] = _write_initial(tmp, model)
        manifest.update(_build(tmp, model, data, opts))
        (tmp / MANIFEST).write_text(json.dumps(compact_floats(manifest), separators=(",", ":")) + "\n",
                                    encoding="utf-8")
        if signing_key is None:
            logger.warning("no signing key given: %s is signed with a throwaway key", out_dir)
        sign_bundle(tmp, signing_key or Ed25519PrivateKey.generate())
        install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote bundle %s (%s, models %s)", out_dir, arch, [m["name"] for m in manifest["models"]])
    return out_dir
