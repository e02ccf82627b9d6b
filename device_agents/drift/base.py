"""The detector contract shared by every drift detector (River's, plus a vectorized path).

* hyperparameters only in ``__init__``, validated there (``ValueError`` naming the offending value);
* ``update(x) -> self`` feeds one observation; the read-only :attr:`DriftDetector.drift_detected` says whether
  it signalled a drift; the state is reset at the first update after a drift;
* ``update_many(batch) -> list[int]`` feeds observations in order and returns the positions (within the batch)
  where a drift was signalled — exactly what calling ``update`` on each would give, computed with numpy;
* non-finite input raises ``ValueError`` before any state changes.

Every detector exposes :attr:`statistic` (its test statistic after the last update) and :attr:`threshold` (the
value the statistic must exceed), so an agent can report both with a drift event.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import numpy as np


class DriftDetector(ABC):
    """Base class: owns the drift flag, the reset-after-drift rule and input validation."""

    _drift_detected: bool = False
    _statistic: float = 0.0

    def __init__(self) -> None:
        self.reset()

    @abstractmethod
    def _reset_state(self) -> None:
        """Forget everything seen (hyperparameters stay)."""

    def reset(self) -> None:
        """Forget the stream seen so far; the next update starts afresh."""
        self._drift_detected = False
        self._statistic = 0.0
        self._reset_state()

    @property
    def drift_detected(self) -> bool:
        """Whether the last update signalled a drift."""
        return self._drift_detected

    @property
    def statistic(self) -> float:
        """The test statistic after the last update (drift when it exceeds :attr:`threshold`)."""
        return self._statistic

    @property
    def threshold(self) -> float:
        """The value :attr:`statistic` must exceed for a drift."""
        return float(getattr(self, "_threshold", math.nan))

    @property
    @abstractmethod
    def n_seen(self) -> int:
        """Observations seen since the last reset."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict[str, Any]:
        """The hyperparameters, for ``repr``."""
        return {}

    def _consume(self, arr: np.ndarray) -> list[int]:
        """Feed validated observations (values or rows) through :meth:`_run` in order, resetting after each
        drift as ``update`` would; return the positions where a drift was signalled."""
        found: list[int] = []
        start = 0
        while start < len(arr):
            if self._drift_detected:
                self.reset()
            hit = self._run(arr[start:])
            if hit is None:
                break
            found.append(start + hit)
            start += hit + 1
        return found

    @abstractmethod
    def _run(self, x: np.ndarray) -> int | None:
        """Vectorized update over ``x`` until the first drift: its index (state left as after that update,
        drift flag set), or None with every value consumed."""


class ScalarDetector(DriftDetector):
    """A detector over a stream of numbers.

    Subclasses vectorize :meth:`_run_chunk` over at most ``chunk`` values (a class attribute bounding the
    temporary arrays); :meth:`_run` walks the batch chunk by chunk.
    """

    chunk: int = 4096

    def update(self, x: float) -> ScalarDetector:
        """Feed one value; a drift found on the previous call resets the state first. Returns ``self``."""
        value = float(x)
        if not math.isfinite(value):
            raise ValueError(f"{type(self).__name__}.update got a non-finite value {value}")
        if self._drift_detected:
            self.reset()
        self._update_one(value)
        return self

    def update_many(self, values: Iterable[float] | np.ndarray) -> list[int]:
        """Feed ``values`` in order; return the positions where a drift was signalled (vectorized)."""
        return self._consume(scalar_batch(values, type(self).__name__))

    @abstractmethod
    def _update_one(self, x: float) -> None:
        """Per-sample update (state already reset if needed); sets ``_drift_detected`` and ``_statistic``."""

    def _run(self, x: np.ndarray) -> int | None:
        for start in range(0, x.size, self.chunk):
            hit = self._run_chunk(x[start : start + self.chunk])
            if hit is not None:
                return start + hit
        return None

    @abstractmethod
    def _run_chunk(self, x: np.ndarray) -> int | None:
        """As :meth:`_run` over at most ``chunk`` values."""


class FeatureDetector(DriftDetector):
    """A detector over a stream of feature vectors of a fixed dimension."""

    dim: int

    def update(self, x: np.ndarray) -> FeatureDetector:
        """Feed one feature vector of shape ``(dim,)``. Returns ``self``."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != (self.dim,):
            raise ValueError(f"{type(self).__name__}.update expects shape ({self.dim},), got {arr.shape}")
        self.update_many(arr[None, :])
        return self

    def update_many(self, batch: np.ndarray) -> list[int]:
        """Feed feature vectors ``(n, dim)`` in order; return the positions where a drift was signalled."""
        arr = np.asarray(batch, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__}.update_many expects shape (n, {self.dim}), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{type(self).__name__} got non-finite values at rows {_bad_rows(arr)}")
        return self._consume(arr)


def scalar_batch(values: Iterable[float] | np.ndarray, who: str) -> np.ndarray:
    """``values`` as a finite float64 vector, or ``ValueError`` naming the first bad position."""
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{who}.update_many expects a 1-d sequence of numbers, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{who}.update_many got a non-finite value {arr[bad[0]]} at position {bad[0]}")
    return arr


def _bad_rows(arr: np.ndarray) -> list[int]:
    return np.flatnonzero(~np.all(np.isfinite(arr), axis=1))[:5].tolist()


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``, or ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_open_unit(name: str, value: object) -> float:
    """``value`` as a float in (0, 1), or ``ValueError`` naming ``name``."""
    v = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return v
