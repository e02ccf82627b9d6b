"""Rounds: federated averaging and distillation jobs, run one at a time off the RPC threads.

:class:`RoundRunner` records each round (queued → running → done | failed, with error text, timing and
metrics) and runs it on a single worker thread, so ``StartRound`` returns at once and rounds never overlap.

Synchronous strategies run when an operator starts a round (``StartRound``). An asynchronous one (FedBuff)
runs by itself: the registry calls :meth:`RoundRunner.on_submission` after each submission is committed, and
once a bundle's cohort holds ``buffer_size`` unused submissions the worker aggregates the oldest K readable ones and
publishes a new version of that cohort (a round of kind ``"fedbuff"``). The buffer *is* the registry's table of
unused submissions, so a restart loses nothing: a half-full buffer is still there and fills up with the next
submissions. Each round records which submissions it takes and the strategy's state before it publishes; a
round a crash interrupted is completed (its update was published) or failed (its submissions stay unused) when
the runner starts.

An input that can never be read again is quarantined rather than retried forever: every round reads its inputs
(submissions' parameter blobs, samples' input tensors) before it aggregates, and one whose blob is missing
(:class:`BlobNotFoundError`), no longer matches its digest (:class:`BlobCorruptError`), does not decode
(:class:`CodecError`) or is named by a malformed digest is logged, marked used by that round at once (so no
later round picks it again) and left out; the round goes on with the rest and counts them in its metrics
(``unreadable_submissions`` / ``unreadable_samples``). When nothing readable is left the round fails with
:class:`NothingToAggregateError` (its unreadable inputs stay quarantined). A FedBuff step the server runs by
itself always aggregates K readable submissions: it replaces each unreadable one it quarantines with the next
oldest unused submission, and when fewer than K readable are left it publishes nothing (a failed round records
the quarantine) and the readable ones stay buffered for the next submissions. Any other failure (the strategy, the
publish, the registry), and a crash, is transient: the round fails and its readable inputs stay unused for the
next one (what it quarantined stays so).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import numpy as np

from server.aggregation import AggregateResult, Aggregator, Contribution, FedAvg
from server.codec import CodecError, decode_array, decode_arrays
from server.errors import (
    BlobCorruptError,
    BlobNotFoundError,
    DistillerUnavailableError,
    InvalidRequestError,
    InvalidTensorError,
    NothingToAggregateError,
    ServerShuttingDownError,
    StorageError,
    UnknownRoundError,
)
from server.records import DEFAULT_COHORT, AggregatorStateRecord, RoundRecord, SampleRecord, SubmissionRecord
from server.state import ServerState, check_id, require_parameters, resolve_bundle, sample_tensor
from server.updates import current_params, nonnegative_names, publish_update, version_params

logger = logging.getLogger(__name__)
ROUND_KINDS = ("fedavg", "distill")
ASYNC_ROUND_KIND = "fedbuff"  # the kind recorded for the rounds an asynchronous strategy runs by itself
_BASE_CACHE = 64  # exact parameter sets of recent versions kept for computing deltas
# What makes an input unreadable for good (quarantined, never retried): its blob is gone, corrupt, undecodable, or
# named by a malformed digest (the blob store's InvalidRequestError; reading raises nothing else of that kind).
_UNREADABLE = (BlobNotFoundError, BlobCorruptError, CodecError, InvalidRequestError)


@dataclass(frozen=True)
class DistillResult:
    """New student parameters (same names and shapes as given) and metrics of the distillation."""

    params: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Distiller(Protocol):
    """Turns uploaded inputs and the student's current adaptable parameters into better parameters."""

    def distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int,
                nonnegative: frozenset[str] = frozenset()) -> DistillResult:
        """Distil a teacher's predictions on ``samples_x`` (N, C, H, W) into the student's parameters, keeping
        those named in ``nonnegative`` >= 0 (the bundle's ``nonnegative_params``: the server still projects
        the result onto them when it publishes it)."""
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
    return [newest[0] for newest in by_device_newest_first(submissions)]


