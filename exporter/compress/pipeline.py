"""Run compression passes in their fixed order: low-rank → N:M sparsity → (int8 at export time).

Order matters: factorizing a sparse weight would destroy its zeros, and quantization must see the final
weights (int8 keeps exact zeros: symmetric per-channel weight quantization maps 0 to 0). Int8 is not a torch
pass here: :func:`exporter.quantize.quantize_int8` quantizes the exported ONNX graph, so a pipeline ends with
an :class:`Int8AtExport` marker that :func:`compose` validates (it must come last) and records, and that the
exporter acts on after export.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from exporter.compress.base import CompressionPass
from exporter.compress.finetune import FineTuneConfig
from exporter.compress.finetune import fine_tune as run_fine_tune

if TYPE_CHECKING:
    from exporter.quantize import Int8Config

logger = logging.getLogger(__name__)

INT8_ORDER = 2


@dataclass(frozen=True)
class Int8AtExport:
    """Marks that int8 quantization (onnxruntime static QDQ) follows, applied by the exporter after export."""

    config: Int8Config | None = None
    name: str = "int8"
    order: int = INT8_ORDER

    def report(self) -> dict[str, Any]:
        """The pipeline entry: what will be applied, and where."""
        return {"pass": self.name, "applied": "by the exporter to the exported ONNX graph (static QDQ)"}


def check_order(passes: Sequence[CompressionPass | Int8AtExport]) -> None:
    """Raise ``ValueError`` unless the passes are in pipeline order (low-rank, sparsity, int8), each at most once."""
    orders = [p.order for p in passes]
    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        raise ValueError(f"each compression pass may appear once, got {names}")
    if orders != sorted(orders) or len(set(orders)) != len(orders):
        raise ValueError(f"compression passes must run in the order low_rank → nm_sparsity → int8, got {names}")
    fresh = [p.name for p in passes if isinstance(p, CompressionPass) and p.state != "new"]
    if fresh:
        raise ValueError(f"passes {fresh} were already used; create a new instance per model")


def compose(
    model: nn.Module,
    passes: Sequence[CompressionPass | Int8AtExport],
    train_data: tuple[np.ndarray, np.ndarray] | None = None,
    fine_tune: FineTuneConfig | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Apply ``passes`` to ``model`` (in place) in pipeline order; return ``(model, reports)``.

    Each torch pass is prepared, fine-tuned on ``train_data = (x, y)`` when ``fine_tune`` is given
    (both or neither), finalized and reported; an :class:`Int8AtExport` marker is only recorded. The model
    is returned in eval mode.
    """
    check_order(passes)
    if (train_data is None) != (fine_tune is None):
        raise ValueError("fine-tuning needs both train_data and a fine_tune config (or neither)")
    reports: list[dict[str, Any]] = []
    for p in passes:
        if isinstance(p, Int8AtExport):
            reports.append(p.report())
            continue
        model = p.prepare(model)
        if train_data is not None and fine_tune is not None:
            run_fine_tune(model, p, train_data[0], train_data[1], fine_tune)
        model = p.finalize(model).eval()
        reports.append(p.report())
        logger.info("compression pass %s done", p.name)
    return model.eval(), reports
