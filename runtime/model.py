"""The adaptable model on a device: current parameters plus one forward pass that returns statistics."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from runtime.bundle import Bundle
from runtime.errors import BundleError, InputError
from runtime.params import VARIANCE_REASON, check_nonnegative, validate_params


@dataclass(frozen=True)
class ForwardResult:
    """Outputs of one adaptable forward pass."""

    logits: np.ndarray
    features: np.ndarray
    batch_stats: dict[str, tuple[np.ndarray, np.ndarray]]


RANGE_SLACK = 1e-6
"""How far (as a share of the range's width) input values may leave ``input.value_range`` (float rounding)."""


def check_range(arr: np.ndarray, value_range: tuple[float, float]) -> None:
    """Raise :class:`InputError` when values of ``arr`` leave ``value_range`` by more than :data:`RANGE_SLACK`."""
    lo, hi = value_range
    slack = RANGE_SLACK * (hi - lo)
    if float(arr.min()) < lo - slack or float(arr.max()) > hi + slack:
        raise InputError(f"input values [{arr.min()}, {arr.max()}] leave the model's range [{lo}, {hi}]")


def check_batch(x: np.ndarray, sample_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Validate a non-empty, numeric, finite batch (of ``sample_shape`` samples when given); return float32.

    Raises :class:`InputError` naming the problem.
    """
    arr = np.asarray(x)
    if sample_shape is not None and (arr.ndim != len(sample_shape) + 1 or tuple(arr.shape[1:]) != sample_shape):
        raise InputError(f"input has shape {arr.shape}, expected (N, {', '.join(map(str, sample_shape))})")
    if arr.ndim < 2:
        raise InputError(f"input has shape {arr.shape}; expected a batch (N, ...)")
    if arr.shape[0] == 0:
        raise InputError("input batch is empty")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"input has non-numeric dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError("input contains NaN or infinite values")
    return arr


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable entropies."""
    z = np.array(logits, dtype=np.float64)  # a copy the steps below work in
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``probs``."""
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)


def _frozen(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params`` (float32 arrays nobody else holds, e.g. :func:`validate_params`' copies) made read-only: what
    :class:`AdaptableModel` keeps and shares without copies."""
    for arr in params.values():
        arr.flags.writeable = False
    return dict(params)


class AdaptableModel:
    """A bundle's adaptable graph with its current parameters (thread-safe parameter swaps)."""

    def __init__(self, bundle: Bundle) -> None:
        if bundle.model.graph != "adaptable":
            raise BundleError(
                f"model {bundle.model.name!r} of bundle {bundle.manifest.name!r} has a {bundle.model.graph} graph; "
                "adaptation needs an adaptable one"
            )
        self.bundle = bundle
        self.manifest = bundle.manifest
        self._shapes = self.manifest.param_shapes()
        self._nonnegative = tuple(sorted(set(bundle.model.nonnegative_params)))
        self._variances = self.manifest.variance_params
        self._masks: dict[tuple[str, ...], np.ndarray | None] = {}  # see _guard_mask
        self._params = _frozen({k: np.array(v, dtype=np.float32) for k, v in self.manifest.initial_params.items()})
        try:
            self._check_nonnegative(self._params)
        except InputError as exc:
            raise BundleError(f"bundle {self.manifest.name!r}: its initial parameters break its model: {exc}") from exc
        self._lock = threading.Lock()

    @property
    def params(self) -> dict[str, np.ndarray]:
        """A copy of the current adaptable parameters."""
        with self._lock:
            return {k: v.copy() for k, v in self._params.items()}

    @property
    def nonnegative_params(self) -> frozenset[str]:
        """The parameters this graph needs >= 0 (the model entry's ``nonnegative_params``; see
        :meth:`set_params`)."""
        return frozenset(self._nonnegative)

    @property
    def params_view(self) -> Mapping[str, np.ndarray]:
        """The current adaptable parameters without copies: a read-only mapping of read-only arrays (a
        consistent set: :meth:`set_params` replaces the set, it never writes into it)."""
        with self._lock:
            return MappingProxyType(self._params)

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.manifest.labels)

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Replace some or all parameters at once, after validating names, shapes, finiteness, the model's
        ``nonnegative_params`` and the layers' variances (``<layer>.var`` >= 0: a negative one makes every
        output NaN) (an ``InputError`` names the problem; nothing changes then)."""
        checked = validate_params(params, self._shapes)
        self._check_nonnegative(checked)
        with self._lock:
            self._params = {**self._params, **_frozen(checked)}

    def reset_params(self) -> None:
        """Return to the bundle's initial parameters."""
        self.set_params(self.manifest.initial_params)

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Validate a batch against the manifest's input spec (shape, finite values within ``value_range``, as
        :class:`~runtime.predictor.Predictor` checks); return it as contiguous float32."""
        arr = check_batch(x, self.manifest.input.shape[1:])
        check_range(arr, self.manifest.input.value_range)
        return arr

    def _overrides(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``params`` checked for one call: names, shapes, float32 and finiteness, like :func:`validate_params`
        but without copies (a call's feeds are not kept) and with one finiteness test over them all; any
        problem is reported by :func:`validate_params`, which names the parameter."""
        out: dict[str, np.ndarray] = {}
        for name, value in params.items():
            arr = np.asarray(value)
            if self._shapes.get(name) != arr.shape or arr.dtype.kind not in "fiu":
                return validate_params(params, self._shapes)  # raises, naming the parameter
            out[name] = np.ascontiguousarray(arr, dtype=np.float32)
        if not out:
            return out
        flat = np.concatenate([a.ravel() for a in out.values()])
        if not np.isfinite(flat).all():
            return validate_params(params, self._shapes)
        guarded = self._guard_mask(tuple(out))
        if guarded is not None and np.minimum.reduce(flat, where=guarded, initial=0.0) < 0:
            self._check_nonnegative(out)  # raises, naming the parameter and its value
        return out

    def _guard_mask(self, names: tuple[str, ...]) -> np.ndarray | None:
        """Which elements of ``names``' arrays laid end to end must be >= 0 (None: none); cached per name order,
        so a per-batch override costs one masked minimum for all layers."""
        cached = self._masks.get(names, False)
        if cached is not False:
            return cached
        guarded = set(self._variances) | set(self._nonnegative)
        full = np.concatenate([np.full(int(np.prod(self._shapes[n])), n in guarded) for n in names])
        mask = full if full.any() else None
        if len(self._masks) >= 64:  # callers use a handful of name orders; bound it anyway
            self._masks.clear()
        self._masks[names] = mask
        return mask

    def _check_nonnegative(self, params: Mapping[str, np.ndarray]) -> None:
        """Refuse a negative value of a parameter the graph needs ≥ 0, naming it and its most negative value:
        the layers' variances (:attr:`~runtime.manifest.Manifest.variance_params`; 0 is allowed) and the model
        entry's ``nonnegative_params`` (normalisation scales of layers the TFLite graph pools before scaling)."""
        check_nonnegative(params, self._variances, VARIANCE_REASON)
        if self._nonnegative:
            check_nonnegative(
                params, self._nonnegative,
                f"model {self.bundle.model.name!r} of bundle {self.manifest.name!r} max-pools before this scale, "
                "which is exact only for values >= 0 (manifest nonnegative_params); use another model of the "
                "bundle (e.g. the ONNX one) for negative scales",
            )

    def forward(
        self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None
    ) -> ForwardResult:
        """One pass with α-mixed normalisation; ``params`` overrides some current parameters for this call."""
        return self._run(self.check_input(x), alpha, params)

    def forward_validated(
        self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None
    ) -> ForwardResult:
        """:meth:`forward` for a batch ``x`` that :meth:`check_input` returned (its checks are not repeated;
        α and ``params`` are checked as in :meth:`forward`). For callers that validate a batch once and run it
        several times, e.g. a TTA method's transaction."""
        return self._run(x, alpha, params)

    def _run(self, x: np.ndarray, alpha: float, params: Mapping[str, np.ndarray] | None) -> ForwardResult:
        try:
            value = float("nan") if isinstance(alpha, (str, bytes, bool)) else float(alpha)
        except (TypeError, ValueError):
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
        m = self.manifest
        with self._lock:
            feeds: dict[str, np.ndarray] = dict(self._params)  # arrays are replaced, never written: no copies
        if params:
            feeds.update(self._overrides(params))
        feeds[m.input.name] = x
        feeds[m.alpha_input] = np.asarray(value, dtype=np.float32)
        session = self.bundle.session
        run = getattr(session, "run_checked", session.run)  # every input is checked above
        out = run(feeds)
        stats = {layer.name: (out[layer.batch_mean], out[layer.batch_var]) for layer in m.layers}
        return ForwardResult(out[m.logits_output], out[m.features_output], stats)
