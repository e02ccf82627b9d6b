"""The base loop of federated aggregation: :class:`Contribution`, :class:`AggregateResult`, :class:`Aggregator`.

:class:`Aggregator` owns the loop — validate the contributions, turn each into a delta from the current
parameters, weight them, combine the deltas per parameter (or over the whole flattened vector) and add the result
to the base. A strategy overrides :meth:`Aggregator.weights` and/or :meth:`Aggregator.combine`; the strategies
and their registry are in :mod:`server.aggregation`. numpy only; no torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from server.errors import InvalidRequestError, InvalidTensorError, NothingToAggregateError

logger = logging.getLogger(__name__)
FLOAT32_MAX = float(np.finfo(np.float32).max)


class AggregationError(InvalidRequestError):
    """Contributions a strategy cannot aggregate (too few for its rule, or an invalid config)."""


@dataclass(frozen=True)
class Contribution:
    """One device's submission to a round.

    ``params`` are absolute parameters, or deltas from the device's base when ``is_delta``; ``weight`` is its
    sample count (FedAvg's weight); ``staleness`` is how many updates were published since the device's base
    (FedBuff). A parameter a contribution does not carry keeps its base value for that contribution's rule.
    """

    device_id: str
    params: Mapping[str, np.ndarray]
    weight: float = 1.0
    staleness: int = 0
    is_delta: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight < 0:
            raise AggregationError(f"contribution of {self.device_id!r}: weight {self.weight} must be finite, >= 0")
        if self.staleness < 0:
            raise AggregationError(f"contribution of {self.device_id!r}: staleness {self.staleness} is negative")


@dataclass(frozen=True)
class AggregateResult:
    """New parameters (float32, same names and shapes as the base), per-device weights used, and metrics."""

    params: dict[str, np.ndarray]
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Aggregator:
    """Base loop of every strategy; subclasses override :meth:`weights` and/or :meth:`combine`.

    ``whole_vector`` strategies (Krum) combine the concatenation of every parameter at once and so need every
    contribution to carry every parameter; coordinate-wise ones combine each parameter over its carriers.

    ``asynchronous`` strategies (FedBuff) are run by the server itself every :attr:`buffer_size` submissions
    (see :class:`server.rounds.RoundRunner`); the others run when an operator starts a round.

    State that must outlive a server restart (FedAU's participation, the DP ledger) is exported by
    :meth:`state_dict` as JSON-able data in format :attr:`state_version` and read back by
    :meth:`load_state_dict`; stateless strategies return None.
    """

    name: ClassVar[str] = ""
    whole_vector: ClassVar[bool] = False
    asynchronous: ClassVar[bool] = False
    state_version: ClassVar[int] = 1

    @property
    def buffer_size(self) -> int:
        """Submissions per server step of an asynchronous strategy (1 for the synchronous ones)."""
        return 1

    def state_dict(self) -> dict[str, Any] | None:
        """The strategy's persistent state as JSON-able data, or None when it keeps none (the default)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; raises :class:`AggregationError` naming a malformed entry."""
        raise AggregationError(f"{self.name} keeps no state, but a saved state was given")

    def min_contributions(self) -> int:
        """The fewest contributions the rule accepts."""
        return 1

    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        """Weight of each contribution (default: its ``weight``, e.g. sample count)."""
        return np.array([c.weight for c in contributions], dtype=np.float64)

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Combine ``deltas`` (n, d) with ``weights`` (n,) into one (d,) delta; default: weighted mean."""
        total = float(weights.sum())
        if total <= 0:
            raise AggregationError(f"{self.name}: contribution weights sum to {total}, must be positive")
        return (weights[:, None] * deltas).sum(axis=0) / total

    def metrics(self) -> dict[str, float]:
        """Strategy-specific metrics of the last aggregation (override to report some)."""
        return {}

    def aggregate(self, base: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> AggregateResult:
        """Aggregate ``contributions`` onto ``base``; raises on non-finite, mis-shaped or too few inputs.

        A result beyond the float32 range (finite inputs near its limit, a server learning rate > 1) is set to the
        limit and counted in ``metrics["saturated"]``: refusing it would refuse every later round over the same
        inputs (an asynchronous buffer's oldest submissions are taken again and again)."""
        if not contributions:
            raise NothingToAggregateError("no contributions to aggregate")
        if len(contributions) < self.min_contributions():
            raise AggregationError(f"{self.name} needs at least {self.min_contributions()} contributions, "
                                   f"got {len(contributions)}")
        base64 = {k: np.asarray(v, dtype=np.float64) for k, v in base.items()}
        deltas = [_deltas(c, base64) for c in contributions]
        w = self.weights(contributions)
        combined = (self._combine_whole(base64, deltas, w) if self.whole_vector
                    else self._combine_each(base64, deltas, w))
        params, saturated = {}, 0
        for k, v in base64.items():
            value = v + combined[k] if k in combined else v
            if not np.all(np.isfinite(value)):
                raise InvalidTensorError(f"{self.name}: aggregated parameter {k!r} is not finite")
            beyond = np.abs(value) > FLOAT32_MAX
            if beyond.any():  # finite, but past what float32 holds: the cast would make it inf
                saturated += int(beyond.sum())
                value = np.clip(value, -FLOAT32_MAX, FLOAT32_MAX)
            params[k] = value.astype(np.float32)
        used = {c.device_id: float(x) for c, x in zip(contributions, w, strict=True)}
        metrics = self.metrics()
        if saturated:
            logger.warning("%s: %d aggregated value(s) beyond the float32 range set to its limit", self.name,
                           saturated)
            metrics = {**metrics, "saturated": float(saturated)}
        return AggregateResult(params, used, metrics)

    def _combine_each(self, base: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]],
                      w: np.ndarray) -> dict[str, np.ndarray]:
        result = {}
        for name, value in base.items():
            idx = [i for i, d in enumerate(deltas) if name in d]
            if idx:
                stacked = np.stack([deltas[i][name].ravel() for i in idx])
                result[name] = self.combine(stacked, w[idx]).reshape(value.shape)
        return result

    def _combine_whole(self, base: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]],
                       w: np.ndarray) -> dict[str, np.ndarray]:
        names = sorted(k for k in base if any(k in d for d in deltas))  # one order, however the dicts were built
        for i, d in enumerate(deltas):
            if set(d) != set(names):
                raise AggregationError(f"{self.name} needs every contribution to carry {sorted(names)}; "
                                       f"contribution {i} carries {sorted(d)}")
        flat = np.stack([np.concatenate([d[k].ravel() for k in names]) for d in deltas])
        out = self.combine(flat, w)
        result, offset = {}, 0
        for k in names:
            size = base[k].size
            result[k] = out[offset:offset + size].reshape(base[k].shape)
            offset += size
        return result


def _deltas(c: Contribution, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in c.params.items():
        if name not in base:
            raise InvalidTensorError(f"contribution of {c.device_id!r}: unknown parameter {name!r}")
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != base[name].shape:
            raise InvalidTensorError(f"contribution of {c.device_id!r}: {name!r} has shape {arr.shape}, "
                                     f"expected {base[name].shape}")
        if not np.all(np.isfinite(arr)):
            raise InvalidTensorError(f"contribution of {c.device_id!r}: {name!r} has non-finite values")
        out[name] = arr if c.is_delta else arr - base[name]
    return out


