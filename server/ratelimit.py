"""Per-key token buckets: each device (or enrolling peer) may make ``burst`` calls at once, ``rate`` per second
on average. Idle buckets are forgotten once more than ``max_keys`` exist, so random keys cannot grow memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from server.errors import RateLimitedError


class RateLimiter:
    """Token buckets keyed by a string (a device id, ``peer:<address>``)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        """``rate`` tokens per second refill each bucket up to ``burst``; ``clock`` is in seconds."""
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"rate {rate} must be > 0, burst {burst} and max_keys {max_keys} >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self.max_keys = int(max_keys)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _level(self, tokens: float, at: float, now: float) -> float:
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def acquire(self, key: str) -> None:
        """Take one token from ``key``'s bucket, or raise :class:`RateLimitedError` saying when to retry."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            level = self._level(tokens, at, now)
            if level < 1.0:
                self._buckets[key] = (level, now)
                wait = (1.0 - level) / self.rate
                raise RateLimitedError(f"rate limit of {self.rate:g} calls/s (burst {self.burst}) exceeded "
                                       f"by {key!r}; retry in {wait:.2f} s")
            self._buckets[key] = (level - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if self._level(t, at, now) >= self.burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) > self.max_keys:  # all busy: drop the oldest-touched
            del self._buckets[min(self._buckets, key=lambda k: self._buckets[k][1])]

    def __len__(self) -> int:
        """How many buckets are held."""
        with self._lock:
            return len(self._buckets)
