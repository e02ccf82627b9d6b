"""Aggregation strategies for federated rounds, registered by name in :data:`AGGREGATORS`.

Every strategy is a small class over the base loop of :class:`server.aggregation_base.Aggregator`, built by
:func:`create_aggregator` from its name and a frozen, validated config:

* ``fedavg`` — sample-weighted mean (McMahan et al. 2017, Alg. 1).
* ``fedau`` — weights from each device's observed participation interval (Wang & Ji 2024).
* ``fedbuff`` — buffered asynchronous deltas scaled by ``1/sqrt(1+staleness)`` (Nguyen et al. 2022).
* ``trimmed_mean``, ``median``, ``krum`` — Byzantine-robust rules (:mod:`server.robust`).
* ``dp_fedavg`` — clipped, noised mean with an RDP accountant (:mod:`server.privacy`).

numpy only; no torch.
"""

from __future__ import annotations

import json
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from server.aggregation_base import AggregateResult, AggregationError, Aggregator, Contribution
from server.privacy import DPConfig, DPFedAvg
from server.robust import CoordinateMedian, Krum, KrumConfig, MedianConfig, TrimmedMean, TrimmedMeanConfig

__all__ = ["AGGREGATORS", "AggregateResult", "AggregationError", "Aggregator", "Contribution", "CoordinateMedian",
           "DPConfig", "DPFedAvg", "FedAU", "FedAUConfig", "FedAvg", "FedAvgConfig", "FedBuff", "FedBuffConfig",
           "Krum", "KrumConfig", "MedianConfig", "TrimmedMean", "TrimmedMeanConfig", "create_aggregator",
           "register_aggregator", "staleness_weight"]


# --- strategies --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FedAvgConfig:
    """FedAvg has no options."""


class FedAvg(Aggregator):
    """Sample-count-weighted mean per parameter (McMahan et al. 2017, FedAvg, Alg. 1 server step)."""

    name = "fedavg"

    def __init__(self, config: FedAvgConfig | None = None) -> None:
        """``config`` is accepted for uniformity; FedAvg has no options."""
        self.config = config or FedAvgConfig()


@dataclass(frozen=True)
class FedAUConfig:
    """``cutoff`` K caps each observed participation interval (Wang & Ji 2024, Alg. 2); ``num_devices`` N
    normalises the sum (None: the number of devices seen so far); ``server_lr`` is γ."""

    cutoff: int = 50
    num_devices: int | None = None
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.cutoff < 1:
            raise AggregationError(f"fedau cutoff {self.cutoff} must be >= 1")
        if self.num_devices is not None and self.num_devices < 1:
            raise AggregationError(f"fedau num_devices {self.num_devices} must be >= 1")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise AggregationError(f"fedau server_lr {self.server_lr} must be positive")


@dataclass
class ParticipationStats:
    """A device's FedAU state: rounds since its last interval closed, intervals seen, their running mean ω."""

    open_interval: int = 0
    intervals: int = 0
    omega: float = 1.0
    rounds_seen: int = 0
    rounds_participated: int = 0


