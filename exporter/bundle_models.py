"""The model files of a bundle: every requested format × graph × precision, with parity against torch.

Each variant is written into the bundle's build directory and described by a manifest ``models`` entry:
``onnx`` adaptable fp32 (``fp32``, always: the source of the statistics and of int8) and int8 (``int8``);
``onnx`` folded fp32/int8 (``folded_fp32``, ``folded_int8``); ``tflite`` adaptable fp32 (``tflite_fp32``),
folded fp32 (``tflite_folded_fp32``) and folded int8 (``tflite_folded_int8``: PT2E static or dynamic range).
Every entry carries ``parity``: the largest logit difference from torch and the top-1 agreement with torch on
held-out inputs, measured by the runtime that will run the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.onnx_export import export_adaptable_onnx, make_feeds, params_numpy, torch_reference
from exporter.onnx_fold import export_folded_onnx, torch_eval_outputs
from exporter.quantize import FOLDED_OP_TYPES, OP_TYPES, Int8Config, quantize_int8
from runtime.session import Session, open_session

logger = logging.getLogger(__name__)

PARITY_ALPHA = 0.0
# convolutions on fewer input channels stay float in int8 models (the 1-3 channel image stem): onnxruntime's
# QLinearConv measured 8x slower than the float convolution there
FLOAT_STEM_CHANNELS = 8
TFLITE_INT8_MODES = ("static", "dynamic")  # PT2E static or dynamic-range quantization of the folded TFLite graph


@dataclass(frozen=True)
class BuildOptions:
    """What to build: formats, the folded form, int8, and the TFLite int8 mode."""

    formats: tuple[str, ...] = ("onnx",)
    folded: bool = False
    int8: bool = True
    int8_config: Int8Config | None = None
    tflite_int8: str = "static"

    def __post_init__(self) -> None:
        if self.tflite_int8 not in TFLITE_INT8_MODES:
            raise ValueError(f"tflite_int8 must be one of {TFLITE_INT8_MODES}, got {self.tflite_int8!r}")


@dataclass
class BuiltModel:
    """One model file and its manifest entry."""

    entry: dict[str, Any]
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def session_for(entry: Mapping[str, Any], path: Path, **kwargs: Any) -> Session:
    """A runtime session on ``path`` for a manifest model entry (``kwargs``: LiteRT session options)."""
    if entry["format"] == "tflite":
        from runtime.litert import LiteRTSession

        return LiteRTSession(path, 1, entry.get("io_names"), **kwargs)
    disabled = (entry.get("session_options") or {}).get("disabled_optimizers", ())
    return open_session(path, backend="onnx", threads=1, io_names=entry.get("io_names"), disabled_optimizers=disabled)


def feeds_for(entry: Mapping[str, Any], x: np.ndarray, params: Mapping[str, np.ndarray], alpha: float
              ) -> dict[str, np.ndarray]:
    """Graph feeds for a model entry: adaptable graphs take α and the parameters, folded graphs only ``input``."""
    if entry["graph"] == "adaptable":
        return make_feeds(x, params, alpha)
    return {"input": np.ascontiguousarray(x, dtype=np.float32)}


def measure_parity(model: nn.Module, built: BuiltModel, x: np.ndarray) -> dict[str, Any]:
    """Largest |logits − torch| and top-1 agreement with torch of the file, run by its runtime, on ``x``."""
    params = params_numpy(model)
    if built.entry["graph"] == "adaptable":
        ref = torch_reference(model, x, params, PARITY_ALPHA)["logits"]
    else:
        ref = torch_eval_outputs(model, x)["logits"]
    got = session_for(built.entry, built.path).run(feeds_for(built.entry, x, params, PARITY_ALPHA))["logits"]
    return {
        "max_abs_diff": float(np.abs(got.astype(np.float64) - ref).max()),
        "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        "samples": len(x),
    }


def _onnx_models(model: nn.Module, tmp: Path, data: Mapping[str, np.ndarray], opts: BuildOptions) -> list[BuiltModel]:
    golden_x, params = data["golden_x"], params_numpy(model)
    example = torch.from_numpy(golden_x)
    fp32 = tmp / "model_fp32.onnx"
    export_adaptable_onnx(model, fp32, example, parity_x=data["parity_x"])
    built = [BuiltModel({"name": "fp32", "file": fp32.name, "format": "onnx", "precision": "fp32",
                         "graph": "adaptable"}, fp32)]
    if opts.folded:
        folded = tmp / "model_folded_fp32.onnx"
        export_folded_onnx(model, folded, example, parity_x=data["parity_x"])
        built.append(BuiltModel({"name": "folded_fp32", "file": folded.name, "format": "onnx", "precision": "fp32",
                                 "graph": "folded"}, folded))
    if opts.int8:
        for src in list(built):
            name = src.entry["name"].replace("fp32", "int8")
            dst = tmp / src.path.name.replace("fp32", "int8")
            adaptable = src.entry["graph"] == "adaptable"
            config = opts.int8_config or Int8Config(
                float_convs_below_channels=FLOAT_STEM_CHANNELS, op_types=OP_TYPES if adaptable else FOLDED_OP_TYPES)
            report = quantize_int8(src.path, dst, data["calibration_x"], params if adaptable else {}, config,
                                   eval_x=golden_x)
            entry = {**src.entry, "name": name, "file": dst.name, "precision": "int8",
                     "quantization": report.manifest_block()}
            if report.session_options():
                entry["session_options"] = report.session_options()
            built.append(BuiltModel(entry, dst))
    return built


def _tflite_models(model: nn.Module, tmp: Path, data: Mapping[str, np.ndarray], opts: BuildOptions
                   ) -> list[BuiltModel]:
    from exporter.tflite_export import export_tflite

    example = torch.from_numpy(data["golden_x"][:1])
    plan: list[tuple[str, str, str | None]] = [("tflite_fp32", "adaptable", None)]
    if opts.folded:
        plan.append(("tflite_folded_fp32", "folded", None))
        if opts.int8:
            plan.append(("tflite_folded_int8", "folded", f"int8_{opts.tflite_int8}"))
    built = []
    for name, form, quant in plan:
        path = tmp / f"model_{name.removeprefix('tflite_')}.tflite"
        report = export_tflite(model, path, form=form, example=example, quantization=quant,
                               calibration_x=data["calibration_x"] if quant else None, parity_x=data["parity_x"])
        built.append(BuiltModel(report.manifest_entry(name=name, file=path.name), path))
    return built


def build_models(model: nn.Module, tmp: Path, data: Mapping[str, np.ndarray], opts: BuildOptions) -> list[BuiltModel]:
    """Write every requested model file into ``tmp``; return them with entries that record their parity."""
    unknown = set(opts.formats) - {"onnx", "tflite"}
    if unknown or "onnx" not in opts.formats:
        raise ValueError(f"formats must include onnx (the adaptable source) and only onnx/tflite, got {opts.formats}")
    built = _onnx_models(model, tmp, data, opts)
    if "tflite" in opts.formats:
        built += _tflite_models(model, tmp, data, opts)
    for b in built:
        b.entry["parity"] = measure_parity(model, b, data["parity_x"])
        logger.info("%s: parity %s", b.entry["name"], b.entry["parity"])
    return built