def by_device_newest_first(submissions: Sequence[SubmissionRecord]) -> list[list[SubmissionRecord]]:
    """The submissions of each device, newest (highest id) first; the devices ordered by id."""
    per_device: dict[str, list[SubmissionRecord]] = {}
    for s in submissions:
        per_device.setdefault(s.device_id, []).append(s)
    return [sorted(per_device[d], key=lambda s: s.id or 0, reverse=True) for d in sorted(per_device)]


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
    """Queues rounds on a single worker thread and records their progress in storage.

    One runner per registry: two live runners with an asynchronous strategy would both aggregate its buffers.
    """

    def __init__(
        self, state: ServerState, *, distiller: Distiller | None = None,
        distiller_factory: Callable[[], Distiller] | None = None, default_steps: int = 50,
        max_samples: int = 4096, on_change: Callable[[RoundRecord], None] | None = None,
        aggregator: Aggregator | None = None, max_steps: int = 10_000,
    ) -> None:
        """``distiller`` is used as is; otherwise ``distiller_factory`` builds one on the first distill round.

        A distill round runs ``default_steps`` steps over at most ``max_samples`` samples unless
        :meth:`start` asks for others, up to ``max_steps`` steps and ``max_samples`` samples (the server's
        ``max_distill_steps`` and ``round_max_samples``).

        ``aggregator`` combines the submissions of "fedavg" rounds (default :class:`FedAvg`); it lives as long
        as the runner, so stateful strategies (FedAU's participation, DP's accountant) span rounds.

        ``on_change`` (e.g. metrics) is called with each round's record when it is queued, done or failed.

        Starting, the runner restores the strategy's persisted state (a corrupt or foreign one raises
        :class:`StorageError`), settles rounds a crash left unfinished, and with an asynchronous strategy
        subscribes to new submissions and aggregates every buffer already full.
        """
        if default_steps <= 0 or max_samples <= 0:
            raise ValueError(f"default_steps {default_steps} and max_samples {max_samples} must be positive")
        if not default_steps <= max_steps:
            raise ValueError(f"default_steps {default_steps} exceeds max_steps {max_steps}")
        self.state = state
        self.default_steps = default_steps
        self.max_steps = max_steps
        self.max_samples = max_samples
        self._distiller = distiller
        self._factory = distiller_factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeloop-round")
        self._futures: dict[int, Future[None]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._on_change = on_change
        self.aggregator = aggregator or FedAvg()
        self._pending: set[tuple[str, str]] = set()  # (bundle, cohort) buffers with a check queued
        self._bases: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}
        self._quarantined: dict[int, dict[str, float]] = {}  # round id → its unreadable-input counts (worker only)
        self._load_aggregator_state()
        self._settle_unfinished()
        if self.aggregator.asynchronous:
            state.storage.add_submission_listener(self.on_submission)
            for bundle_id, cohort, _ in state.storage.unused_submission_groups():
                self._schedule_drain(bundle_id, cohort)

    def _changed(self, record: RoundRecord) -> None:
        if self._on_change is not None:
            self._on_change(record)

    def start(self, kind: str, max_samples: int = 0, steps: int = 0, cohort: str = "") -> RoundRecord:
        """Check the round can run now, record it as queued and schedule it; return the queued record.

        The round's update is published to ``cohort`` ("": the default cohort); its inputs are the bundle's
        unused samples, or the unused submissions of the cohort's devices. With an asynchronous strategy a
        "fedavg" round flushes the cohort's partly filled buffer (one step over every unused submission).

        ``steps`` (0: ``default_steps``) and ``max_samples`` (0: ``max_samples`` of the runner) beyond the
        runner's ``max_steps`` / ``max_samples`` raise :class:`InvalidRequestError` naming the field, the value
        and the server setting that bounds it, whatever the kind; nothing is queued or recorded then.
        """
        if kind not in ROUND_KINDS:
            raise InvalidRequestError(f"round kind {kind!r} is not one of {ROUND_KINDS}")
        if max_samples < 0 or steps < 0:
            raise InvalidRequestError(f"max_samples {max_samples} and steps {steps} must be >= 0")
        if steps > self.max_steps:
            raise InvalidRequestError(f"steps {steps} exceeds the server's limit of {self.max_steps} optimizer steps "
                                      "per round (max_distill_steps in its config)")
        if max_samples > self.max_samples:
            raise InvalidRequestError(f"max_samples {max_samples} exceeds the server's limit of {self.max_samples} "
                                      "samples per round (round_max_samples in its config)")
        cohort = check_id(cohort or DEFAULT_COHORT, "cohort")
        if self._closed:
            raise ServerShuttingDownError("the server is shutting down; no new rounds")
        bundle = resolve_bundle(self.state, "")
        bundle_id = bundle.bundle_id
        what = "a distillation round (the student is the bundle's adaptable graph)" if kind == "distill" else \
            f"a federated round ({kind})"
        require_parameters(bundle, what, adaptable=kind == "distill")
        self._check_ready(kind, bundle_id, cohort)
        limit = max_samples or self.max_samples
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

    def _check_ready(self, kind: str, bundle_id: str, cohort: str = DEFAULT_COHORT) -> None:
        storage = self.state.storage
        if kind == "fedavg" and not storage.unused_submissions(bundle_id, cohort):
            raise NothingToAggregateError(f"no unused federated submissions for bundle {bundle_id} "
                                          f"in cohort {cohort!r}")
        if kind == "distill":
            if self._distiller is None and self._factory is None:
                raise DistillerUnavailableError("no distiller is configured (teacher/student checkpoints)")
            if not storage.unused_samples(bundle_id, limit=1, with_input=True):
                raise NothingToAggregateError(f"no unused samples with inputs for bundle {bundle_id}")

    # -- asynchronous aggregation ---------------------------------------------------------------------------
    def on_submission(self, submission: SubmissionRecord) -> None:
        """Hook called once a submission is durably stored: with an asynchronous strategy, schedule a check of
        its bundle's cohort buffer on the worker (one queued check per buffer; never blocks the caller)."""
        if self.aggregator.asynchronous:
            self._schedule_drain(submission.bundle_id, submission.cohort or DEFAULT_COHORT)

    def _schedule_drain(self, bundle_id: str, cohort: str) -> None:
        key = (bundle_id, cohort)
        with self._lock:
            if self._closed or key in self._pending:
                return  # a queued check has not started yet, so it will see this submission
            self._pending.add(key)
            try:
                self._executor.submit(self._drain, bundle_id, cohort)
            except RuntimeError:  # the executor is shutting down: the submission waits in the registry
                self._pending.discard(key)

    def _drain(self, bundle_id: str, cohort: str) -> None:
        """Run one FedBuff step per K readable submissions, oldest first, until fewer than K are left.

        Every step aggregates exactly K readable submissions: one found unreadable is quarantined and the buffer
        is topped up with the next oldest unused one. When the unused submissions hold fewer than K readable
        ones, the unreadable ones are quarantined (by a failed round that says so) and the readable ones stay
        buffered until later submissions complete the buffer. A step that failed otherwise stops draining (its
        readable submissions stay unused, and the next submission's check retries them)."""
        with self._lock:
            self._pending.discard((bundle_id, cohort))  # from here on, a new submission queues a new check
        k = self.aggregator.buffer_size
        while len(self.state.storage.unused_submissions(bundle_id, cohort, limit=k)) >= k:  # no blob read below K
            if not self._async_step(bundle_id, cohort):
                return

    def _fill_buffer(self, bundle_id: str, cohort: str, k: int
                     ) -> tuple[list[tuple[SubmissionRecord, dict[str, np.ndarray]]],
                                list[tuple[SubmissionRecord, Exception]]]:
        """Read the cohort's unused submissions, oldest first, until ``k`` are readable or none is left:
        (the readable ones with their parameters, at most ``k``; the unreadable ones met on the way, with why).

        Only the worker marks submissions used and new ones get higher ids, so each query's rows extend the
        previous query's; each blob is read once."""
        readable: list[tuple[SubmissionRecord, dict[str, np.ndarray]]] = []
        bad: list[tuple[SubmissionRecord, Exception]] = []
        read, limit = 0, k
        while True:
            rows = self.state.storage.unused_submissions(bundle_id, cohort, limit=limit)
            for s in rows[read:]:
                try:
                    readable.append((s, self._submission_params(s)))
                except _UNREADABLE as exc:
                    bad.append((s, exc))
                if len(readable) == k:
                    return readable, bad
            if len(rows) < limit:  # every unused submission has been read
                return readable, bad
            read, limit = len(rows), len(rows) + k - len(readable)

    def _async_step(self, bundle_id: str, cohort: str) -> bool:
        """One FedBuff step run by the server itself over the buffer :meth:`_fill_buffer` reads, in three
        commits: the round (running) with its claimed inputs and the strategy's state; the published update; the
        inputs marked used with the round done.

        The unreadable submissions met while reading are quarantined first (marked used by this step's round,
        recorded as running before the step for that). With K readable ones the step aggregates them; with fewer
        (the unused submissions ran out) it publishes nothing: the round is recorded failed, naming the
        quarantined submissions, and the readable ones stay unused for a later, complete buffer. Returns whether
        draining may go on: True when the step published; False when it waits for more submissions, or after any
        other failure (recorded on the round; the readable submissions stay unused for a retry)."""
        storage, t0, k = self.state.storage, time.perf_counter(), self.aggregator.buffer_size
        record: RoundRecord | None = None
        unreadable: dict[str, float] = {}
        try:
            readable, bad = self._fill_buffer(bundle_id, cohort, k)
            if bad:  # the quarantined submissions are marked used by this step's round: record it first
                record = storage.start_round(ASYNC_ROUND_KIND, self.state.clock(), [])
                self._quarantine_submissions(record.round_id, bad)
                unreadable = self._quarantined.pop(record.round_id)
            if len(readable) < k:
                if record is None:  # nothing was quarantined: nothing to record (the caller saw K unused)
                    return False
                ids = ", ".join(str(s.id) for s, _ in bad)
                waiting = {**unreadable, "buffer_size": float(k), "buffered_submissions": float(len(readable))}
                failed = replace(record, state="failed", metrics=waiting, seconds=time.perf_counter() - t0,
                                 error=f"NothingToAggregateError: {len(bad)} submission(s) of the buffer of bundle "
                                       f"{bundle_id} cohort {cohort!r} are unreadable (quarantined: {ids}); the "
                                       f"{len(readable)} readable one(s) stay buffered until {k} are readable")
                storage.save_round(failed)
                self._changed(failed)
                logger.warning("round %d (%s): %s", failed.round_id, failed.kind, failed.error)
                return False
            result, outcome = self._fedbuff_step(bundle_id, cohort, readable, unreadable=len(bad))
            ids = [s.id for s, _ in readable if s.id is not None]
            if record is None:
                record = storage.start_round(ASYNC_ROUND_KIND, self.state.clock(), ids, self._state_record())
            else:
                storage.claim_submissions(record.round_id, ids, self._state_record())
            update = publish_update(self.state, bundle_id, "fedavg", result.params, round_id=record.round_id,
                                    cohort=cohort, project=True)
            self._remember(bundle_id, cohort, update.version, update.params)
            done = replace(record, state="done", update_version=update.version, samples_used=outcome.samples_used,
                           metrics=outcome.metrics, seconds=time.perf_counter() - t0)
            storage.finish_round(done, ids)
        except Exception as exc:  # recorded on the round and logged, not swallowed
            logger.exception("asynchronous %s step of bundle %s cohort %s failed", self.aggregator.name, bundle_id,
                             cohort)
            record = record or storage.create_round(ASYNC_ROUND_KIND, self.state.clock())
            failed = replace(record, state="failed", error=f"{type(exc).__name__}: {exc}",
                             metrics={**record.metrics, **unreadable}, seconds=time.perf_counter() - t0)
            storage.save_round(failed)
            self._changed(failed)
            return False
        self._changed(done)
        logger.info("round %d (%s) done: %s/v%d from %d submissions", done.round_id, done.kind, cohort,
                    update.version, len(readable))
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every round and buffer check queued so far has finished; False on timeout."""
        with self._lock:
            if self._closed:
                return True
            marker = self._executor.submit(lambda: None)
        try:
            marker.result(timeout=timeout)
        except FuturesTimeoutError:
            return False
        return True

    # -- persisted state and recovery -----------------------------------------------------------------------
    def _load_aggregator_state(self) -> None:
        agg = self.aggregator
        if agg.state_dict() is None:
            return
        record = self.state.storage.load_aggregator_state(agg.name)
        if record is None:
            return
        where = f"the saved state of aggregator {agg.name!r} (registry table aggregator_state)"
        if record.version != agg.state_version:
            raise StorageError(f"{where} has format version {record.version}; this server reads version "
                               f"{agg.state_version}. Move the registry aside or delete that row to start afresh")
        try:
            agg.load_state_dict(json.loads(record.state))
        except (ValueError, TypeError, KeyError, InvalidRequestError) as exc:
            raise StorageError(f"{where} is corrupt: {exc}. Delete that row to start afresh (this forgets the "
                               "state, e.g. the privacy budget already spent)") from exc
        logger.info("restored the state of aggregator %s (saved at %d ms)", agg.name, record.updated_ms)

    def _state_record(self) -> AggregatorStateRecord | None:
        state = self.aggregator.state_dict()
        if state is None:
            return None
        return AggregatorStateRecord(self.aggregator.name, self.aggregator.state_version,
                                     json.dumps(state, sort_keys=True), self.state.clock())

    def _settle_unfinished(self) -> None:
        """Rounds a stopped server left queued or running: done when their update was published (their claimed
        submissions are marked used; a distill round's samples already are), failed otherwise (their submissions
        stay for the next round, and the samples a distill round claimed are released for it)."""
        storage = self.state.storage
        for record in storage.unfinished_rounds():
            update = storage.update_of_round(record.round_id)
            if update is not None:
                claimed = storage.round_inputs(record.round_id)
                storage.mark_submissions_used(claimed, record.round_id)
                settled = replace(record, state="done", update_version=update.version,
                                  metrics={**record.metrics, "recovered": 1.0, "submissions": float(len(claimed))})
            else:
                storage.release_samples(record.round_id)  # a distill round's claimed samples serve the next one
                settled = replace(record, state="failed", error="interrupted: the server stopped before the round "
                                                               "published an update")
            storage.save_round(settled)
            logger.warning("round %d (%s) was left %s by a stopped server: now %s", record.round_id, record.kind,
                           record.state, settled.state)

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

    def _run(self, record: RoundRecord, job: _Job) -> bool:
        storage = self.state.storage
        running = replace(record, state="running")
        storage.save_round(running)
        t0 = time.perf_counter()
        try:
            if record.kind == "fedavg" and self.aggregator.asynchronous:  # an operator's flush of the buffer
                outcome = self._fedbuff(record.round_id, job)
            elif record.kind == "fedavg":
                outcome = self._fedavg(record.round_id, job)
            else:
                outcome = self._distill(record.round_id, job)
        except Exception as exc:  # recorded on the round and logged, not swallowed
            logger.exception("round %d (%s) failed", record.round_id, record.kind)
            failed = replace(running, state="failed", error=f"{type(exc).__name__}: {exc}",
                             metrics={**running.metrics, **self._quarantined.pop(record.round_id, {})},
                             seconds=time.perf_counter() - t0)
            storage.save_round(failed)
            self._changed(failed)
            return False
        self._quarantined.pop(record.round_id, None)  # already in the outcome's metrics
        done = replace(running, state="done", update_version=outcome.update_version,
                       samples_used=outcome.samples_used, metrics=outcome.metrics, seconds=time.perf_counter() - t0)
        storage.save_round(done)
        self._changed(done)
        logger.info("round %d (%s) done: update v%d", record.round_id, record.kind, outcome.update_version)
        return True

    def _fedavg(self, round_id: int, job: _Job) -> _Outcome:
        """A synchronous round: the newest unused submission of each of the cohort's devices, as absolute
        parameters, combined by the strategy onto the cohort's current parameters.

        A device whose newest submission is unreadable contributes its next newest readable one (none: the
        device is left out); the unreadable ones are quarantined (marked used by this round before it
        aggregates). Every other unused submission of the cohort is superseded and marked used with the update."""
        bundle_id = job.bundle_id
        unused = self.state.storage.unused_submissions(bundle_id, job.cohort)
        if not unused:
            raise NothingToAggregateError(f"no unused federated submissions for bundle {bundle_id} "
                                          f"in cohort {job.cohort!r}")
        chosen: list[tuple[SubmissionRecord, dict[str, np.ndarray]]] = []
        bad: list[tuple[SubmissionRecord, Exception]] = []
        for newest_first in by_device_newest_first(unused):
            for s in newest_first:
                try:
                    chosen.append((s, self._submission_params(s)))
                    break
                except _UNREADABLE as exc:
                    bad.append((s, exc))
        self._quarantine_submissions(round_id, bad)
        if not chosen:
            raise NothingToAggregateError(f"all {len(bad)} unused federated submissions for bundle {bundle_id} in "
                                          f"cohort {job.cohort!r} are unreadable (quarantined)")
        base, base_version = current_params(self.state, bundle_id, job.cohort)
        if self.aggregator.whole_vector:
            chosen = _completed(chosen, base, round_id, self.aggregator.name)
        contributions = [Contribution(s.device_id, params, float(s.num_samples),
                                      staleness=max(0, base_version - s.base_version)) for s, params in chosen]
        result = self.aggregator.aggregate(base, contributions)
        quarantined = {s.id for s, _ in bad}
        used = [s.id for s in unused if s.id is not None and s.id not in quarantined]
        update = self._publish(round_id, job, result.params, used)
        total = sum(s.num_samples for s, _ in chosen)
        metrics = {"submissions": float(len(chosen)), "superseded": float(len(unused) - len(chosen) - len(bad)),
                   "unreadable_submissions": float(len(bad)), "total_weight": float(total),
                   "base_version": float(base_version), "update_norm": _norm(result.params, base)}
        return _Outcome(update, total, self._with_strategy_metrics(metrics, result.metrics))

    def _fedbuff(self, round_id: int, job: _Job) -> _Outcome:
        """A FedBuff step an operator started (``StartRound``): over every readable unused submission of the
        cohort (the unreadable ones are quarantined: marked used by this round before it aggregates)."""
        buffer = self.state.storage.unused_submissions(job.bundle_id, job.cohort)
        if not buffer:
            raise NothingToAggregateError(f"no unused federated submissions for bundle {job.bundle_id} "
                                          f"in cohort {job.cohort!r}")
        readable, bad = self._read_submissions(buffer)
        self._quarantine_submissions(round_id, bad)
        if not readable:
            raise NothingToAggregateError(f"all {len(bad)} unused federated submissions for bundle {job.bundle_id} "
                                          f"in cohort {job.cohort!r} are unreadable (quarantined)")
        result, outcome = self._fedbuff_step(job.bundle_id, job.cohort, readable, unreadable=len(bad))
        version = self._publish(round_id, job, result.params, [s.id for s, _ in readable if s.id is not None])
        return replace(outcome, update_version=version)

    def _fedbuff_step(self, bundle_id: str, cohort: str,
                      buffer: Sequence[tuple[SubmissionRecord, Mapping[str, np.ndarray]]], unreadable: int = 0
                      ) -> tuple[AggregateResult, _Outcome]:
        """Aggregate a buffer of read submissions (record, parameters): each submission's delta from the exact
        parameters of its base version, weighted by its staleness (versions published since), onto the current
        parameters. Publishes nothing; the outcome's ``update_version`` is left 0. ``unreadable``: how many of
        the buffer's submissions were quarantined (for the metrics)."""
        latest = self.state.storage.latest_update(bundle_id, cohort)
        version = latest.version if latest is not None else 0
        base = self._base_params(bundle_id, cohort, version)
        if base is None:
            raise NothingToAggregateError(f"version {version} of cohort {cohort!r} is not one of bundle {bundle_id}")
        contributions, staleness = [], []
        for s, submitted in buffer:
            origin = self._base_params(bundle_id, cohort, s.base_version)
            if origin is None:  # not a version of this bundle (a device still on another one): from the current
                origin = base
            delta = {k: np.asarray(v, np.float64) - np.asarray(origin[k], np.float64) for k, v in submitted.items()
                     if k in origin}
            staleness.append(max(0, version - s.base_version))
            contributions.append(Contribution(s.device_id, delta, float(s.num_samples), staleness[-1], is_delta=True))
        result = self.aggregator.aggregate(base, contributions)
        total = sum(s.num_samples for s, _ in buffer)
        metrics = {"submissions": float(len(buffer)), "buffer_size": float(self.aggregator.buffer_size),
                   "unreadable_submissions": float(unreadable), "total_weight": float(total),
                   "base_version": float(version), "update_norm": _norm(result.params, base),
                   "mean_staleness": float(np.mean(staleness)), "max_staleness": float(max(staleness))}
        return result, _Outcome(0, total, self._with_strategy_metrics(metrics, result.metrics))

    # -- unreadable inputs ----------------------------------------------------------------------------------
    def _submission_params(self, s: SubmissionRecord) -> dict[str, np.ndarray]:
        """The parameters a submission stored; raises one of ``_UNREADABLE`` when its blob cannot be read."""
        return decode_arrays(self.state.blobs.get(s.blob))

    def _read_submissions(self, submissions: Sequence[SubmissionRecord]
                          ) -> tuple[list[tuple[SubmissionRecord, dict[str, np.ndarray]]],
                                     list[tuple[SubmissionRecord, Exception]]]:
        """Read every submission's parameters: (readable ones with their parameters, unreadable ones with why)."""
        readable: list[tuple[SubmissionRecord, dict[str, np.ndarray]]] = []
        bad: list[tuple[SubmissionRecord, Exception]] = []
        for s in submissions:
            try:
                readable.append((s, self._submission_params(s)))
            except _UNREADABLE as exc:
                bad.append((s, exc))
        return readable, bad

    def _quarantine_submissions(self, round_id: int, bad: Sequence[tuple[SubmissionRecord, Exception]]) -> None:
        """Log each unreadable submission and mark them used by round ``round_id``, so no round picks them again."""
        if not bad:
            return
        for s, exc in bad:
            logger.error("round %d: submission %s of device %s is unreadable (blob %s: %s: %s); quarantined: "
                         "marked used by the round and left out of it", round_id, s.id, s.device_id, s.blob,
                         type(exc).__name__, exc)
        self.state.storage.mark_submissions_used([s.id for s, _ in bad if s.id is not None], round_id)
        self._quarantined[round_id] = {"unreadable_submissions": float(len(bad))}

    def _quarantine_samples(self, round_id: int, bad: Sequence[tuple[SampleRecord, Exception]]) -> None:
        """Log each sample whose input is unreadable and mark them used by round ``round_id``."""
        if not bad:
            return
        for s, exc in bad:
            logger.error("round %d: the input of sample %s of device %s is unreadable (tensor %s: %s: %s); "
                         "quarantined: marked used by the round and left out of it", round_id, s.sample_id,
                         s.device_id, s.input_blob, type(exc).__name__, exc)
        self.state.storage.mark_samples_used([s.sample_id for s, _ in bad], round_id)
        self._quarantined[round_id] = {"unreadable_samples": float(len(bad))}

    def _publish(self, round_id: int, job: _Job, params: dict[str, np.ndarray], used: list[int]) -> int:
        """Claim ``used`` and save the strategy's state, publish, then mark ``used`` (see the module doc)."""
        storage = self.state.storage
        storage.claim_submissions(round_id, used, self._state_record())
        update = publish_update(self.state, job.bundle_id, "fedavg", params, round_id=round_id, cohort=job.cohort,
                                project=True)
        storage.mark_submissions_used(used, round_id)
        return update.version

    def _with_strategy_metrics(self, metrics: dict[str, float], strategy: Mapping[str, float]) -> dict[str, float]:
        metrics.update({f"{self.aggregator.name}_{k}": float(v) for k, v in strategy.items()})
        for key in ("epsilon", "delta"):  # the privacy spent so far, under plain names for GetRound readers
            if key in strategy:
                metrics[key] = float(strategy[key])
        return metrics

    def _base_params(self, bundle_id: str, cohort: str, version: int) -> dict[str, np.ndarray] | None:
        """The exact parameters of the cohort's ``version`` (0: the bundle's initial ones, trainable weights
        included) — what an encoded submission's delta is decoded against (:func:`server.updates.version_params`);
        None when ``version`` is not one of this bundle's. Recent versions are cached (they never change)."""
        key = (bundle_id, cohort, version)
        if key not in self._bases:
            try:
                exact, _ = version_params(self.state, resolve_bundle(self.state, bundle_id), cohort, version)
            except InvalidRequestError:
                return None
            self._remember(bundle_id, cohort, version, exact)
        return self._bases[key]

    def _remember(self, bundle_id: str, cohort: str, version: int, params: Mapping[str, np.ndarray]) -> None:
        if len(self._bases) >= _BASE_CACHE:
            self._bases.pop(next(iter(self._bases)))
        self._bases[(bundle_id, cohort, version)] = dict(params)

    def _distiller_instance(self) -> Distiller:
        if self._distiller is None:
            if self._factory is None:
                raise DistillerUnavailableError("no distiller is configured")
            self._distiller = self._factory()
        return self._distiller

    def _distill(self, round_id: int, job: _Job) -> _Outcome:
        """A distillation round over the bundle's unused samples with inputs (up to ``job.limit``). A sample whose
        input is unreadable is quarantined (marked used by this round before it distils) and left out."""
        bundle_id = job.bundle_id
        samples = [s for s in self.state.storage.unused_samples(bundle_id, limit=job.limit, with_input=True)
                   if s.input_blob]
        if not samples:
            raise NothingToAggregateError(f"no unused samples with inputs for bundle {bundle_id}")
        # Arrival order interleaves devices at random; a fixed order makes the round reproducible.
        samples.sort(key=lambda s: (s.device_id, s.stream_position, s.sample_id))
        readable: list[SampleRecord] = []
        inputs: list[np.ndarray] = []
        bad: list[tuple[SampleRecord, Exception]] = []
        for s in samples:
            try:
                inputs.append(decode_array(sample_tensor(self.state, s.input_blob or "")))
                readable.append(s)
            except _UNREADABLE as exc:
                bad.append((s, exc))
        self._quarantine_samples(round_id, bad)
        if not readable:
            raise NothingToAggregateError(f"all {len(bad)} unused samples with inputs for bundle {bundle_id} are "
                                          "unreadable (quarantined)")
        x = np.stack(inputs)
        base, _ = current_params(self.state, bundle_id, job.cohort)
        spec = require_parameters(resolve_bundle(self.state, bundle_id), "distillation", adaptable=True)
        result = self._distiller_instance().distill(x.astype(np.float32, copy=False), base, job.steps,
                                                    nonnegative=nonnegative_names(spec))
        if set(result.params) != set(base):
            raise InvalidTensorError(f"distiller returned parameters {sorted(result.params)}, "
                                     f"expected {sorted(base)}")
        # claimed before the update is published: a crash in between is settled at the next start (the round is
        # done when its update exists, else failed and its samples released), so no sample serves two versions
        used = [s.sample_id for s in readable]
        self.state.storage.mark_samples_used(used, round_id)
        try:
            update = publish_update(self.state, bundle_id, "distill", result.params, round_id=round_id,
                                    cohort=job.cohort, project=True)
        except Exception:
            self.state.storage.release_samples(round_id, used)
            raise
        metrics = {str(k): float(v) for k, v in result.metrics.items()}
        metrics["samples"] = float(len(readable))
        metrics["unreadable_samples"] = float(len(bad))
        return _Outcome(update.version, len(readable), metrics)


def _completed(chosen: Sequence[tuple[SubmissionRecord, dict[str, np.ndarray]]], base: Mapping[str, np.ndarray],
               round_id: int, rule: str) -> list[tuple[SubmissionRecord, dict[str, np.ndarray]]]:
    """Submissions for a rule over the whole parameter vector (Krum, DP-FedAvg), each completed with the current
    value of every parameter another one carries and it does not: a submission proposes no change to what it
    leaves out (devices submit what they adapted, e.g. only normalisation statistics). Refusing the round
    instead would refuse every later one too, as long as that device's submission stays the newest unused."""
    carried = sorted(set().union(*(params for _, params in chosen)) & set(base))
    out = []
    for s, params in chosen:
        missing = [k for k in carried if k not in params]
        if missing:
            logger.info("round %d (%s): submission %s of device %s does not carry %s; they keep their current "
                        "values in it", round_id, rule, s.id, s.device_id, missing)
        out.append((s, {**{k: base[k] for k in missing}, **params}))
    return out


def _norm(params: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``params - base`` over every parameter."""
    return float(np.sqrt(sum(float(np.sum((np.asarray(params[k], np.float64) - base[k]) ** 2)) for k in base)))
