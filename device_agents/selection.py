"""Selective upload: keep samples whose prediction entropy is informative yet reliable, within a byte budget.

The idea follows CEMA (Chen et al. 2024, "Towards Robust and Efficient Cloud-Edge Elastic Model Adaptation
via Selective Entropy Distillation", Sec. 3.2): a sample with very high entropy is unreliable (its prediction
is noise and distilling on it hurts), one with very low entropy is uninformative (the edge model already
handles it), so only samples in between are worth the uplink.

What a selected sample carries is the upload mode (:data:`UPLOAD_MODES`): the raw input, the penultimate
features only (privacy: the input never leaves the device; the server can aggregate or analyse features but
cannot distil on them), or both.

A drift event (:meth:`EntropyBandSelector.on_drift`) boosts the byte budget for a while, so the first samples
of a new domain reach the cloud sooner, and re-anchors the dynamic upper bound at ``high``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

UPLOAD_MODES = ("input", "features", "both")
"""What a selected sample carries: the model input, the penultimate features only, or both."""


@dataclass(frozen=True)
class SelectorConfig:
    """Settings of :class:`EntropyBandSelector`; entropies are normalised (entropy / ln K, in [0, 1]).

    ``high`` is the initial (and largest) upper bound; ``low`` the fixed lower bound; the dynamic upper
    bound never goes below ``low + min_band``. ``high_scale`` and ``mean_momentum`` drive the dynamic rule
    (see :class:`EntropyBandSelector`). ``bytes_per_window`` = None disables the byte budget.
    ``drift_boost`` multiplies the budget (bucket size and refill rate) for ``drift_boost_seconds`` after a
    drift event; ``reanchor_on_drift`` resets the dynamic upper bound to ``high`` at a drift event.
    """

    low: float = 0.02
    high: float = 0.4
    min_band: float = 0.05
    high_scale: float = 2.0
    mean_momentum: float = 0.9
    bytes_per_window: int | None = 1 << 20
    window_seconds: float = 60.0
    drift_boost: float = 2.0
    drift_boost_seconds: float = 60.0
    reanchor_on_drift: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"need 0 <= low < high <= 1, got low={self.low}, high={self.high}")
        if not 0.0 <= self.min_band <= self.high - self.low:
            raise ValueError(f"min_band must be in [0, high - low], got {self.min_band}")
        if not (math.isfinite(self.high_scale) and self.high_scale > 0):
            raise ValueError(f"high_scale must be finite and > 0, got {self.high_scale}")
        if not 0.0 <= self.mean_momentum < 1.0:
            raise ValueError(f"mean_momentum must be in [0, 1), got {self.mean_momentum}")
        if self.bytes_per_window is not None and self.bytes_per_window <= 0:
            raise ValueError(f"bytes_per_window must be > 0 or None, got {self.bytes_per_window}")
        if not (math.isfinite(self.window_seconds) and self.window_seconds > 0):
            raise ValueError(f"window_seconds must be finite and > 0, got {self.window_seconds}")
        if not (math.isfinite(self.drift_boost) and self.drift_boost >= 1.0):
            raise ValueError(f"drift_boost must be finite and >= 1, got {self.drift_boost}")
        if not (math.isfinite(self.drift_boost_seconds) and self.drift_boost_seconds >= 0):
            raise ValueError(f"drift_boost_seconds must be finite and >= 0, got {self.drift_boost_seconds}")


@dataclass(frozen=True)
class SelectionCounters:
    """Totals since construction: each considered sample lands in exactly one of the other four counts."""

    considered: int
    selected: int
    too_uncertain: int
    too_confident: int
    over_budget: int
    bytes_selected: int
    drift_boosts: int = 0


class EntropyBandSelector:
    """Select sample indices whose normalised entropy lies in ``[low, high_t]``, within a byte budget.

    Dynamic upper bound: with ``m_t`` an exponential moving average of the per-batch mean normalised entropy
    (``m_t = β·m_{t-1} + (1-β)·mean(e_batch)``, started at the first batch's mean, β = ``mean_momentum``),

        high_t = clip(high_scale · m_{t-1}, low + min_band, high)

    so as the adapted model grows more confident the band tightens and fewer unreliable samples pass; after a
    shift the mean entropy rises and the bound relaxes back towards ``high``. A batch is judged with the bound
    in force before it is folded into ``m``.

    Byte budget: a token bucket holding at most ``bytes_per_window`` bytes, refilled at
    ``bytes_per_window / window_seconds`` bytes per second of ``clock()``. In-band samples are taken in index
    order while their size fits the tokens left; the rest are counted as ``over_budget``.

    Drift boost: :meth:`on_drift` adds ``(drift_boost - 1) · bytes_per_window`` tokens at once and, until
    ``drift_boost_seconds`` have passed, lets the bucket hold and refill ``drift_boost`` times as much; when the
    boost ends the tokens are clipped back to ``bytes_per_window``. Over a window of length ``W`` the bytes
    selected are thus at most ``bytes_per_window · (1 + W / window_seconds)``, or ``drift_boost`` times that
    while boosted.

    State across restarts: :meth:`snapshot` holds the tokens, the moving average and what is left of a boost,
    stamped with ``wall_clock()`` (seconds since the epoch); :meth:`restore` takes them back and refills the
    bucket for the wall time that passed in between, so a restarted device does not start with a full budget
    (a fresh selector's bucket starts full).
    """

    STATE_KEYS = ("tokens", "mean_entropy", "boost_left_seconds", "wall_time")

    def __init__(self, config: SelectorConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.config = config or SelectorConfig()
        self._clock = clock
        self._wall_clock = wall_clock
        self._mean: float | None = None
        self._tokens = float(self.config.bytes_per_window or 0)
        self._last_refill = clock()
        self._boost_until = -math.inf
        self._counts = dict.fromkeys(
            ("considered", "selected", "too_uncertain", "too_confident", "over_budget", "bytes_selected",
             "drift_boosts"), 0
        )

    @property
    def high(self) -> float:
        """The upper entropy bound the next batch will be judged with."""
        cfg = self.config
        if self._mean is None:
            return cfg.high
        return float(min(cfg.high, max(cfg.low + cfg.min_band, cfg.high_scale * self._mean)))

    @property
    def low(self) -> float:
        """The lower entropy bound (fixed)."""
        return self.config.low

    @property
    def running_mean_entropy(self) -> float | None:
        """The moving average ``m`` of batch-mean normalised entropy, None before the first batch."""
        return self._mean

    @property
    def tokens(self) -> float:
        """Bytes that may still be selected now (refills the bucket first); inf without a budget."""
        self._refill()
        return self._tokens if self.config.bytes_per_window is not None else math.inf

    @property
    def boosted(self) -> bool:
        """Whether a drift boost of the byte budget is in force now."""
        return self._clock() < self._boost_until

    @property
    def counters(self) -> SelectionCounters:
        """A snapshot of the counters."""
        return SelectionCounters(**self._counts)

    def on_drift(self) -> None:
        """A drift was detected: boost the byte budget and (``reanchor_on_drift``) reset the upper bound.

        A drift during a boost extends it and tops the bucket up again, never above the boosted capacity.
        """
        cfg = self.config
        self._refill()
        self._counts["drift_boosts"] += 1
        if cfg.reanchor_on_drift:
            self._mean = None
        if cfg.bytes_per_window is None or cfg.drift_boost == 1.0 or cfg.drift_boost_seconds == 0:
            return
        self._boost_until = self._last_refill + cfg.drift_boost_seconds
        boosted = cfg.drift_boost * cfg.bytes_per_window
        self._tokens = min(boosted, self._tokens + (cfg.drift_boost - 1.0) * cfg.bytes_per_window)

    def snapshot(self) -> dict[str, np.ndarray]:
        """The state a restart must not lose (see the class docstring), as 0-d float64 arrays; the moving
        average is NaN before the first batch."""
        self._refill()
        return {
            "tokens": np.float64(self._tokens),
            "mean_entropy": np.float64(math.nan if self._mean is None else self._mean),
            "boost_left_seconds": np.float64(max(0.0, self._boost_until - self._last_refill)),
            "wall_time": np.float64(self._wall_clock()),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Take back a :meth:`snapshot`, refilled for the wall time since it was taken (a clock that stepped
        back refills nothing); tokens above this config's capacity are clipped to it. ``ValueError`` naming the
        problem, and nothing changed, for a state that is not a snapshot's."""
        if set(state) != set(self.STATE_KEYS):
            raise ValueError(f"selector state must hold exactly {list(self.STATE_KEYS)}, got {sorted(state)}")
        values: dict[str, float] = {}
        for key in self.STATE_KEYS:
            value = np.asarray(state[key])
            if value.shape != () or value.dtype.kind != "f":
                raise ValueError(f"selector state {key!r} must be a float scalar, got {value.dtype} {value.shape}")
            values[key] = float(value)
        mean = values["mean_entropy"]
        if not (math.isnan(mean) or 0.0 <= mean <= 1.0):
            raise ValueError(f"selector state 'mean_entropy' must lie in [0, 1] (or be NaN: none yet), got {mean}")
        for key in ("tokens", "boost_left_seconds", "wall_time"):
            if not (math.isfinite(values[key]) and values[key] >= 0):
                raise ValueError(f"selector state {key!r} must be a finite number >= 0, got {values[key]}")
        cfg = self.config
        capacity = float(cfg.bytes_per_window or 0)
        elapsed = max(0.0, self._wall_clock() - values["wall_time"])
        now = self._clock()
        self._mean = None if math.isnan(mean) else mean
        self._last_refill = now - elapsed
        self._boost_until = self._last_refill + min(values["boost_left_seconds"], cfg.drift_boost_seconds)
        boosted = self._boost_until > self._last_refill
        self._tokens = min(values["tokens"], (cfg.drift_boost if boosted else 1.0) * capacity)
        self._refill()

    def charge(self, nbytes: int) -> None:
        """Take ``nbytes`` from the budget (not below 0): bytes selected that a restored snapshot does not know
        of (samples queued after it was taken, still in the outbox)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._refill()
        self._tokens = max(0.0, self._tokens - float(nbytes))

    def _refill(self) -> None:
        capacity = self.config.bytes_per_window
        now = self._clock()
        if capacity is not None:
            rate = capacity / self.config.window_seconds
            t = self._last_refill
            if t < self._boost_until:  # the boosted stretch first, then the normal one
                end = max(t, min(now, self._boost_until))
                factor = self.config.drift_boost
                self._tokens = min(factor * capacity, self._tokens + (end - t) * rate * factor)
                t = end
            if now >= self._boost_until:
                self._tokens = min(float(capacity), self._tokens + max(0.0, now - t) * rate)
        self._last_refill = max(self._last_refill, now)  # a clock that steps back refills nothing

    def select(self, entropies: np.ndarray, sizes: int | np.ndarray) -> np.ndarray:
        """Return the int64 indices of the samples to upload.

        ``entropies``: normalised entropies, shape (N,) (clipped into [0, 1]); ``sizes``: bytes each sample would
        take on the wire, one int for all or shape (N,).
        """
        ent = np.asarray(entropies, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(ent)):
            raise ValueError(f"entropies must be finite, got {ent[~np.isfinite(ent)][:5]}")
        # the normalised entropy of float32 probabilities can leave [0, 1] by rounding (a uniform prediction gives
        # up to 1 + 4e-8): clipped, so that the running mean, and the snapshot holding it, stay in [0, 1]
        ent = np.clip(ent, 0.0, 1.0)
        size_arr = np.broadcast_to(np.asarray(sizes, dtype=np.int64), ent.shape)
        if np.any(size_arr < 0):
            raise ValueError(f"sizes must be >= 0, got min {int(size_arr.min())}")
        high, low = self.high, self.low
        too_uncertain = ent > high
        too_confident = ent < low
        self._counts["considered"] += int(ent.size)
        self._counts["too_uncertain"] += int(too_uncertain.sum())
        self._counts["too_confident"] += int(too_confident.sum())
        chosen = self._spend(np.flatnonzero(~too_uncertain & ~too_confident), size_arr)
        if ent.size:
            batch_mean = float(ent.mean())
            beta = self.config.mean_momentum
            self._mean = batch_mean if self._mean is None else beta * self._mean + (1 - beta) * batch_mean
        return chosen

    def _spend(self, candidates: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        if self.config.bytes_per_window is None:
            chosen = candidates
        else:
            self._refill()
            kept: list[int] = []
            for i in candidates:
                size = int(sizes[i])
                if size <= self._tokens:
                    self._tokens -= size
                    kept.append(int(i))
            chosen = np.asarray(kept, dtype=np.int64)
        self._counts["over_budget"] += int(candidates.size - chosen.size)
        self._counts["selected"] += int(chosen.size)
        self._counts["bytes_selected"] += int(sizes[chosen].sum()) if chosen.size else 0
        return chosen.astype(np.int64)
