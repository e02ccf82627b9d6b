"""Find the weight initializers of an ONNX graph and verify their N:M pattern after export.

Weights are the initializers read as ``Conv`` input W, ``Gemm`` input B or a 2-D ``MatMul`` input B,
directly or through one ``DequantizeLinear`` (QDQ int8 models keep int8 weight initializers with separate
scale/zero-point tensors; a symmetric int8 weight maps 0 to 0, so zeros survive quantization). Their input
dimension gives the grouping axis of :mod:`exporter.compress.nm`: ``Conv`` and ``Gemm(transB=1)`` weights
group along rows (axis 1), ``MatMul`` and ``Gemm(transB=0)`` along columns (axis 0).

Exporters that fold BatchNorm into the convolution scale each output channel's weights by one factor, which
keeps zeros zero (possibly as ``-0.0``, which counts as zero here), so the pattern survives a folded graph too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from exporter.compress.base import CompressionError
from exporter.compress.nm import check_nm, check_pattern, sparsity


class NMPatternError(CompressionError):
    """Fewer exported weights satisfy the N:M pattern than the compression pass sparsified."""


@dataclass(frozen=True)
class WeightInit:
    """A weight initializer: its name, the consuming op and the N:M grouping axis of its 2-D view."""

    name: str
    op: str
    axis: int


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _weight_axis(node: onnx.NodeProto, position: int, rank: int) -> int | None:
    if node.op_type == "Conv" and position == 1:
        return 1
    if node.op_type == "Gemm" and position == 1:
        return 1 if _attr(node, "transB", 0) else 0
    if node.op_type == "MatMul" and position == 1 and rank == 2:
        return 0
    return None


def weight_initializers(model: onnx.ModelProto) -> list[WeightInit]:
    """Every weight initializer of the main graph (see the module docstring), in initializer order.

    An initializer consumed as a weight by nodes that disagree on its axis is left out.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for pos, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, pos))
    found: dict[str, set[tuple[str, int]]] = {}
    for name, init in inits.items():
        uses = consumers.get(name, [])
        direct = [(n, p) for n, p in uses if n.op_type != "DequantizeLinear"]
        dqs = [n for n, p in uses if n.op_type == "DequantizeLinear" and p == 0]
        via_dq = [c for dq in dqs for c in consumers.get(dq.output[0], [])]
        for node, pos in direct + via_dq:
            axis = _weight_axis(node, pos, len(init.dims))
            if axis is not None and len(init.dims) >= 2:
                found.setdefault(name, set()).add((node.op_type, axis))
    return [WeightInit(name, *next(iter(kinds))) for name, kinds in found.items()
            if len({a for _, a in kinds}) == 1]


@dataclass(frozen=True)
class TensorNM:
    """N:M status of one exported weight."""

    name: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    axis: int
    satisfied: bool
    sparsity: float


@dataclass(frozen=True)
class OnnxNMReport:
    """N:M status of every weight initializer of an ONNX file."""

    file: str
    n: int
    m: int
    tensors: tuple[TensorNM, ...]

    @property
    def satisfied(self) -> list[str]:
        """Names of the weights that satisfy the pattern."""
        return [t.name for t in self.tensors if t.satisfied]

    def manifest_block(self) -> dict[str, Any]:
        """JSON-ready summary for a bundle manifest's model entry."""
        return {
            "pattern": f"{self.n}:{self.m}",
            "verified_tensors": {t.name: {"op": t.op, "shape": list(t.shape), "dtype": t.dtype,
                                          "sparsity": round(t.sparsity, 6)}
                                 for t in self.tensors if t.satisfied},
            "dense_tensors": [t.name for t in self.tensors if not t.satisfied],
        }


def check_onnx_nm(path: Path | str, n: int, m: int) -> OnnxNMReport:
    """Check every weight initializer of the ONNX file at ``path`` for the ``n:m`` pattern along its input
    dimension; return the per-tensor result (no error for dense tensors: see :func:`require_onnx_nm`)."""
    check_pattern(n, m)
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for w in weight_initializers(model):
        arr = numpy_helper.to_array(inits[w.name])
        out.append(TensorNM(w.name, w.op, tuple(arr.shape), str(arr.dtype), w.axis,
                            check_nm(arr, n, m, w.axis), sparsity(arr)))
    return OnnxNMReport(Path(path).name, n, m, tuple(out))


def require_onnx_nm(
    path: Path | str, n: int, m: int, minimum: int = 1, expected: Sequence[str] = ()
) -> OnnxNMReport:
    """Like :func:`check_onnx_nm`, but raise :class:`NMPatternError` when fewer than ``minimum`` weights satisfy
    ``n:m`` or when one of the ``expected`` initializer names (e.g. ``"model.features.3.weight"``) does not."""
    report = check_onnx_nm(path, n, m)
    ok = set(report.satisfied)
    missing = [name for name in expected if name not in ok]
    if missing:
        raise NMPatternError(f"{report.file}: weights {missing} do not satisfy {n}:{m} after export")
    if len(ok) < minimum:
        dense = [t.name for t in report.tensors if not t.satisfied]
        raise NMPatternError(f"{report.file}: only {len(ok)} weights satisfy {n}:{m}, expected at least {minimum} "
                             f"(dense: {dense})")
    return report

