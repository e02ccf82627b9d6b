"""ONNX export of the adaptable graph (legacy TorchScript exporter, opset 17) with a parity check.

The exported graph takes ``input``, ``alpha`` and every ``bnK.weight|bias|mean|var`` as inputs and returns
``logits``, ``features`` and every ``bnK.batch_mean|batch_var`` (see :class:`exporter.adaptable.AdaptableGraph`).
It is built lean by default (:mod:`exporter.onnx_graph`: one marker per BatchNorm, expanded into a few
onnxruntime-friendly nodes); a model the lean builder cannot handle falls back to tracing
:class:`~exporter.adaptable.AdaptableGraph` as is. After export the file is checked with ``onnx.checker`` and
compared with the torch :func:`exporter.adaptable.functional_forward` on held-out inputs at α = 0, 0.5 and 1;
a mismatch raises :class:`ExportParityError`. The folded (eval-mode, BatchNorm folded) form is
:func:`exporter.onnx_fold.export_folded_onnx`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from exporter.adaptable import AdaptableGraph, functional_forward, source_params
from exporter.onnx_graph import OPSET, GraphBuildError, LeanOptions, build_lean_adaptable, stats_samples_of

logger = logging.getLogger(__name__)

PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4
PARITY_ALPHAS = (0.0, 0.5, 1.0)
BATCHED_OUTPUTS = ("logits", "features")


class ExportError(RuntimeError):
    """The exported ONNX graph is malformed or does not have the adaptable graph's interface."""


class ExportParityError(ExportError):
    """The exported ONNX graph disagrees with the torch forward beyond tolerance."""


@dataclass(frozen=True)
class ParityReport:
    """Worst absolute difference per output (over all alphas) and top-1 agreement of the logits."""

    max_abs_diff: dict[str, float]
    top1_agreement: float
    alphas: tuple[float, ...]
    samples: int


def params_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's source adaptable parameters as float32 numpy arrays, keyed by graph input name."""
    return {k: v.numpy().astype(np.float32) for k, v in source_params(model).items()}


def make_feeds(
    x: np.ndarray, params: Mapping[str, np.ndarray], alpha: float, input_name: str = "input"
) -> dict[str, np.ndarray]:
    """An onnxruntime feed dict: the input batch, the scalar ``alpha`` (shape ``[]``) and the parameters."""
    feeds = {input_name: np.ascontiguousarray(x, dtype=np.float32), "alpha": np.array(alpha, dtype=np.float32)}
    feeds.update({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()})
    return feeds


