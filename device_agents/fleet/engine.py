"""Engines that run a fleet's workers: in-process (a bounded thread pool) and Ray (one actor per worker).

Both split the devices into ``workers`` groups (:class:`~device_agents.fleet.worker.FleetWorker`: one shared
inference session and gRPC channel per group) and expose the same four steps the simulator drives:
``setup`` → per round ``run_round`` and (after the server's round) ``sync`` → ``finish``. Ray is imported
only by :class:`RayEngine`, so neither the device install nor the in-process engine needs it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, Protocol

from device_agents.fleet.scenarios import DeviceSpec
from device_agents.fleet.worker import DeviceRound, FleetConfig, FleetWorker

logger = logging.getLogger(__name__)
ENGINES: tuple[str, ...] = ("inprocess", "ray")
Progress = Callable[[int], None]


class Engine(Protocol):
    """The steps the simulator drives (results come back in device-index order)."""

    name: str
    workers: int

    def setup(self) -> list[dict[str, Any]]:
        """Register devices and load the bundle in every worker; one summary per worker."""
        ...

    def run_round(self, round_index: int, progress: Progress | None = None) -> list[DeviceRound]:
        """Process the round's batches on every device; online devices contribute."""
        ...

    def sync(self, round_index: int, progress: Progress | None = None) -> list[DeviceRound]:
        """Online devices sync (upload, receive and apply updates)."""
        ...

    def finish(self) -> list[dict[str, Any]]:
        """Per-device summaries; releases the workers."""
        ...

    def close(self) -> None:
        """Release everything (safe after finish and after a failure)."""
        ...


