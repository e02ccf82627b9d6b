"""Adaptable-parameter dictionaries: validation and a canonical digest, shared by device and server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np

from runtime.errors import InputError


def params_digest(params: Mapping[str, np.ndarray]) -> str:
    """Return the sha256 hex of a canonical encoding of ``params`` (sorted names, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name in sorted(params):
        arr = np.ascontiguousarray(params[name])
        h.update(name.encode("utf-8") + b"\0")
        h.update(arr.dtype.str.encode("ascii") + b"\0")
        h.update(",".join(str(d) for d in arr.shape).encode("ascii") + b"\0")
        h.update(arr.tobytes())
    return h.hexdigest()


def validate_params(
    params: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, partial: bool = True
) -> dict[str, np.ndarray]:
    """Check names, shapes and finiteness of ``params`` against ``expected`` shapes; return float32 copies.

    With ``partial`` a subset of the expected names is allowed; otherwise every name must be present.
    Raises :class:`InputError` naming the offending parameter.
    """
    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise InputError(f"unknown adaptable parameter(s) {unknown}; expected names from {sorted(expected)}")
    if not partial:
        missing = sorted(set(expected) - set(params))
        if missing:
            raise InputError(f"missing adaptable parameter(s) {missing}")
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu":
            raise InputError(f"parameter {name!r} has non-numeric dtype {arr.dtype}")
        arr = arr.astype(np.float32, copy=True)
        if tuple(arr.shape) != tuple(expected[name]):
            raise InputError(f"parameter {name!r} has shape {arr.shape}, expected {tuple(expected[name])}")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"parameter {name!r} contains NaN or infinite values")
        out[name] = arr
    return out


VARIANCE_REASON = "a variance is never negative (the normalisation would be NaN)"
"""Why a variance parameter (:attr:`runtime.manifest.Manifest.variance_params`) must be >= 0: the device refuses
a negative one (:class:`runtime.model.AdaptableModel`) and the server never publishes one (``server.updates``)."""


def check_nonnegative(params: Mapping[str, np.ndarray], names: Iterable[str], reason: str) -> None:
    """Raise :class:`InputError` naming the most negative value of the first parameter in ``names`` among
    ``params`` that has one (``<name>[<index>] = <value> is negative: <reason>``, with how many values are
    negative when more than one is); names ``params`` lacks are skipped; 0 is allowed."""
    for name in names:
        if name not in params:
            continue
        values = np.asarray(params[name]).ravel()
        negative = int(np.count_nonzero(values < 0))
        if negative:
            i = int(np.argmin(values))
            count = "" if negative == 1 else f" (the most negative of {negative} negative values)"
            raise InputError(f"{name}[{i}] = {float(values[i]):.4g} is negative{count}: {reason}")
