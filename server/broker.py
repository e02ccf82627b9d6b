"""Wake-ups for update watchers: threads block on a condition variable until a newer version is published."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class UpdateBroker:
    """Tracks the newest published update version (over all bundles) and wakes waiting watchers.

    Watchers call :meth:`wait_for` with the newest version they have seen; it returns when a newer one is
    published, the timeout passes, the broker shuts down, or the watcher's ``cancelled`` predicate turns true
    after a :meth:`wake`. There is no polling: waits end only on notifications or timeouts.
    """

    def __init__(self, latest_version: int = 0, max_watchers: int | None = None) -> None:
        """Start from ``latest_version``, the newest version already stored; allow ``max_watchers`` watches."""
        if max_watchers is not None and max_watchers < 1:
            raise ValueError(f"max_watchers must be positive, got {max_watchers}")
        self._cond = threading.Condition()
        self._latest = int(latest_version)
        self._closed = False
        self._waiting = 0
        self._watchers = 0
        self._max_watchers = max_watchers

    def try_open_watch(self) -> bool:
        """Take a watch slot; False when ``max_watchers`` are already open. Pair with :meth:`close_watch`."""
        with self._cond:
            if self._max_watchers is not None and self._watchers >= self._max_watchers:
                return False
            self._watchers += 1
            return True

    def close_watch(self) -> None:
        """Give back a slot taken by :meth:`try_open_watch`."""
        with self._cond:
            self._watchers = max(0, self._watchers - 1)

    @property
    def watchers(self) -> int:
        """How many watch slots are taken."""
        with self._cond:
            return self._watchers

    @property
    def latest(self) -> int:
        """The newest published version."""
        with self._cond:
            return self._latest

    @property
    def waiting(self) -> int:
        """How many threads are blocked in :meth:`wait_for` right now."""
        with self._cond:
            return self._waiting

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        with self._cond:
            return self._closed

    def publish(self, version: int = 0) -> None:
        """Record that an update (``version`` of some cohort) is stored and wake every watcher.

        Versions count per cohort, so :attr:`latest` counts publications: it grows by one per call (and
        never falls below the largest ``version`` seen), which is all a watcher needs to know it must look.
        """
        with self._cond:
            self._latest = max(self._latest + 1, int(version))
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every watcher so each re-checks its ``cancelled`` predicate (e.g. after an RPC ended)."""
        with self._cond:
            self._cond.notify_all()

    def shutdown(self) -> None:
        """Release every current and future waiter; used when the server stops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(
        self, since_version: int, timeout: float | None, cancelled: Callable[[], bool] | None = None
    ) -> bool:
        """Block until a version newer than ``since_version`` exists; return whether one does.

        Returns early (False unless a newer version exists) on timeout, shutdown, or when ``cancelled()``
        is true at a wake-up. ``timeout`` None waits without a deadline.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._latest <= since_version and not self._closed:
                if cancelled is not None and cancelled():
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1
            return self._latest > since_version
