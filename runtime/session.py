"""One inference-session interface over the device backends (onnxruntime now; LiteRT joins it later)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from runtime.errors import BackendUnavailableError, InputError

log = logging.getLogger(__name__)


@runtime_checkable
class Session(Protocol):
    """numpy in, numpy out: ``run`` takes every graph input by name and returns every output by name."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once."""
        ...


class OrtSession:
    """An onnxruntime CPU session with an explicit thread count and checked feeds."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a base dependency
            raise BackendUnavailableError("onnxruntime is not installed") from exc
        opts = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendUnavailableError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self._ranks = {i.name: len(i.shape) for i in self._sess.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with ``feeds`` (exactly the graph's inputs); return every output."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self._ranks]
        if missing or extra:
            raise InputError(f"graph inputs missing {missing}, unknown {extra}")
        for name, arr in feeds.items():
            if np.ndim(arr) != self._ranks[name]:
                raise InputError(f"input {name!r} has rank {np.ndim(arr)}, graph expects {self._ranks[name]}")
        outs = self._sess.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outs, strict=True))


BACKENDS = {"onnx": OrtSession}


def open_session(path: Path, backend: str = "onnx", threads: int | None = None) -> Session:
    """Open ``path`` with the named backend."""
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {backend!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[backend](path, threads)
