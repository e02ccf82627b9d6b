"""The folded ONNX form: the eval-mode model with BatchNorm folded into the convolutions (fastest inference).

The export wraps the model so the graph returns ``logits`` and ``features`` (the penultimate features, like
the adaptable graph), traces it with the legacy exporter (opset 17, dynamic batch, constant folding, which
folds every ``BatchNorm2d`` into the preceding convolution), verifies that no ``BatchNormalization`` node
is left and compares the outputs with torch eval mode on held-out inputs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from exporter.onnx_export import (
    OPSET,
    PARITY_ATOL,
    PARITY_RTOL,
    ExportError,
    ExportParityError,
    ort_session,
    parity_inputs,
    prepare_export,
)

logger = logging.getLogger(__name__)

FOLDED_OUTPUTS = ("logits", "features")


@dataclass(frozen=True)
class FoldedParityReport:
    """Worst absolute difference per output and top-1 agreement of the logits against torch eval mode."""

    max_abs_diff: dict[str, float]
    top1_agreement: float
    samples: int


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class _FoldedGraph(nn.Module):
    """``forward(input) -> (logits, features)`` of a model exposing ``forward_features`` and ``classifier``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and penultimate features."""
        features = self.model.forward_features(x)  # type: ignore[operator]
        return self.model.classifier(features), features  # type: ignore[operator]


def torch_eval_outputs(model: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """``logits`` and ``features`` of ``model`` in eval mode on ``x`` (numpy in, numpy out)."""
    with _eval_mode(model), torch.no_grad():
        logits, features = _FoldedGraph(model)(torch.from_numpy(np.asarray(x, dtype=np.float32)))
    return {"logits": logits.numpy(), "features": features.numpy()}


def _check_folded(path: Path) -> None:
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    if "BatchNormalization" in ops:
        raise ExportError(f"{path}: {ops.count('BatchNormalization')} BatchNormalization node(s) were not folded")
    inputs, outputs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if inputs != ["input"] or outputs != list(FOLDED_OUTPUTS):
        raise ExportError(f"{path}: folded graph has inputs {inputs}, outputs {outputs}")
    for value in [proto.graph.input[0], *proto.graph.output]:
        if value.type.tensor_type.shape.dim[0].dim_param != "batch":
            raise ExportError(f"{path}: {value.name!r} has a static batch dimension")


def check_folded_parity(
    model: nn.Module, onnx_path: Path | str, x: np.ndarray, *, atol: float | None = None, rtol: float | None = None
) -> FoldedParityReport:
    """Compare the folded file with torch eval mode on ``x``; raise :class:`ExportParityError` beyond tolerance."""
    atol = PARITY_ATOL if atol is None else atol
    rtol = PARITY_RTOL if rtol is None else rtol
    sess = ort_session(onnx_path)
    got = dict(zip(FOLDED_OUTPUTS, sess.run(list(FOLDED_OUTPUTS), {"input": np.asarray(x, np.float32)}), strict=True))
    ref = torch_eval_outputs(model, x)
    worst: dict[str, float] = {}
    for name in FOLDED_OUTPUTS:
        diff = np.abs(got[name].astype(np.float64) - ref[name])
        worst[name] = float(diff.max())
        if np.any(diff > atol + rtol * np.abs(ref[name])):
            raise ExportParityError(
                f"{Path(onnx_path).name}: folded output {name!r} differs from torch eval mode by max |diff| "
                f"{worst[name]:.3e} (atol {atol:g}, rtol {rtol:g})"
            )
    agreement = float((got["logits"].argmax(1) == ref["logits"].argmax(1)).mean())
    return FoldedParityReport(worst, agreement, len(x))


def export_folded_onnx(
    model: nn.Module,
    path: Path | str,
    example: torch.Tensor,
    *,
    parity_x: np.ndarray | torch.Tensor | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> list[str]:
    """Export ``model`` in eval mode with BatchNorm folded to ``path``, verify it; return its output names.

    ``example`` is an (N, C, H, W) batch for tracing (the batch dimension is dynamic); ``parity_x`` (default
    ``example``) are held-out inputs compared with torch eval mode. Raises :class:`ExportError` when a
    ``BatchNormalization`` node survives and :class:`ExportParityError` when the outputs differ.
    """
    path = prepare_export(path, example)
    with _eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy.*")
        torch.onnx.export(
            _FoldedGraph(model), (example.float(),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=list(FOLDED_OUTPUTS), do_constant_folding=True,
            dynamic_axes={name: {0: "batch"} for name in ("input", *FOLDED_OUTPUTS)},
        )
    _check_folded(path)
    report = check_folded_parity(model, path, parity_inputs(example, parity_x), atol=atol, rtol=rtol)
    logger.info("exported folded %s: max |diff| %s, top-1 agreement %.4f", path.name,
                {k: f"{v:.2e}" for k, v in report.max_abs_diff.items()}, report.top1_agreement)
    return list(FOLDED_OUTPUTS)
