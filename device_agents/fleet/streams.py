"""A simulated device's camera stream, built lazily from its :class:`~device_agents.fleet.scenarios.DeviceSpec`.

Only indices and per-position domains are kept (a few bytes per sample); a round's images are drawn from the
shared test split and corrupted when the round needs them, with seeds derived from the device and the stream
position, so the same batch comes out identical every time it is built (the live run and the baselines see
the same pixels) and a 1,000-device MNIST or CIFAR fleet does not hold its streams in memory.
"""

from __future__ import annotations

import numpy as np

from device_agents.fleet.scenarios import DeviceSpec


def _domain_of(label: str) -> tuple[str, int]:
    if label == "clean":
        return "clean", 0
    name, _, sev = label.partition("@")
    return name, int(sev)


class DeviceStream:
    """The stream of one device over ``rounds`` rounds of ``batches_per_round × batch_size`` samples."""

    def __init__(self, spec: DeviceSpec, x: np.ndarray, y: np.ndarray, rounds: int, batch_size: int) -> None:
        self.spec = spec
        self.x = x
        self.y = y
        self.batch_size = int(batch_size)
        self.rounds = int(rounds)
        n = spec.samples(rounds, batch_size)
        rng = np.random.default_rng([spec.seed, 1])
        pool = spec.pool
        order = np.concatenate([rng.permutation(pool) for _ in range(-(-n // pool.size))])[:n]
        self.index = order.astype(np.int32)
        self.labels = [s.domain for s in spec.schedule]
        self.domain = self._domain_index(rng, n)

    def _domain_index(self, rng: np.random.Generator, n: int) -> np.ndarray:
        dom = np.zeros(n, dtype=np.int16)
        pos = np.arange(n)
        for k, span in enumerate(self.spec.schedule[1:], start=1):
            if span.ramp <= 0:
                dom[pos >= span.start] = k
                continue
            share = np.clip((pos - span.start + 0.5) / span.ramp, 0.0, 1.0)
            dom[rng.random(n) < share] = k  # later spans overwrite earlier ones
        return dom

    def __len__(self) -> int:
        return len(self.index)

    @property
    def drift_points(self) -> list[int]:
        """Ground-truth positions where the domain starts to change."""
        return self.spec.drift_points

    def round_bounds(self, round_index: int) -> tuple[int, int]:
        """Stream positions ``[lo, hi)`` of round ``round_index``."""
        per_round = self.spec.batches_per_round * self.batch_size
        return round_index * per_round, (round_index + 1) * per_round

    def images(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` for positions ``[lo, hi)``: the pool's images, corrupted per position's domain."""
        from edgeloop.data.corruptions import corrupt

        x = np.array(self.x[self.index[lo:hi]], dtype=np.float32)
        dom = self.domain[lo:hi]
        for k in np.unique(dom):
            name, severity = _domain_of(self.labels[int(k)])
            if name == "clean":
                continue
            mask = dom == k
            seed = (self.spec.seed * 1_000_003 + lo * 131 + int(k)) % (2**31 - 1)
            x[mask] = corrupt(x[mask], name, severity, seed=seed)
        return x, np.asarray(self.y[self.index[lo:hi]], dtype=np.int64)

    def round_batches(self, round_index: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(position, x, y)`` of each batch of round ``round_index`` (corrupted once for the whole round)."""
        lo, hi = self.round_bounds(round_index)
        x, y = self.images(lo, hi)
        b = self.batch_size
        return [(lo + s, x[s : s + b], y[s : s + b]) for s in range(0, hi - lo, b)]
