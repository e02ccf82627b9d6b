"""Rounds: federated averaging and distillation jobs, run one at a time off the RPC threads.

:class:`RoundRunner` records each round (queued → running → done | failed, with error text, timing and
metrics) and runs it on a single worker thread, so ``StartRound`` returns at once and rounds never overlap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import numpy as np

from server.aggregation import Aggregator, Contribution, FedAvg
from server.codec import decode_array, decode_arrays
from server.errors import (
    DistillerUnavailableError,
    InvalidRequestError,
    InvalidTensorError,
    NothingToAggregateError,
    ServerShuttingDownError,
    UnknownRoundError,
)
from server.records import DEFAULT_COHORT, RoundRecord, SubmissionRecord
from server.state import ServerState, check_id, resolve_bundle, sample_tensor
from server.updates import current_params, publish_update

logger = logging.getLogger(__name__)
ROUND_KINDS = ("fedavg", "distill")


@dataclass(frozen=True)
class DistillResult:
    """New student parameters (same names and shapes as given) and metrics of the distillation."""

    params: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Distiller(Protocol):
    """Turns uploaded inputs and the student's current adaptable parameters into better parameters."""

    def distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int) -> DistillResult:
        """Distil a teacher's predictions on ``samples_x`` (N, C, H, W) into the student's parameters."""
        ...