class FedAU(Aggregator):
    """FedAU (Wang & Ji 2024, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated
    Averaging"): x ← x + (γ/N) Σ_{n∈S} ω_n Δ_n, ω_n the online mean of n's participation intervals capped at K
    (Alg. 2), an estimate of 1/p_n. Each :meth:`aggregate` call is one round: every known device's open
    interval grows by one, and a participant's (or one reaching K) closes. The interval closed by this round is
    included in the weight used this round. The server learns of a device at its first submission, so that
    submission opens its first interval (the paper counts from round 0 for a known population).
    """

    name = "fedau"

    def __init__(self, config: FedAUConfig | None = None) -> None:
        """Start with no per-device state."""
        self.config = config or FedAUConfig()
        self.stats: dict[str, ParticipationStats] = {}
        self._population = 0

    def observe_round(self, participants: Sequence[str]) -> None:
        """Advance every known device's open interval by one round; close those of ``participants`` and of
        devices reaching K. A device's first participation starts its first interval (ω stays 1 until then)."""
        present = set(participants)
        for device, s in self.stats.items():
            s.rounds_seen += 1
            s.open_interval += 1
            if device in present or s.open_interval >= self.config.cutoff:
                s.omega = (s.intervals * s.omega + s.open_interval) / (s.intervals + 1)
                s.intervals += 1
                s.open_interval = 0
            s.rounds_participated += device in present
        for device in present - set(self.stats):
            self.stats[device] = ParticipationStats(rounds_seen=1, rounds_participated=1)

    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        """ω of each participant, after this round is observed."""
        ids = [c.device_id for c in contributions]
        if len(set(ids)) != len(ids):
            raise AggregationError(f"fedau needs one contribution per device, got {sorted(ids)}")
        self.observe_round(ids)
        self._population = self.config.num_devices or len(self.stats)
        return np.array([self.stats[d].omega for d in ids], dtype=np.float64)

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(γ/N) Σ ω_n Δ_n."""
        return self.config.server_lr * (weights[:, None] * deltas).sum(axis=0) / self._population

    def metrics(self) -> dict[str, float]:
        """The population N used."""
        return {"population": float(self._population)}

    _STAT_FIELDS = ("open_interval", "intervals", "omega", "rounds_seen", "rounds_participated")

    def state_dict(self) -> dict[str, Any]:
        """Per-device participation statistics: ``{"devices": {id: [open_interval, intervals, ω, rounds_seen,
        rounds_participated]}}``."""
        return {"devices": {d: [getattr(s, f) for f in self._STAT_FIELDS] for d, s in sorted(self.stats.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the statistics of :meth:`state_dict` (every entry checked before any is replaced)."""
        devices = state.get("devices") if isinstance(state, dict) else None
        if not isinstance(devices, dict):
            raise AggregationError("fedau state needs a 'devices' object")
        stats: dict[str, ParticipationStats] = {}
        for device, row in devices.items():
            if not (isinstance(row, list) and len(row) == len(self._STAT_FIELDS)
                    and all(isinstance(v, int | float) and not isinstance(v, bool) for v in row)):
                raise AggregationError(f"fedau state of device {device!r} must be 5 numbers {self._STAT_FIELDS}, "
                                       f"got {row!r}")
            open_interval, intervals, omega, seen, participated = row
            if min(open_interval, intervals, seen, participated) < 0 or not (math.isfinite(omega) and omega > 0):
                raise AggregationError(f"fedau state of device {device!r} is out of range: {row!r}")
            stats[str(device)] = ParticipationStats(int(open_interval), int(intervals), float(omega), int(seen),
                                                    int(participated))
        self.stats = stats


@dataclass(frozen=True)
class FedBuffConfig:
    """``buffer_size`` K deltas per server step; ``server_lr`` η_g (Nguyen et al. 2022, Alg. 1)."""

    buffer_size: int = 10
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise AggregationError(f"fedbuff buffer_size {self.buffer_size} must be >= 1")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise AggregationError(f"fedbuff server_lr {self.server_lr} must be positive")


def staleness_weight(staleness: int) -> float:
    """FedBuff's staleness scaling 1/sqrt(1+s) (Nguyen et al. 2022, Sec. 5)."""
    return 1.0 / math.sqrt(1.0 + staleness)


class FedBuff(Aggregator):
    """FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"): deltas arrive
    asynchronously into a buffer; once K are held, x ← x + η_g/K Σ Δ_k/sqrt(1+s_k). :meth:`submit` buffers;
    :meth:`aggregate` applies one step over the contributions given (K = their number). On the server the buffer
    is the SQLite table of unused submissions, per bundle and cohort (:class:`server.rounds.RoundRunner`).
    """

    name = "fedbuff"
    asynchronous = True

    def __init__(self, config: FedBuffConfig | None = None) -> None:
        """Start with an empty buffer."""
        self.config = config or FedBuffConfig()
        self.buffer: list[Contribution] = []

    @property
    def buffer_size(self) -> int:
        """K: the server steps once every K submissions."""
        return self.config.buffer_size

    def submit(self, base: Mapping[str, np.ndarray], contribution: Contribution) -> AggregateResult | None:
        """Buffer ``contribution``; when K are held, aggregate them onto ``base``, empty the buffer, return it."""
        self.buffer.append(contribution)
        if len(self.buffer) < self.config.buffer_size:
            return None
        held, self.buffer = self.buffer, []
        return self.aggregate(base, held)

    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        """1/sqrt(1+staleness) per contribution (sample counts are not used)."""
        return np.array([staleness_weight(c.staleness) for c in contributions], dtype=np.float64)

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """η_g/K Σ w_k Δ_k."""
        return self.config.server_lr * (weights[:, None] * deltas).sum(axis=0) / len(weights)