def ort_session(path: Path | str, optimize: bool = True, threads: int | None = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session on ``path`` (graph optimisations off when ``optimize`` is False).

    ``threads`` sets the intra-op thread count (None: onnxruntime's default); one thread is the default
    because the exporter runs small checks on shared CPUs, where spinning thread pools hurt.
    """
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _export_traced(graph: AdaptableGraph, path: Path, example: torch.Tensor) -> None:
    """The fallback: trace :class:`AdaptableGraph` itself (the α-mix as torch computes it, ~25 nodes per layer)."""
    params = [p.float() for p in source_params(graph.model).values()]
    args = (example.float(), torch.tensor(0.0), *params)
    dynamic = {name: {0: "batch"} for name in ("input", *BATCHED_OUTPUTS)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy.*")
        torch.onnx.export(
            graph,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=graph.input_names(),
            output_names=graph.output_names(),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )


def _check_graph(path: Path, graph: AdaptableGraph) -> None:
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != graph.input_names():
        raise ExportError(f"{path}: graph inputs {inputs} differ from {graph.input_names()}")
    if outputs != graph.output_names():
        raise ExportError(f"{path}: graph outputs {outputs} differ from {graph.output_names()}")
    for value in [proto.graph.input[0], *(o for o in proto.graph.output if o.name in BATCHED_OUTPUTS)]:
        dim0 = value.type.tensor_type.shape.dim[0]
        if dim0.dim_param != "batch":
            raise ExportError(f"{path}: {value.name!r} has a static batch dimension ({dim0.dim_value})")


def _build(graph: AdaptableGraph, path: Path, example: torch.Tensor, lean: bool | LeanOptions) -> str:
    """Write the adaptable graph to ``path``; return how it was built (``lean`` or ``traced``)."""
    if lean is not False:
        options = lean if isinstance(lean, LeanOptions) else LeanOptions()
        try:
            build_lean_adaptable(graph.model, path, example, options)
            return "lean"
        except GraphBuildError as exc:
            logger.warning("lean adaptable graph not possible for %s (%s); tracing the α-mix as is",
                           type(graph.model).__name__, exc)
    _export_traced(graph, path, example)
    return "traced"


def prepare_export(path: Path | str, example: torch.Tensor) -> Path:
    """Check that ``example`` is an (N, C, H, W) batch and create ``path``'s directory; return the path."""
    path = Path(path)
    if example.ndim != 4:
        raise ValueError(f"example must be a (N, C, H, W) tensor, got shape {tuple(example.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def parity_inputs(example: torch.Tensor, parity_x: np.ndarray | torch.Tensor | None) -> np.ndarray:
    """The held-out parity inputs as numpy: ``parity_x``, or the tracing ``example`` when none are given."""
    x = example if parity_x is None else parity_x
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def export_adaptable_onnx(
    model: nn.Module,
    path: Path | str,
    example: torch.Tensor,
    *,
    parity_x: np.ndarray | torch.Tensor | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    lean: bool | LeanOptions = True,
) -> list[str]:
    """Export ``model``'s adaptable graph to ``path`` and verify it; return the graph's output names.

    ``example`` is a (N, C, H, W) batch used for tracing (the batch dimension is dynamic); ``parity_x``
    (default: ``example``) are held-out inputs for the parity check at α = 0, 0.5 and 1, with tolerances
    ``atol``/``rtol`` (defaults :data:`PARITY_ATOL` / :data:`PARITY_RTOL`). ``lean`` selects the builder:
    True (default) or :class:`~exporter.onnx_graph.LeanOptions` for the lean graph (with the traced graph as
    fallback), False for the traced graph. Raises :class:`ExportParityError`.
    """
    path = prepare_export(path, example)
    graph = AdaptableGraph(model)
    how = _build(graph, path, example, lean)
    _check_graph(path, graph)
    report = check_parity(model, path, parity_inputs(example, parity_x), params_numpy(model), PARITY_ALPHAS,
                          atol=atol, rtol=rtol)
    logger.info(
        "exported %s (%s graph): max |diff| %s, top-1 agreement %.4f",
        path.name,
        how,
        {k: f"{v:.2e}" for k, v in report.max_abs_diff.items()},
        report.top1_agreement,
    )
    return graph.output_names()


def torch_reference(
    model: nn.Module, x: np.ndarray, params: Mapping[str, np.ndarray], alpha: float, stats_samples: int | None = None
) -> dict[str, np.ndarray]:
    """Outputs of :func:`functional_forward` (batch statistics of the first ``stats_samples`` samples when
    given), keyed by graph output name."""
    graph = AdaptableGraph(model)
    tparams = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in params.items()}
    with torch.no_grad():
        logits, features, stats = functional_forward(
            graph.model, torch.from_numpy(np.asarray(x, dtype=np.float32)), tparams, alpha, stats_samples
        )
    values = [logits, features, *stats]
    return {name: v.numpy() for name, v in zip(graph.output_names(), values, strict=True)}


def check_parity(
    model: nn.Module,
    onnx_path: Path | str,
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    alphas: Sequence[float] = PARITY_ALPHAS,
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> ParityReport:
    """Compare the ONNX file with the torch forward on ``x`` for each α; raise on any out-of-tolerance output.

    An output fails when ``|onnx - torch| > atol + rtol·|torch|`` anywhere; the error names the output,
    the α and the largest difference.
    """
    atol = PARITY_ATOL if atol is None else atol
    rtol = PARITY_RTOL if rtol is None else rtol
    sess = ort_session(onnx_path)
    samples = stats_samples_of(onnx.load(str(onnx_path)))  # a graph with statistics of its first k samples
    names = [o.name for o in sess.get_outputs()]
    worst: dict[str, float] = dict.fromkeys(names, 0.0)
    agree: list[float] = []
    for alpha in alphas:
        got = dict(zip(names, sess.run(names, make_feeds(x, params, alpha)), strict=True))
        ref = torch_reference(model, x, params, alpha, samples)
        for name in names:
            diff = np.abs(got[name].astype(np.float64) - ref[name])
            worst[name] = max(worst[name], float(diff.max()))
            excess = diff - (atol + rtol * np.abs(ref[name]))
            if np.any(excess > 0):
                raise ExportParityError(
                    f"{Path(onnx_path).name}: output {name!r} at alpha={alpha} differs from torch by "
                    f"max |diff| {float(diff.max()):.3e} (atol {atol:g}, rtol {rtol:g})"
                )
        agree.append(float((got["logits"].argmax(1) == ref["logits"].argmax(1)).mean()))
    return ParityReport(worst, float(np.mean(agree)), tuple(float(a) for a in alphas), len(x))
