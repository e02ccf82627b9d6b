"""What a TTA method's state may hold, so that restoring something else is refused before it is used.

:meth:`~device_agents.tta.base.TTAMethod.snapshot` returns a :class:`TTASnapshot`: the state dict, tagged with
the method that took it, so that :meth:`~device_agents.tta.base.TTAMethod.restore` refuses a snapshot of
another method by name. A plain dict (a state built or stored by hand) carries no tag; it is checked against
the method's :class:`StateLayout` — the keys its state may hold and those that only come together — so that a
foreign or incomplete state fails at ``restore`` with the keys named, not with a ``KeyError`` in the next batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

BALANCE_KEYS = ("balance.input_mean", "balance.score", "balance.anchor_age", "balance.pool_count",
                "balance.pool_sum", "balance.pool_squares")
"""The state entries of a :class:`~device_agents.tta.statistics.ClassBalanceDetector` (under its prefix)."""
BALANCE_POOL = ("balance.pool_sum", "balance.pool_squares")
"""Entries the detector reads while its pool count (``balance.pool_count``) is above 0."""
ESTIMATE_SUFFIXES = (".ema_mean", ".ema_sq")
"""The running statistics estimate of one layer: ``<prefix><layer>.ema_mean`` and ``.ema_sq``, always a pair."""


class TTASnapshot(dict[str, np.ndarray]):
    """A method's state as :meth:`~device_agents.tta.base.TTAMethod.snapshot` returns it: a dict of numpy
    arrays (it compares, iterates and copies as one) that also records the name of the method that took it
    (``method``)."""

    method: str

    def __init__(self, method: str, state: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(state or {})
        self.method = method

    def __repr__(self) -> str:
        return f"TTASnapshot({self.method!r}, {dict.__repr__(self)})"


@dataclass(frozen=True)
class StateLayout:
    """The keys a method's state may hold.

    ``statistics``: the prefix of a running statistics estimate (:data:`ESTIMATE_SUFFIXES` pairs per layer,
    and the class-balance detector's :data:`BALANCE_KEYS`), None for a method without one; ``groups``: keys
    present together or not at all (e.g. the CMA-ES arrays); ``optional``: other keys it may hold alone. The
    default layout is that of a stateless method: nothing.
    """

    statistics: str | None = None
    groups: tuple[tuple[str, ...], ...] = ()
    optional: tuple[str, ...] = ()

    def owns(self, key: str) -> bool:
        """Whether a state of this layout may hold ``key``."""
        if key in self.optional or any(key in group for group in self.groups):
            return True
        if self.statistics is None or not key.startswith(self.statistics):
            return False
        rest = key[len(self.statistics):]
        return rest in BALANCE_KEYS or any(rest.endswith(s) and len(rest) > len(s) for s in ESTIMATE_SUFFIXES)

    def problem(self, state: Mapping[str, np.ndarray]) -> str | None:
        """What makes ``state`` (string keys, array values) no state of this layout, or None when it is one:
        keys it never holds, or keys without those they come with."""
        unknown = sorted(key for key in state if not self.owns(key))
        if unknown:
            return f"it holds {_names(unknown)}, which this method's state never holds"
        for group in self.groups:
            missing = [key for key in group if key not in state]
            if 0 < len(missing) < len(group):
                return f"it holds {_names(k for k in group if k in state)} without {_names(missing)}"
        if self.statistics is None:
            return None
        p = self.statistics
        for key in sorted(state):
            for suffix, partner in zip(ESTIMATE_SUFFIXES, reversed(ESTIMATE_SUFFIXES), strict=True):
                if key.endswith(suffix) and key[: -len(suffix)] + partner not in state:
                    return f"it holds {key!r} without {key[: -len(suffix)] + partner!r}"
        count = state.get(f"{p}balance.pool_count")
        if count is not None and np.any(np.asarray(count) > 0):
            missing = [f"{p}{key}" for key in BALANCE_POOL if f"{p}{key}" not in state]
            if missing:
                return f"it holds a positive {p + 'balance.pool_count'!r} without {_names(missing)}"
        return None


def _names(keys: Iterable[str]) -> str:
    """``'a', 'b'`` for messages."""
    return ", ".join(repr(k) for k in keys)
