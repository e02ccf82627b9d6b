"""The detector contract shared by every drift detector (River's, plus a vectorized path).

* hyperparameters only in ``__init__``, validated there (``ValueError`` naming the offending value);
* ``update(x) -> self`` feeds one observation; the read-only :attr:`DriftDetector.drift_detected` says whether
  it signalled a drift; the state is reset at the first update after a drift;
* ``update_many(batch) -> list[int]`` feeds observations in order and returns the positions (within the batch)
  where a drift was signalled — exactly what calling ``update`` on each would give, computed with numpy;
* non-finite input, and input of magnitude above :data:`MAX_ABS_VALUE` (``1e100``), raises ``ValueError`` before
  any state changes. The bound keeps every detector's state finite: the running sums and sums of squares of
  ADWIN and Page-Hinkley stay below ``n·4e200`` (and a squared sum below ``n²·4e200``), far from the float64
  limit ``1.8e308`` for any stream shorter than ``1e53`` values;
* a feature row within the bound can still overflow a feature detector's fitted transform (a near-singular
  covariance, a tiny kernel bandwidth): the batch holding it is refused with ``ValueError`` and the state is
  restored to what it was before the call, so after any accepted input every number a detector holds is finite.

Every detector exposes :attr:`statistic` (its test statistic after the last update) and :attr:`threshold` (the
value the statistic must exceed), so an agent can report both with a drift event.

State across restarts: :meth:`DriftDetector.snapshot` returns everything a detector learnt from the stream since
its last reset as named arrays, and :meth:`DriftDetector.restore` takes them back into a detector of the same
class and hyperparameters, which then signals drift exactly where the original would have. A restarted device
that started afresh instead would take the stream after the restart as its reference, and a drift under way
would never be detected. A state that does not fit is refused with ``ValueError`` naming the problem, and the
detector is left as it was.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

MAX_STATE_INT = 2**62
"""The largest count a saved detector state may hold (far beyond any stream; int64 arithmetic stays exact)."""
MAX_ABS_VALUE = 1e100
"""The largest magnitude a detector accepts in an observation (a value, or an entry of a feature row)."""


class StateOverflowError(ValueError):
    """An observation (at :attr:`position` of the batch being consumed) would make a detector's state non-finite."""

    def __init__(self, position: int, detail: str) -> None:
        super().__init__(detail)
        self.position = position
        self.detail = detail


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

    # -- state across restarts -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        """Everything learnt since the last reset, as named arrays (see the module docstring)."""
        return {"drift_detected": np.asarray(self._drift_detected),
                "statistic": np.asarray(self._statistic, np.float64), **self._state_arrays()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back a :meth:`snapshot` of a detector of this class and hyperparameters. ``ValueError`` naming
        the problem, with the detector left as it was, for a state that does not fit."""
        who = type(self).__name__
        keys = set(self.snapshot())
        if set(state) != keys:
            raise ValueError(f"{who}: a saved state holds {sorted(keys)}, got {sorted(state)}")
        saved = self._save_state()
        try:
            arrays = {k: np.asarray(v) for k, v in state.items()}
            self._drift_detected = state_scalar(arrays, "drift_detected", "b")
            self._statistic = state_scalar(arrays, "statistic", "f", allow=(-math.inf,))
            self._load_state(arrays)
        except (ValueError, TypeError, OverflowError) as exc:
            self._restore_state(saved)
            raise ValueError(f"{who}: the saved state does not fit this detector: {exc}") from None

    @property
    def saves_state(self) -> bool:
        """Whether this detector implements :meth:`snapshot`/:meth:`restore` (every built-in one does; a user's
        own subclass may not, and then an agent does not save it)."""
        return type(self)._state_arrays is not DriftDetector._state_arrays

    def _state_arrays(self) -> dict[str, np.ndarray]:
        """The subclass's state (beyond the drift flag and the statistic) as named arrays."""
        raise NotImplementedError(f"{type(self).__name__} does not save its state")

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Set the subclass's state from :meth:`_state_arrays`'s arrays, checking each (``ValueError`` naming it);
        :meth:`restore` undoes a partial load."""
        raise NotImplementedError(f"{type(self).__name__} does not restore a saved state")

    def _save_state(self) -> dict[str, Any]:
        """What :meth:`_restore_state` needs to undo a failed update or restore: the attributes, lists copied.
        Detectors replace their arrays on update (never write into them), so a shallow copy is exact."""
        return {k: list(v) if isinstance(v, list) else v for k, v in vars(self).items()}

    def _restore_state(self, saved: dict[str, Any]) -> None:
        vars(self).clear()
        vars(self).update(saved)

    def _consume(self, arr: np.ndarray) -> list[int]:
        """Feed validated observations (values or rows) through :meth:`_run` in order, resetting after each
        drift as ``update`` would; return the positions where a drift was signalled."""
        found: list[int] = []
        start = 0
        while start < len(arr):
            if self._drift_detected:
                self.reset()
            try:
                hit = self._run(arr[start:])
            except StateOverflowError as exc:
                raise StateOverflowError(start + exc.position, exc.detail) from None
            if hit is None:
                break
            found.append(start + hit)
            start += hit + 1
        return found

    @abstractmethod
    def _run(self, x: np.ndarray) -> int | None:
        """Vectorized update over ``x`` until the first drift: its index (state left as after that update,
        drift flag set), or None with every value consumed. Raises :class:`StateOverflowError` (position within
        ``x``) for a value that would make the state non-finite."""


class ScalarDetector(DriftDetector):
    """A detector over a stream of numbers.

    Subclasses vectorize :meth:`_run_chunk` over at most ``chunk`` values (a class attribute bounding the
    temporary arrays); :meth:`_run` walks the batch chunk by chunk.
    """

    chunk: int = 4096

    def update(self, x: float) -> ScalarDetector:
        """Feed one value; a drift found on the previous call resets the state first. Returns ``self``."""
        value = float(x)
        if not abs(value) <= MAX_ABS_VALUE:
            raise ValueError(f"{type(self).__name__}.update got {_describe(value)}")
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
        """Feed feature vectors ``(n, dim)`` in order; return the positions where a drift was signalled.

        All or nothing: a row that is non-finite, beyond :data:`MAX_ABS_VALUE`, or that would make the state
        non-finite raises ``ValueError`` with the state as it was before the call (drifts found earlier in the
        batch included)."""
        who = type(self).__name__
        arr = np.asarray(batch, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{who}.update_many expects shape (n, {self.dim}), got {arr.shape}")
        bad = np.flatnonzero(~np.all(np.abs(arr) <= MAX_ABS_VALUE, axis=1))
        if bad.size:
            row = arr[bad[0]]
            worst = row[np.flatnonzero(~(np.abs(row) <= MAX_ABS_VALUE))[0]]
            raise ValueError(f"{who} got a feature row at position {bad[0]} (of rows {bad[:5].tolist()} "
                             f"refused) holding {_describe(float(worst))}")
        saved = self._save_state()
        try:
            return self._consume(arr)
        except StateOverflowError as exc:
            self._restore_state(saved)
            raise ValueError(f"{who} refused the feature row at position {exc.position} (largest magnitude "
                             f"{float(np.abs(arr[exc.position]).max()):g}): {exc.detail}; the state is as "
                             "before this call") from None
        except BaseException:
            self._restore_state(saved)
            raise


def state_scalar(state: Mapping[str, np.ndarray], key: str, kind: str, *, minimum: float | None = None,
                 allow: tuple[float, ...] = ()) -> Any:
    """``state[key]`` as a Python scalar of ``kind`` (``"b"`` bool, ``"i"`` int, ``"f"`` float), checked: a 0-d
    array of that kind, finite (or one of ``allow``), at least ``minimum``."""
    value = np.asarray(state[key])
    kinds = {"b": "b", "i": "iu", "f": "f"}[kind]
    if value.shape != () or value.dtype.kind not in kinds:
        raise ValueError(f"{key!r} must be a {dict(b='bool', i='integer', f='float')[kind]} scalar, got "
                         f"{value.dtype} of shape {value.shape}")
    out = value.item()
    if kind == "f" and not (math.isfinite(out) or out in allow):
        raise ValueError(f"{key!r} must be finite, got {out}")
    if kind == "i" and not -MAX_STATE_INT <= out <= MAX_STATE_INT:
        raise ValueError(f"{key!r} must lie within ±2**62, got {out}")
    if minimum is not None and out < minimum:
        raise ValueError(f"{key!r} must be >= {minimum}, got {out}")
    return out


def state_array(state: Mapping[str, np.ndarray], key: str, shape: tuple[int | None, ...], kind: str = "f"
                ) -> np.ndarray:
    """``state[key]`` checked: of ``shape`` (None: any length on that axis), of ``kind`` (``"f"`` finite floats,
    ``"i"`` integers, ``"u"`` unsigned), as a new array."""
    value = np.asarray(state[key])
    if value.ndim != len(shape) or any(want is not None and got != want for got, want in zip(value.shape, shape,
                                                                                              strict=True)):
        raise ValueError(f"{key!r} must have shape {tuple('n' if d is None else d for d in shape)}, got {value.shape}")
    if value.dtype.kind not in {"f": "f", "i": "iu", "u": "u"}[kind] or value.dtype.kind == "b":
        raise ValueError(f"{key!r} must hold {dict(f='floats', i='integers', u='unsigned integers')[kind]}, got "
                         f"{value.dtype}")
    if kind == "f" and not np.all(np.isfinite(value)):
        raise ValueError(f"{key!r} holds non-finite values")
    if kind == "i" and value.size and not (int(value.min()) >= -MAX_STATE_INT and int(value.max()) <= MAX_STATE_INT):
        raise ValueError(f"{key!r} holds values beyond ±2**62")
    return np.array(value, dtype=np.float64 if kind == "f" else (np.int64 if kind == "i" else np.uint64))


def scalar_batch(values: Iterable[float] | np.ndarray, who: str) -> np.ndarray:
    """``values`` as a float64 vector of finite values of magnitude at most :data:`MAX_ABS_VALUE`, or
    ``ValueError`` naming the first bad position."""
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{who}.update_many expects a 1-d sequence of numbers, got shape {arr.shape}")
    bad = np.flatnonzero(~(np.abs(arr) <= MAX_ABS_VALUE))
    if bad.size:
        raise ValueError(f"{who}.update_many: position {bad[0]} holds {_describe(float(arr[bad[0]]))}")
    return arr


def _describe(value: float) -> str:
    """Why ``value`` is refused, for an error message."""
    if not math.isfinite(value):
        return f"a non-finite value {value}"
    return (f"the value {value:g}, beyond the accepted magnitude {MAX_ABS_VALUE:g} (sums of such values would "
            "overflow the detector's state)")


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
