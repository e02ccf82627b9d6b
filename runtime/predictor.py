"""Plain prediction with any bundle model: folded, foreign, or adaptable run at α = 0 with its initial parameters.

What the caller feeds is exactly what the manifest's ``input`` block says, nothing converted silently:

* ``shape``: ``(N, *input.shape[1:])`` in ``input.layout``, e.g. ``(N, 1, 28, 28)`` for an NCHW MNIST model,
  ``(N, 32, 32, 3)`` for the NHWC MLPerf Tiny ResNet-8;
* ``dtype``: ``input.dtype``; a ``float32`` input accepts any floating array (cast to float32), a ``uint8``
  or ``int8`` input only arrays of exactly that dtype. A model whose input tensor is quantized while the
  manifest declares real values (the ResNet-8 int8 bundle: ``uint8`` pixels into an int8 tensor with scale 1
  and zero point -128) gets them quantized by the session with the tensor's own parameters;
* values: within ``input.value_range`` — e.g. [0, 1] for this project's bundles (normalisation is in the
  graph), raw 0–255 for the ONNX Model Zoo MNIST and ResNet-8 bundles. Out-of-range values are refused.

``predict`` returns the model's scores as float32 (``outputs.kind``: ``logits`` or ``probabilities``,
quantized outputs dequantized), ``probs`` (softmax of logits; for probabilities the scores clipped at 0 and
renormalised per row, as dequantized int8 probabilities do not sum to exactly 1) and the penultimate
features when the model has them. Never imports torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from runtime.bundle import Bundle
from runtime.errors import BundleError, InputError
from runtime.model import check_range, softmax


@dataclass(frozen=True)
class PredictResult:
    """Scores (logits or probabilities, per ``kind``), class probabilities, and features or None."""

    scores: np.ndarray
    probs: np.ndarray
    features: np.ndarray | None
    kind: str

    @property
    def predictions(self) -> np.ndarray:
        """Top-1 class index per sample."""
        return self.probs.argmax(axis=1)


def probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    """Row-wise class probabilities (float64) of ``scores`` of ``kind`` (logits | probabilities)."""
    if kind == "logits":
        return softmax(scores)
    p = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
    sums = p.sum(axis=1, keepdims=True)
    uniform = np.full_like(p, 1.0 / max(p.shape[1], 1))
    return np.where(sums > 0, p / np.where(sums > 0, sums, 1.0), uniform)


def _static_batch(value: object, bundle: Bundle) -> int | None:
    """A model entry's ``static_batch`` (the batch a not batch-resizable model runs at): None, or a positive int
    that agrees with the session's own static batch when it has one; :class:`BundleError` otherwise."""
    if value is None:
        return None
    session_batch = getattr(bundle.session, "static_batch", None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (
            session_batch is not None and value != session_batch):
        raise BundleError(f"model {bundle.model.name!r}: static_batch {value!r} must be a positive int"
                          + (f" equal to the model's own batch {session_batch}" if session_batch else ""))
    return value


class Predictor:
    """Prediction over a loaded bundle's model (see the module docstring for what to feed).

    ``max_batch`` splits larger inputs into chunks (None: one run); a model recorded as not batch-resizable
    (``"batch_resizable": false`` with ``"static_batch": B`` in its manifest entry) always runs in chunks of
    B, the last one padded by repeating its final sample.
    """

    def __init__(self, bundle: Bundle, *, max_batch: int | None = None) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.spec = self.manifest.input
        raw_input = self.manifest.raw.get("input", {})
        self.layout = str(raw_input.get("layout", "NCHW"))
        self.kind = self.manifest.output_kind
        entry = self._raw_entry()
        static = entry.get("static_batch")
        self.static_batch = _static_batch(static, bundle) if entry.get("batch_resizable") is False else None
        self.max_batch = self.static_batch or max_batch
        self._extra = self._fixed_feeds()
        self._lock = threading.Lock()

    def _raw_entry(self) -> dict:
        for entry in self.manifest.raw.get("models", []):
            if entry.get("name") == self.bundle.model.name:
                return dict(entry)
        return {}

    def _fixed_feeds(self) -> dict[str, np.ndarray]:
        if self.bundle.model.graph != "adaptable":
            return {}
        feeds = {self.manifest.alpha_input: np.asarray(0.0, dtype=np.float32)}
        feeds.update({k: v.copy() for k, v in self.manifest.initial_params.items()})
        return feeds

    @property
    def labels(self) -> tuple[str, ...]:
        """Class labels, in score order."""
        return self.manifest.labels

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Validate ``x`` against the manifest's input spec; return it contiguous in the spec's dtype."""
        arr = np.asarray(x)
        expected = self.spec.shape[1:]
        if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected or arr.shape[0] == 0:
            raise InputError(f"input has shape {arr.shape}, the model takes (N, {', '.join(map(str, expected))}) "
                             f"{self.layout} with N >= 1")
        want = np.dtype(self.spec.dtype)
        if want.kind == "f":
            if arr.dtype.kind != "f":
                raise InputError(f"input is {arr.dtype}; the model takes floating values in {self.spec.value_range} "
                                 f"(cast with x.astype(np.float32))")
            arr = arr.astype(np.float32, copy=False)
            if not np.all(np.isfinite(arr)):
                raise InputError("input holds NaN or inf")
        elif arr.dtype != want:
            raise InputError(f"input is {arr.dtype}; the model takes {want} values in {self.spec.value_range}")
        check_range(arr, self.spec.value_range)
        return np.ascontiguousarray(arr)

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        n = len(x)
        if self.static_batch is not None and n % self.static_batch:
            pad = self.static_batch - n % self.static_batch
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        out = self.bundle.session.run({self.spec.name: x, **self._extra})
        features_name = self.manifest.features_output
        features = out.get(features_name) if features_name else None
        scores = np.asarray(out[self.manifest.logits_output], dtype=np.float32)[:n]
        return scores, None if features is None else np.asarray(features, dtype=np.float32)[:n]

    def predict(self, x: np.ndarray) -> PredictResult:
        """Scores, probabilities and features (or None) of the batch ``x`` (see the module docstring)."""
        arr = self.check_input(x)
        step = self.max_batch or len(arr)
        with self._lock:
            parts = [self._run(arr[i : i + step]) for i in range(0, len(arr), step)]
        scores = np.concatenate([p[0] for p in parts])
        features = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])  # type: ignore[misc]
        if scores.ndim != 2 or scores.shape[1] != len(self.labels):
            raise BundleError(f"model output {self.manifest.logits_output!r} has shape {scores.shape}, expected "
                             f"(N, {len(self.labels)})")
        return PredictResult(scores=scores, probs=probabilities(scores, self.kind), features=features, kind=self.kind)