# --- registry ----------------------------------------------------------------------------------------------

AGGREGATORS: dict[str, tuple[type[Aggregator], type]] = {}


def register_aggregator(cls: type[Aggregator], config_cls: type) -> None:
    """Register ``cls`` under ``cls.name`` with its config dataclass; rejects empty or duplicate names."""
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"aggregator name {cls.name!r} is not a valid identifier")
    if cls.name in AGGREGATORS:
        raise ValueError(f"aggregator {cls.name!r} is already registered")
    AGGREGATORS[cls.name] = (cls, config_cls)


def create_aggregator(name: str, **config: Any) -> Aggregator:
    """A fresh aggregator registered as ``name``, its config built from ``config`` (validated)."""
    if name not in AGGREGATORS:
        raise AggregationError(f"unknown aggregator {name!r}; known: {sorted(AGGREGATORS)}")
    cls, config_cls = AGGREGATORS[name]
    known = sorted(f.name for f in fields(config_cls))
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise AggregationError(f"bad options for aggregator {name!r}: unknown option(s) {unknown}; it takes "
                               f"{known or 'none'}")
    _check_option_types(name, config_cls, config)
    try:
        cfg = config_cls(**config)
    except TypeError as exc:
        raise AggregationError(f"bad options for aggregator {name!r}: {exc}") from exc
    return cls(cfg)  # type: ignore[call-arg]


def check_aggregator(name: str, options: Mapping[str, Any]) -> None:
    """Build aggregator ``name`` with ``options`` once, for a command that starts its server later: a bad
    ``--aggregator-option`` is a ``ValueError`` naming the flag before any work (training, export) is done."""
    from server.errors import ServerError

    try:
        create_aggregator(name, **options)
    except ServerError as exc:
        raise ValueError(f"--aggregator-option: {exc}") from exc


_OPTION_TYPES: dict[Any, tuple[type, ...]] = {int: (numbers.Integral,), float: (numbers.Real,), bool: (bool,),
                                              str: (str,)}


def _check_option_types(name: str, config_cls: type, config: Mapping[str, Any]) -> None:
    """Refuse an option whose value does not have its config field's type (an int where an int is meant, not a
    bool or 4.5; a number where a float is meant), naming it: a fractional ``buffer_size`` would otherwise never
    fill and a fractional krum ``byzantine`` fail every round. Unknown names are left to the constructor."""
    hints = typing.get_type_hints(config_cls)
    for key, value in config.items():
        if key not in hints:
            continue
        hint = hints[key]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in args:
            continue
        allowed = tuple(t for a in args for t in _OPTION_TYPES.get(a, ()))
        if not allowed:
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in args):
            wanted = " or ".join("None" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
            raise AggregationError(f"bad options for aggregator {name!r}: {key!r} must be {wanted}, got {value!r}")


def parse_option(text: str) -> tuple[str, Any]:
    """One ``KEY=VALUE`` aggregator option from a command line: the value as JSON when it parses (numbers,
    booleans, lists), else the string; ``ValueError`` naming the flag for anything else.

    >>> parse_option("beta=0.3"), parse_option("name=x")
    (('beta', 0.3), ('name', 'x'))
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--aggregator-option must be KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value

for _cls, _cfg in ((FedAvg, FedAvgConfig), (FedAU, FedAUConfig), (FedBuff, FedBuffConfig),
                   (TrimmedMean, TrimmedMeanConfig), (CoordinateMedian, MedianConfig), (Krum, KrumConfig),
                   (DPFedAvg, DPConfig)):
    register_aggregator(_cls, _cfg)
