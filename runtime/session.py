"""One inference-session interface over the device backends: onnxruntime (``onnx``) and LiteRT (``tflite``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from runtime.errors import BackendUnavailableError, InputError, ModelLoadError

log = logging.getLogger(__name__)


@runtime_checkable
class Session(Protocol):
    """numpy in, numpy out: ``run`` takes every graph input by name and returns every output by name."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once."""
        ...


# onnxruntime's memory pattern (``SessionOptions.enable_mem_pattern``, on by default) traces the first run
# at each input shape and then pre-allocates one block for all of that shape's intermediates, kept per shape
# (a bundle's self-test batch and the stream's batch are two). Off, intermediates come from the arena
# tensor by tensor with reuse. Measured (one thread, batch 64, peak resident memory of a process that loads a
# bundle and runs it; median ms per batch unchanged within noise): CIFAR ResNet-8 folded 96.0 -> 86.2 MiB
# (8.4 -> 8.4 ms), adaptable 114.3 -> 95.4 MiB (12.1 -> 11.7 ms); MNIST SmallCNN folded 80.3 -> 76.1 MiB,
# adaptable 90.3 -> 81.8 MiB (0.75 / 1.1 ms both ways). Disabling the arena instead, or also, raised the peak
# or the time; an arena that extends by the requested size (kSameAsRequested) saved a further 1-2 MiB only
# through a process-wide allocator. Applied to every onnxruntime session this module opens, folded and
# adaptable alike.
MEM_PATTERN = False
# onnxruntime input types (``NodeArg.type``) and the numpy dtype a feed of that type must have
ORT_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64),
              "tensor(uint8)": np.dtype(np.uint8), "tensor(int8)": np.dtype(np.int8),
              "tensor(int32)": np.dtype(np.int32), "tensor(int64)": np.dtype(np.int64)}


class OrtSession:
    """An onnxruntime CPU session with an explicit thread count and checked feeds.

    Every session runs without onnxruntime's memory pattern (:data:`MEM_PATTERN`): lower peak memory at the
    same speed.
    """

    def __init__(
        self, path: Path | bytes, threads: int | None = None, disabled_optimizers: Sequence[str] = ()
    ) -> None:
        """Open an ONNX file, or a model given as bytes (e.g. decoded from a packed bundle file).

        ``disabled_optimizers`` names onnxruntime graph transformers to skip (a bundle model entry's
        ``session_options``: the exporter records the ones it measured as harmful for that model).
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a base dependency
            raise BackendUnavailableError("onnxruntime is not installed") from exc
        opts = ort.SessionOptions()
        opts.enable_mem_pattern = MEM_PATTERN
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            model = path if isinstance(path, bytes) else str(path)
            self._sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"],
                                              disabled_optimizers=list(disabled_optimizers) or None)
        except Exception as exc:
            what = f"a {len(path)}-byte model" if isinstance(path, bytes) else path
            raise ModelLoadError(f"onnxruntime cannot load {what}: {exc}") from exc
        self.options = self._sess.get_session_options()
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self._ranks = {i.name: len(i.shape) for i in self._sess.get_inputs()}
        self._dtypes = {i.name: ORT_DTYPES.get(i.type) for i in self._sess.get_inputs()}
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        self._invalid_argument = InvalidArgument

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with ``feeds`` (exactly the graph's inputs, each of the graph's rank and dtype); return every
        output."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self._ranks]
        if missing or extra:
            raise InputError(f"graph inputs missing {missing}, unknown {extra}")
        for name, arr in feeds.items():
            if np.ndim(arr) != self._ranks[name]:
                raise InputError(f"input {name!r} has rank {np.ndim(arr)}, graph expects {self._ranks[name]}")
            want = self._dtypes[name]
            if want is not None and np.asarray(arr).dtype != want:
                raise InputError(f"input {name!r} is {np.asarray(arr).dtype}, graph expects {want}")
        return self.run_checked(feeds)

    def run_checked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`run` for feeds the caller has already checked (every graph input, each a float32 array of
        the graph's rank, e.g. :class:`runtime.model.AdaptableModel`'s): no name or rank checks, which cost
        about a microsecond per input on every call. A feed onnxruntime still refuses (a dimension the graph
        fixes) raises :class:`InputError` with onnxruntime's reason."""
        try:
            outs = self._sess.run(self.output_names, feeds if isinstance(feeds, dict) else dict(feeds))
        except self._invalid_argument as exc:
            raise InputError(f"onnxruntime refuses the feeds: {exc}") from exc
        return dict(zip(self.output_names, outs, strict=True))


def _litert_session(path: Path | bytes, threads: int | None = None, io_names: Mapping | None = None) -> Session:
    from runtime.litert import LiteRTSession  # lazy: ai-edge-litert is the optional `litert` extra

    return LiteRTSession(path, threads, io_names)


BACKENDS: dict[str, Callable[..., Session]] = {"onnx": OrtSession, "tflite": _litert_session}
AUTO = "auto"
EXTENSIONS = {".onnx": "onnx", ".tflite": "tflite"}


def backend_for(path: Path | str) -> str:
    """The backend that runs ``path``, from its extension (``.onnx`` → onnx, ``.tflite`` → tflite)."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise ModelLoadError(f"cannot tell the backend of {path}: known extensions {sorted(EXTENSIONS)}")
    return EXTENSIONS[suffix]


def open_session(
    path: Path | bytes, backend: str = "onnx", threads: int | None = None, *, io_names: Mapping | None = None,
    disabled_optimizers: Sequence[str] = (),
) -> Session:
    """Open ``path`` (a file, or a model's bytes with an explicit backend) with the named backend (``"auto"``:
    chosen by :func:`backend_for` from the extension).

    ``io_names`` (``{"inputs": {logical: tflite_name}, "outputs": {...}}``, a manifest model entry's field)
    maps logical tensor names for the tflite backend; without it the model's own metadata is used. The
    onnx backend uses ONNX names as they are: it accepts only an identity mapping. ``disabled_optimizers``
    applies to the onnx backend only (see :class:`OrtSession`).
    """
    if backend == AUTO:
        if isinstance(path, bytes):
            raise BackendUnavailableError("a model given as bytes needs an explicit backend, not 'auto'")
        backend = backend_for(path)
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {backend!r}; available: {sorted(BACKENDS)} or {AUTO!r}")
    if backend == "onnx" and not isinstance(path, bytes) and Path(path).suffix.lower() == ".tflite":
        raise BackendUnavailableError(f"{path} is a TFLite model: open it with backend 'tflite' or 'auto'")
    if backend == "tflite":
        return BACKENDS[backend](path, threads, io_names)
    renamed = {k: v for side in (io_names or {}).values() for k, v in dict(side).items() if k != v}
    if renamed:
        raise BackendUnavailableError(f"backend {backend!r} cannot rename tensors, got io_names {renamed}")
    return BACKENDS[backend](path, threads, disabled_optimizers)