def fedavg(contributions: Sequence[tuple[int, Mapping[str, np.ndarray]]],
           base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sample-count-weighted mean per parameter (McMahan et al. 2017, FedAvg, Alg. 1 server step).

    ``contributions`` are ``(num_samples, params)``; a parameter that no contribution carries keeps its
    ``base`` value, one carried by some contributions is averaged over those. Returns float32 arrays.
    A shorthand for :class:`server.aggregation.FedAvg`.
    """
    given = [Contribution(f"#{i}", params, float(w)) for i, (w, params) in enumerate(contributions)]
    return FedAvg().aggregate(base, given).params


def latest_per_device(submissions: Sequence[SubmissionRecord]) -> list[SubmissionRecord]:
    """The newest submission of each device (by id), ordered by device id."""
    latest: dict[str, SubmissionRecord] = {}
    for s in submissions:
        if s.device_id not in latest or (s.id or 0) > (latest[s.device_id].id or 0):
            latest[s.device_id] = s
    return [latest[d] for d in sorted(latest)]


@dataclass(frozen=True)
class _Job:
    bundle_id: str
    cohort: str
    limit: int
    steps: int


@dataclass(frozen=True)
class _Outcome:
    update_version: int
    samples_used: int
    metrics: dict[str, float]


class RoundRunner:
    """Queues rounds on a single worker thread and records their progress in storage."""

    def __init__(
        self, state: ServerState, *, distiller: Distiller | None = None,
        distiller_factory: Callable[[], Distiller] | None = None, default_steps: int = 50,
        max_samples: int = 4096, on_change: Callable[[RoundRecord], None] | None = None,
        aggregator: Aggregator | None = None,
    ) -> None:
        """``distiller`` is used as is; otherwise ``distiller_factory`` builds one on the first distill round.

        ``aggregator`` combines the submissions of "fedavg" rounds (default :class:`FedAvg`); it lives as long
        as the runner, so stateful strategies (FedAU's participation, DP's accountant) span rounds.

        ``on_change`` (e.g. metrics) is called with each round's record when it is queued, done or failed.
        """
        if default_steps <= 0 or max_samples <= 0:
            raise ValueError(f"default_steps {default_steps} and max_samples {max_samples} must be positive")
        self.state = state
        self.default_steps = default_steps
        self.max_samples = max_samples
        self._distiller = distiller
        self._factory = distiller_factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeloop-round")
        self._futures: dict[int, Future[None]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._on_change = on_change
        self.aggregator = aggregator or FedAvg()

    def _changed(self, record: RoundRecord) -> None:
        if self._on_change is not None:
            self._on_change(record)

    def start(self, kind: str, max_samples: int = 0, steps: int = 0, cohort: str = "") -> RoundRecord:
        """Check the round can run now, record it as queued and schedule it; return the queued record.

        The round's update is published to ``cohort`` ("": the default cohort); its inputs are the bundle's
        unused samples or submissions from every device.
        """
        if kind not in ROUND_KINDS:
            raise InvalidRequestError(f"round kind {kind!r} is not one of {ROUND_KINDS}")
        if max_samples < 0 or steps < 0:
            raise InvalidRequestError(f"max_samples {max_samples} and steps {steps} must be >= 0")
        cohort = check_id(cohort or DEFAULT_COHORT, "cohort")
        if self._closed:
            raise ServerShuttingDownError("the server is shutting down; no new rounds")
        bundle_id = resolve_bundle(self.state, "").bundle_id
        self._check_ready(kind, bundle_id)
        limit = min(max_samples or self.max_samples, self.max_samples)
        with self._lock:
            if self._closed:
                raise ServerShuttingDownError("the server is shutting down; no new rounds")
            record = self.state.storage.create_round(kind, self.state.clock())
            job = _Job(bundle_id, cohort, limit, steps or self.default_steps)
            future = self._executor.submit(self._run, record, job)
            self._futures[record.round_id] = future
        self._changed(record)
        logger.info("round %d (%s) queued for bundle %s", record.round_id, kind, bundle_id)
        return record

    def _check_ready(self, kind: str, bundle_id: str) -> None:
        storage = self.state.storage
        if kind == "fedavg" and not storage.unused_submissions(bundle_id):
            raise NothingToAggregateError(f"no unused federated submissions for bundle {bundle_id}")
        if kind == "distill":
            if self._distiller is None and self._factory is None:
                raise DistillerUnavailableError("no distiller is configured (teacher/student checkpoints)")
            if not storage.unused_samples(bundle_id, limit=1, with_input=True):
                raise NothingToAggregateError(f"no unused samples with inputs for bundle {bundle_id}")

    def get(self, round_id: int) -> RoundRecord:
        """The round's current record, or :class:`UnknownRoundError`."""
        record = self.state.storage.get_round(round_id)
        if record is None:
            raise UnknownRoundError(f"unknown round {round_id}")
        return record

    def wait(self, round_id: int, timeout: float | None = None) -> RoundRecord:
        """Block until a round started by this runner finishes or ``timeout`` passes; return its record then."""
        with self._lock:
            future = self._futures.get(round_id)
        if future is not None:
            try:
                future.exception(timeout=timeout)
            except FuturesTimeoutError:
                logger.debug("round %d still running after %.1fs", round_id, timeout or 0.0)
        return self.get(round_id)

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new rounds; with ``wait``, finish the queued and running ones first."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def _run(self, record: RoundRecord, job: _Job) -> None:
        storage = self.state.storage
        running = replace(record, state="running")
        storage.save_round(running)
        t0 = time.perf_counter()
        try:
            if record.kind == "fedavg":
                outcome = self._fedavg(record.round_id, job)
            else:
                outcome = self._distill(record.round_id, job)
        except Exception as exc:  # recorded on the round and logged, not swallowed
            logger.exception("round %d (%s) failed", record.round_id, record.kind)
            failed = replace(running, state="failed", error=f"{type(exc).__name__}: {exc}",
                             seconds=time.perf_counter() - t0)
            storage.save_round(failed)
            self._changed(failed)
            return
        done = replace(running, state="done", update_version=outcome.update_version,
                       samples_used=outcome.samples_used, metrics=outcome.metrics, seconds=time.perf_counter() - t0)
        storage.save_round(done)
        self._changed(done)
        logger.info("round %d (%s) done: update v%d", record.round_id, record.kind, outcome.update_version)

    def _fedavg(self, round_id: int, job: _Job) -> _Outcome:
        bundle_id = job.bundle_id
        unused = self.state.storage.unused_submissions(bundle_id)
        chosen = latest_per_device(unused)
        if not chosen:
            raise NothingToAggregateError(f"no unused federated submissions for bundle {bundle_id}")
        base, base_version = current_params(self.state, bundle_id, job.cohort)
        contributions = [Contribution(s.device_id, decode_arrays(self.state.blobs.get(s.blob)), float(s.num_samples),
                                      staleness=max(0, base_version - s.base_version)) for s in chosen]
        result = self.aggregator.aggregate(base, contributions)
        averaged = result.params
        update = publish_update(self.state, bundle_id, "fedavg", averaged, round_id=round_id, cohort=job.cohort)
        self.state.storage.mark_submissions_used([s.id for s in unused if s.id is not None], round_id)
        total = sum(s.num_samples for s in chosen)
        change = float(np.sqrt(sum(float(np.sum((averaged[k] - base[k]) ** 2)) for k in base)))
        metrics = {"submissions": float(len(chosen)), "superseded": float(len(unused) - len(chosen)),
                   "total_weight": float(total), "base_version": float(base_version), "update_norm": change}
        metrics.update({f"{self.aggregator.name}_{k}": v for k, v in result.metrics.items()})
        return _Outcome(update.version, total, metrics)

    def _distiller_instance(self) -> Distiller:
        if self._distiller is None:
            if self._factory is None:
                raise DistillerUnavailableError("no distiller is configured")
            self._distiller = self._factory()
        return self._distiller

    def _distill(self, round_id: int, job: _Job) -> _Outcome:
        bundle_id = job.bundle_id
        samples = self.state.storage.unused_samples(bundle_id, limit=job.limit, with_input=True)
        if not samples:
            raise NothingToAggregateError(f"no unused samples with inputs for bundle {bundle_id}")
        # Arrival order interleaves devices at random; a fixed order makes the round reproducible.
        samples.sort(key=lambda s: (s.device_id, s.stream_position, s.sample_id))
        x = np.stack([decode_array(sample_tensor(self.state, s.input_blob)) for s in samples if s.input_blob])
        base, _ = current_params(self.state, bundle_id, job.cohort)
        result = self._distiller_instance().distill(x.astype(np.float32, copy=False), base, job.steps)
        if set(result.params) != set(base):
            raise InvalidTensorError(f"distiller returned parameters {sorted(result.params)}, "
                                     f"expected {sorted(base)}")
        update = publish_update(self.state, bundle_id, "distill", result.params, round_id=round_id,
                                cohort=job.cohort)
        self.state.storage.mark_samples_used([s.sample_id for s in samples], round_id)
        metrics = {str(k): float(v) for k, v in result.metrics.items()}
        metrics["samples"] = float(len(samples))
        return _Outcome(update.version, len(samples), metrics)
