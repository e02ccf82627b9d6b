"""What a simulated device contributes to a federated round: a pluggable step.

A :class:`Contributor` turns a device's agent into a :class:`Contribution` (parameters and the number of
samples behind them) or None (nothing to contribute). The simulator then applies the device's byzantine attack,
if any, to the contribution's *delta* from the parameters the device holds and submits it over gRPC
(``SubmitUpdate``).

* :class:`AgentContributor` — the agent's own ``Agent.contribute()`` when the agent has one (forward-only
  devices submitting their adapted normalisation parameters and statistics); it returns parameters without
  sending them, the simulator sends.
* :class:`TTAStatisticsContributor` — the fallback: the normalisation statistics the device's batch-statistics
  TTA method (α-BN, FOA, and LAME/T3A on their α-BN pass) currently normalises with, read from the method's
  running estimate: ``(1 - α) · reference + α · estimate`` per layer, for ``L.mean`` and ``L.var``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Contribution:
    """Adapted parameters (a subset of the model's adaptable parameters) and the samples behind them."""

    params: dict[str, np.ndarray]
    num_samples: int
    base_version: int | None = None
    """The version whose parameters the device held (None: the agent's ``active_version``)."""


@runtime_checkable
class Contributor(Protocol):
    """Makes a device's contribution from its agent; ``samples`` were seen since its last contribution."""

    name: str

    def contribution(self, agent: Any, samples: int) -> Contribution | None:
        """The contribution, or None when the device has nothing to offer."""
        ...


def _alpha(config: Any) -> float | None:
    for candidate in (config, getattr(config, "statistics", None)):
        alpha = getattr(candidate, "alpha", None)
        if isinstance(alpha, int | float):
            return float(alpha)
    return None


class TTAStatisticsContributor:
    """The statistics a batch-statistics TTA method normalises with, from its running estimate."""

    name = "tta_statistics"

    def contribution(self, agent: Any, samples: int) -> Contribution | None:
        """``L.mean``/``L.var`` mixed by the method's α; None for a method without a running estimate."""
        if samples <= 0:
            return None
        state = agent.tta.snapshot()
        alpha = _alpha(agent.tta.config)
        if alpha is None:
            return None
        reference = agent.model.params
        params: dict[str, np.ndarray] = {}
        for key, ema_mean in state.items():
            if not key.endswith(".ema_mean"):
                continue
            stem = key[: -len(".ema_mean")]
            layer = next((name for name in (stem, stem.split(".", 1)[-1]) if f"{name}.mean" in reference), None)
            sq = state.get(f"{stem}.ema_sq")
            if layer is None or sq is None:
                continue
            var = np.maximum(sq - ema_mean**2, 1e-8)
            params[f"{layer}.mean"] = ((1 - alpha) * reference[f"{layer}.mean"] + alpha * ema_mean).astype(np.float32)
            params[f"{layer}.var"] = ((1 - alpha) * reference[f"{layer}.var"] + alpha * var).astype(np.float32)
        return Contribution(params, int(samples)) if params else None


class AgentContributor:
    """The agent's own ``contribute()`` (parameters and sample count, not sent), when the agent has one."""

    name = "agent"

    @staticmethod
    def available(agent: Any) -> bool:
        """Whether ``agent`` offers a ``contribute`` method this contributor can call without sending."""
        method = getattr(agent, "contribute", None)
        if method is None:
            return False
        try:
            params = inspect.signature(method).parameters
        except (TypeError, ValueError):
            return False
        return "submit" in params

    def contribution(self, agent: Any, samples: int) -> Contribution | None:
        """Ask the agent (``contribute(submit=False)``) for its parameters and sample count."""
        out = agent.contribute(submit=False)
        if out is None:
            return None
        params = getattr(out, "params", None)
        count = getattr(out, "num_samples", samples)
        if not params:
            return None
        base = getattr(out, "base_version", None)
        return Contribution({k: np.asarray(v, np.float32) for k, v in params.items()}, int(count or samples),
                            None if base is None else int(base))


def default_contributor(agent: Any) -> Contributor:
    """:class:`AgentContributor` when the agent can contribute by itself, else :class:`TTAStatisticsContributor`."""
    return AgentContributor() if AgentContributor.available(agent) else TTAStatisticsContributor()