def split(specs: Sequence[DeviceSpec], workers: int) -> list[list[DeviceSpec]]:
    """``workers`` contiguous groups of nearly equal size (empty groups dropped)."""
    if workers <= 0:
        raise ValueError(f"workers must be a positive integer, got {workers}")
    n = len(specs)
    bounds = [round(n * k / workers) for k in range(workers + 1)]
    return [list(specs[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def _ordered(groups: Sequence[Sequence[Any]], key: Callable[[Any], int]) -> list[Any]:
    return sorted((item for group in groups for item in group), key=key)


class InProcessEngine:
    """Workers on a thread pool of ``workers`` threads in this process (the server may share it)."""

    name = "inprocess"

    def __init__(self, specs: Sequence[DeviceSpec], config: FleetConfig, workers: int = 4) -> None:
        self._workers = [FleetWorker(group, config) for group in split(specs, workers)]
        self.workers = len(self._workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fleet-worker")

    def setup(self) -> list[dict[str, Any]]:
        """Set every worker up in parallel."""
        return list(self._pool.map(lambda w: w.setup(), self._workers))

    def run_round(self, round_index: int, progress: Progress | None = None) -> list[DeviceRound]:
        """Run the round on every worker in parallel."""
        groups = self._pool.map(lambda w: w.run_round(round_index, progress), self._workers)
        return _ordered(list(groups), key=lambda r: r.index)

    def sync(self, round_index: int, progress: Progress | None = None) -> list[DeviceRound]:
        """Sync every worker's online devices in parallel."""
        groups = self._pool.map(lambda w: w.sync(round_index, progress), self._workers)
        return _ordered(list(groups), key=lambda r: r.index)

    def finish(self) -> list[dict[str, Any]]:
        """Collect per-device summaries."""
        return _ordered(list(self._pool.map(lambda w: w.finish(), self._workers)), key=lambda d: d["index"])

    def close(self) -> None:
        """Close the workers and stop the pool."""
        for worker in self._workers:
            worker.close()
        self._pool.shutdown(wait=True)


def import_ray() -> Any:
    """``ray``, or a ``RuntimeError`` saying how to install it (the ``fleet`` extra)."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("the ray engine needs Ray: pip install 'edgeloop[fleet]' (or pip install ray)") from exc
    return ray


class RayEngine:
    """One Ray actor per worker, on a local Ray instance or an existing cluster (``address``).

    ``address`` None starts a local instance (:func:`start_ray`) unless Ray is already connected; ``"auto"`` or
    ``"ray://host:port"``/``"host:port"`` joins a running cluster. Actors reach the
    edgeloop server at ``config.server``: on a multi-machine cluster that address must be reachable from
    every node (``edgeloop simulate --server``). Each actor asks for ``cpus_per_worker`` CPUs.
    """

    name = "ray"

    def __init__(self, specs: Sequence[DeviceSpec], config: FleetConfig, workers: int = 2, *,
                 address: str | None = None, cpus_per_worker: float = 0.5) -> None:
        ray = import_ray()
        self._ray = ray
        self._started = start_ray(address)
        actor_class = ray.remote(num_cpus=cpus_per_worker)(FleetWorker)
        groups = split(specs, workers)
        self._sizes = [len(g) for g in groups]
        self._actors = [actor_class.remote(group, config) for group in groups]
        self.workers = len(self._actors)
        self.address = address or "local"

    def _gather(self, refs: list[Any], counts: list[int] | None, progress: Progress | None) -> list[Any]:
        """Results in submission order, reporting each actor's devices to ``progress`` as it finishes."""
        ray = self._ray
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        results: list[Any] = [None] * len(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                if progress is not None and counts is not None:
                    progress(counts[index[ref]])
        return results

    def setup(self) -> list[dict[str, Any]]:
        """Set every actor up."""
        return self._gather([a.setup.remote() for a in self._actors], None, None)

    def run_round(self, round_index: int, progress: Progress | None = None) -> list[DeviceRound]:
        """Run the round on every actor."""
        refs = [a.run_round.remote(round_index) for a in self._actors]
        return _ordered(self._gather(refs, self._sizes, progress), key=lambda r: r.index)

    def sync(self, round_index: int, progress: Progress | None = None) -> list[DeviceRound]:
        """Sync every actor's online devices."""
        refs = [a.sync.remote(round_index) for a in self._actors]
        return _ordered(self._gather(refs, self._sizes, progress), key=lambda r: r.index)

    def finish(self) -> list[dict[str, Any]]:
        """Collect per-device summaries."""
        return _ordered(self._gather([a.finish.remote() for a in self._actors], None, None), key=lambda d: d["index"])

    def close(self) -> None:
        """Kill the actors; shut Ray down when this engine started it."""
        for actor in getattr(self, "_actors", []):
            try:
                self._ray.kill(actor)
            except Exception as exc:  # an actor that already died
                logger.debug("killing actor: %s", exc)
        self._actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False


def start_ray(address: str | None = None, num_cpus: int | None = None,
              object_store_bytes: int = 128 << 20) -> bool:
    """Connect to Ray unless already connected: a local instance (``address`` None; no dashboard, a small object
    store) or the cluster at ``address``. Returns whether this call connected (the caller then shuts it down).

    Call it before this process starts gRPC servers or channels: Ray forks its helpers, and a fork while gRPC
    threads run is what gRPC warns about. A local instance that fails to come up (Ray's node start-up can time
    out on a loaded machine) is tried once more.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    attempts = 2 if address is None else 1
    for attempt in range(1, attempts + 1):
        try:
            if address is None:
                ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_bytes,
                         log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            return True
        except Exception as exc:  # ray raises bare Exceptions (e.g. a node that timed out at start-up)
            ray.shutdown()
            if attempt < attempts:
                logger.warning("starting a local Ray instance failed (%s); trying once more", exc)
                continue
            _ray_failed(address, exc)
    return True


def _ray_failed(address: str | None, exc: Exception) -> NoReturn:
    """Raise the ``RuntimeError`` that says which Ray could not be reached, with a hint for explicit addresses."""
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    hint = ""
    if address not in (None, "auto"):
        hint = ("; on this machine's own cluster try --address auto, and for a cluster with token "
                "authentication set RAY_AUTH_MODE=token (Ray reads the token from ~/.ray/auth_token)")
    raise RuntimeError(f"could not start or join {where}: {exc}{hint}") from exc


def create_engine(name: str, specs: Sequence[DeviceSpec], config: FleetConfig, *, workers: int,
                  address: str | None = None) -> Engine:
    """The engine ``name`` (one of :data:`ENGINES`) over ``specs``."""
    if name == "inprocess":
        if address is not None:
            raise ValueError("--address joins a Ray cluster; it needs --engine ray")
        return InProcessEngine(specs, config, workers)
    if name == "ray":
        return RayEngine(specs, config, workers, address=address)
    raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
