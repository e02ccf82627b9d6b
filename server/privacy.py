"""Differentially private federated averaging: per-device clipping, Gaussian noise, and an RDP accountant.

:class:`DPFedAvg` is DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models", Alg. 1 with the fixed denominator): each device's delta is clipped to L2 norm C over all its parameters,
the clipped deltas are summed, N(0, (σC)²) noise is added to every coordinate of the sum, and the sum is divided
by ``expected_devices`` (or, if unset, by the number of contributions — which leaks the count; set it for the
exact guarantee). Device-level adjacency (add/remove one device's whole contribution).

:class:`RdpAccountant` tracks the Rényi DP of the Poisson-subsampled Gaussian mechanism at integer orders
α = 2..256 with the exact formula of Mironov, Talwar & Zhang 2019 ("Rényi Differential Privacy of the Sampled
Gaussian Mechanism", Sec. 3.3) — for sampling rate q = 1 it is the Gaussian mechanism's α/(2σ²) (Mironov 2017,
Prop. 7) — composes over rounds by addition (Mironov 2017, Prop. 1) and converts to (ε, δ)-DP with
ε = min_α RDP(α) + log(1/δ)/(α-1) (Mironov 2017, Prop. 3), as the moments accountant of Abadi et al. 2016 does.
The sampling rate is what the operator declares; the server does not itself sample devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.aggregation_base import AggregationError, Aggregator, Contribution

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))


def _logsumexp(terms: Sequence[float]) -> float:
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def sampled_gaussian_rdp(q: float, noise_multiplier: float, order: int) -> float:
    """RDP at integer ``order`` α of one step of the Gaussian mechanism (σ = ``noise_multiplier``) with Poisson
    sampling rate ``q``: log(Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k)/(2σ²))) / (α-1) (Mironov et al. 2019)."""
    if not 0.0 < q <= 1.0:
        raise AggregationError(f"sampling rate {q} must be in (0, 1]")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise AggregationError(f"noise multiplier {noise_multiplier} must be positive")
    if order < 2:
        raise AggregationError(f"RDP order {order} must be an integer >= 2")
    if q == 1.0:
        return order / (2.0 * noise_multiplier ** 2)
    terms = [math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
             + (order - k) * math.log1p(-q) + (k * math.log(q) if k else 0.0)
             + (k * k - k) / (2.0 * noise_multiplier ** 2) for k in range(order + 1)]
    return _logsumexp(terms) / (order - 1)


class RdpAccountant:
    """Accumulates the RDP of rounds of the sampled Gaussian mechanism and reports ε at a given δ."""

    def __init__(self, orders: Sequence[int] = RDP_ORDERS) -> None:
        """Track RDP at ``orders`` (integers >= 2)."""
        if not orders or any(int(a) != a or a < 2 for a in orders):
            raise AggregationError(f"RDP orders {orders} must be integers >= 2")
        self.orders = tuple(int(a) for a in orders)
        self.rdp = np.zeros(len(self.orders))
        self.rounds = 0

    def step(self, noise_multiplier: float, sampling_rate: float = 1.0, rounds: int = 1) -> None:
        """Compose ``rounds`` rounds of noise σ at sampling rate q."""
        if rounds < 0:
            raise AggregationError(f"rounds {rounds} must be >= 0")
        one = np.array([sampled_gaussian_rdp(sampling_rate, noise_multiplier, a) for a in self.orders])
        self.rdp = self.rdp + rounds * one
        self.rounds += rounds

    def epsilon(self, delta: float) -> float:
        """ε of (ε, δ)-DP after the rounds so far: min over α of RDP(α) + log(1/δ)/(α-1) (Mironov 2017)."""
        if not 0.0 < delta < 1.0:
            raise AggregationError(f"delta {delta} must be in (0, 1)")
        if self.rounds == 0:
            return 0.0
        orders = np.array(self.orders, dtype=np.float64)
        return float(np.min(self.rdp + math.log(1.0 / delta) / (orders - 1.0)))


@dataclass(frozen=True)
class DPConfig:
    """Clip norm C, noise multiplier σ (noise std σC on the sum), δ for the reported ε, the declared Poisson
    sampling rate q of devices per round, the fixed denominator (None: the number of contributions) and the
    seed of the noise generator (None: fresh entropy)."""

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    sampling_rate: float = 1.0
    expected_devices: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise AggregationError(f"dp clip_norm {self.clip_norm} must be positive")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise AggregationError(f"dp noise_multiplier {self.noise_multiplier} must be positive")
        if not 0.0 < self.delta < 1.0:
            raise AggregationError(f"dp delta {self.delta} must be in (0, 1)")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise AggregationError(f"dp sampling_rate {self.sampling_rate} must be in (0, 1]")
        if self.expected_devices is not None and self.expected_devices < 1:
            raise AggregationError(f"dp expected_devices {self.expected_devices} must be >= 1")
        if self.seed is not None and self.seed < 0:
            raise AggregationError(f"dp seed {self.seed} must be >= 0 (numpy seeds are non-negative)")


class DPFedAvg(Aggregator):
    """DP-FedAvg (McMahan et al. 2018): unweighted mean of clipped deltas plus Gaussian noise σC/denominator per
    coordinate. Every contribution must carry every parameter the round aggregates (the clip bound is over the
    whole update). Each :meth:`aggregate` is one round for :attr:`accountant`; ``metrics["epsilon"]`` is ε at δ."""

    name = "dp_fedavg"
    whole_vector = True

    def __init__(self, config: DPConfig | None = None) -> None:
        """A fresh accountant and a noise generator seeded from ``config.seed``."""
        self.config = config or DPConfig()
        self.accountant = RdpAccountant()
        self._rng = np.random.default_rng(self.config.seed)
        self._clipped = 0

    def weights(self, contributions: Sequence[Contribution]) -> np.ndarray:
        """Uniform: sample counts would break the sensitivity bound."""
        return np.ones(len(contributions), dtype=np.float64)

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(Σ clip(Δ_i) + N(0, (σC)² I)) / denominator; also one step of the accountant."""
        c = self.config
        norms = np.linalg.norm(deltas, axis=1)
        scale = np.minimum(1.0, c.clip_norm / np.maximum(norms, 1e-300))
        self._clipped = int(np.sum(norms > c.clip_norm))
        total = (deltas * scale[:, None]).sum(axis=0)
        noisy = total + self._rng.normal(0.0, c.noise_multiplier * c.clip_norm, size=total.shape)
        self.accountant.step(c.noise_multiplier, c.sampling_rate)
        return noisy / float(c.expected_devices or deltas.shape[0])

    def state_dict(self) -> dict[str, Any]:
        """The privacy ledger (RDP per order, rounds) and the noise generator's state, so that a restarted
        server neither forgets the ε spent nor replays noise it already used."""
        acc = self.accountant
        return {"orders": list(acc.orders), "rdp": [float(v) for v in acc.rdp], "rounds": acc.rounds,
                "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s ledger and generator (checked before anything is replaced)."""
        if not isinstance(state, dict) or not {"orders", "rdp", "rounds", "rng"} <= set(state):
            raise AggregationError("dp_fedavg state needs 'orders', 'rdp', 'rounds' and 'rng'")
        if list(state["orders"]) != list(self.accountant.orders):
            raise AggregationError(f"dp_fedavg state was kept at RDP orders {state['orders']!r}, "
                                   f"this server uses {list(self.accountant.orders)}")
        rdp = np.asarray(state["rdp"], dtype=np.float64)
        rounds = state["rounds"]
        if rdp.shape != self.accountant.rdp.shape or not np.all(np.isfinite(rdp)) or np.any(rdp < 0):
            raise AggregationError("dp_fedavg state's 'rdp' must be finite, >= 0, one value per order")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise AggregationError(f"dp_fedavg state's 'rounds' must be an integer >= 0, got {rounds!r}")
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = state["rng"]
        except (TypeError, ValueError, KeyError) as exc:
            raise AggregationError(f"dp_fedavg state's 'rng' is not a generator state: {exc}") from exc
        self.accountant.rdp, self.accountant.rounds, self._rng = rdp, rounds, rng

    def metrics(self) -> dict[str, float]:
        """ε at δ after the rounds so far, the rounds, and how many deltas were clipped this round."""
        return {"epsilon": self.accountant.epsilon(self.config.delta), "delta": self.config.delta,
                "dp_rounds": float(self.accountant.rounds), "clipped": float(self._clipped)}
