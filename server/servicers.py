"""gRPC servicers: translate protobuf ⇄ domain objects, call the handlers, map domain errors to status codes.

Method names are fixed by the generated base classes (hence ``noqa: N802``).
Thin on purpose: every decision lives in :mod:`server.handlers`, :mod:`server.updates` or
:mod:`server.rounds`; the only exit for an error is :func:`abort`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import grpc

from proto.convert import TensorDecodeError, tensor_from_proto, tensors_from_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc
from server import errors, handlers, updates
from server.auth import Authenticator
from server.records import RoundRecord
from server.rounds import RoundRunner
from server.state import ServerState

logger = logging.getLogger(__name__)
MAX_STATUS_MESSAGE = 2000  # characters; a longer status would not fit gRPC's 8 KiB metadata limit on the client

# First match wins, so subclasses come before their bases.
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (TensorDecodeError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.EnrollmentDisabledError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.TooManyWatchersError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnknownBundleError, grpc.StatusCode.NOT_FOUND),
    (errors.UnknownRoundError, grpc.StatusCode.NOT_FOUND),
    (errors.UnknownDeviceError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NoBundlePublishedError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NothingToAggregateError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DistillerUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NoAdaptableParametersError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ServerShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (errors.BlobCorruptError, grpc.StatusCode.DATA_LOSS),
    (errors.ServerError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: Exception) -> grpc.StatusCode:
    """The gRPC status code for a domain error (INTERNAL for an unlisted :class:`ServerError`)."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def status_message(exc: Exception) -> str:
    """The error's text for a status, cut to :data:`MAX_STATUS_MESSAGE` characters: an error echoing a huge
    request field (a 100 KB id) would otherwise reach the client as RESOURCE_EXHAUSTED without its message."""
    text = str(exc)
    if len(text) <= MAX_STATUS_MESSAGE:
        return text
    return f"{text[:MAX_STATUS_MESSAGE]}… (message of {len(text)} characters cut)"


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the RPC with ``code`` and ``message``; never returns."""
    context.abort(code, message)
    raise RuntimeError("grpc.ServicerContext.abort returned")  # it always raises


@contextmanager
def _domain_errors(context: grpc.ServicerContext, rpc: str) -> Iterator[None]:
    try:
        yield
    except (errors.ServerError, TensorDecodeError) as exc:
        abort_for(context, exc, rpc)


def abort_for(context: grpc.ServicerContext, exc: Exception, rpc: str) -> NoReturn:
    """End the RPC ``rpc`` with the status of a domain error (:func:`status_for`, :func:`status_message`),
    logged; never returns."""
    code, message = status_for(exc), status_message(exc)
    logger.warning("%s -> %s: %s", rpc, code.name, message)
    abort(context, code, message)


def _sample(msg: device_pb2.Sample) -> handlers.SampleIn:
    return handlers.SampleIn(
        device_id=msg.device_id, sample_id=msg.sample_id, bundle_id=msg.bundle_id,
        input=tensor_from_proto(msg.input) if msg.HasField("input") else None,
        features=tensor_from_proto(msg.features) if msg.HasField("features") else None,
        entropy=msg.entropy, prediction=msg.prediction, stream_position=msg.stream_position,
        captured_ms=msg.captured_unix_ms,
    )


def _update(u: updates.SignedUpdate) -> common_pb2.ParameterUpdate:
    h = u.header
    return common_pb2.ParameterUpdate(
        version=h.version, bundle_id=h.bundle_id, kind=h.kind, sha256=h.params_sha256, created_unix_ms=h.created_ms,
        round_id=h.round_id, cohort=h.cohort, base_version=h.base_version, encoding=h.encoding, payload=u.payload,
        base_sha256=h.base_sha256, signature=u.signature, key_id=u.key_id,
    )


def _round(r: RoundRecord) -> admin_pb2.RoundStatus:
    return admin_pb2.RoundStatus(
        round_id=r.round_id, kind=r.kind, state=r.state, update_version=r.update_version or 0,
        samples_used=r.samples_used, error=r.error, seconds=r.seconds, metrics=r.metrics,
    )


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    """``edgeloop.v1.DeviceService``: what device agents call."""

    def __init__(self, state: ServerState, chunk_size: int, max_chunk_size: int,
                 authenticator: Authenticator | None = None) -> None:
        """Serve over ``state``; bundle files go out in ``chunk_size`` pieces (at most ``max_chunk_size``).

        ``authenticator`` issues device tokens on ``Enroll`` (None: enrollment is off).
        """
        self.state = state
        self.chunk_size = chunk_size
        self.max_chunk_size = max_chunk_size
        self.authenticator = authenticator

    def Enroll(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> device_pb2.EnrollResponse:
        """Exchange the shared enrollment secret for a new device token."""
        with _domain_errors(context, "Enroll"):
            if self.authenticator is None:
                raise errors.EnrollmentDisabledError("this server has no enrollment secret: device calls need "
                                                     "no token")
            token = self.authenticator.enroll(request.device_id, request.enrollment_secret)
        return device_pb2.EnrollResponse(device_id=request.device_id, device_token=token)

    def Register(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> device_pb2.RegisterResponse:
        """Create or refresh the device; answer with the current bundle and newest update version."""
        with _domain_errors(context, "Register"):
            reg = handlers.register_device(self.state, request.device_id, dict(request.labels),
                                           request.runtime_backend)
        return device_pb2.RegisterResponse(device_id=reg.device_id, bundle_id=reg.bundle_id or "",
                                           latest_update_version=reg.latest_update_version,
                                           bundle_files=reg.bundle_files, cohort=reg.cohort,
                                           update_public_key=reg.update_public_key)

    def FetchBundle(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.FetchBundleRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.BundleChunk]:
        """Stream the requested bundle files, each in contiguous chunks carrying its sha256 and size."""
        with _domain_errors(context, "FetchBundle"):
            if request.chunk_size < 0:
                raise errors.InvalidRequestError(f"chunk_size must be >= 0, got {request.chunk_size}")
            size = min(request.chunk_size or self.chunk_size, self.max_chunk_size)
            bundle_id, files = handlers.bundle_files(self.state, request.device_id, request.bundle_id,
                                                     list(request.paths))
            for f in files:
                data = handlers.read_bundle_file(self.state, f)
                for offset in range(0, max(len(data), 1), size):
                    yield common_pb2.BundleChunk(bundle_id=bundle_id, path=f.path, offset=offset,
                                                 data=data[offset : offset + size], file_size=f.size,
                                                 file_sha256=f.sha256)

    def UploadSamples(  # noqa: N802 (name fixed by the generated base class)
        self, request_iterator: Iterable[device_pb2.Sample], context: grpc.ServicerContext
    ) -> device_pb2.UploadAck:
        """Read the whole stream, validate every sample, store them durably, then acknowledge."""
        with _domain_errors(context, "UploadSamples"):
            batch = handlers.UploadBatch(self.state.limits)
            for msg in request_iterator:
                batch.add(_sample(msg), msg.ByteSize())
            result = handlers.store_samples(self.state, batch.samples)
        return device_pb2.UploadAck(stored_ids=result.stored_ids, duplicate_ids=result.duplicate_ids,
                                    bytes_received=batch.bytes_received)

    def ReportDrift(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.DriftReport, context: grpc.ServicerContext) -> device_pb2.DriftAck:
        """Store a drift event."""
        with _domain_errors(context, "ReportDrift"):
            event_id = handlers.report_drift(self.state, handlers.DriftIn(
                request.device_id, request.detector, request.signal, request.statistic, request.threshold,
                request.stream_position, request.detected_unix_ms))
        return device_pb2.DriftAck(event_id=event_id)

    def WatchUpdates(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.ParameterUpdate]:
        """Stream stored updates newer than ``since_version``, then new ones as they are published."""
        with _domain_errors(context, "WatchUpdates"):
            context.add_callback(self.state.broker.wake)  # a cancelled watcher stops waiting at once
            held = request.held_version if request.HasField("held_version") else None
            stream = updates.watch_updates(self.state, request.device_id, request.bundle_id,
                                           request.since_version, request.max_wait_seconds, context.is_active, held)
            for update in stream:
                yield _update(update)

    def ReportOutbox(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.OutboxReport, context: grpc.ServicerContext) -> device_pb2.OutboxAck:
        """Record the device's outbox counts (what its byte bound dropped, what is pending)."""
        with _domain_errors(context, "ReportOutbox"):
            merged = handlers.report_outbox(self.state, handlers.OutboxIn(
                request.device_id, request.dropped_samples, request.dropped_bytes, request.pending_samples,
                request.pending_bytes, request.max_bytes, request.eviction_policy, request.reported_unix_ms))
        return device_pb2.OutboxAck(dropped_samples=merged.dropped_samples)

    def ReportRollback(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.RollbackReport, context: grpc.ServicerContext) -> device_pb2.RollbackAck:
        """Store the device's report that it rolled an update back."""
        with _domain_errors(context, "ReportRollback"):
            rollback_id = handlers.report_rollback(self.state, handlers.RollbackIn(
                request.device_id, request.bundle_id, request.cohort, request.version, request.restored_version,
                request.reason, request.entropy_before, request.entropy_after, request.agreement_before,
                request.agreement_after, request.rolled_back_unix_ms))
        return device_pb2.RollbackAck(rollback_id=rollback_id)

    def SubmitUpdate(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.FederatedUpdate, context: grpc.ServicerContext
    ) -> device_pb2.SubmitAck:
        """Store a device's parameters (tensors, or an encoded payload) for the next federated round."""
        with _domain_errors(context, "SubmitUpdate"):
            submission_id = updates.submit_update(
                self.state, request.device_id, request.bundle_id, request.base_version, request.num_samples,
                tensors_from_proto(request.tensors), encoding=request.encoding, payload=bytes(request.payload),
                base_sha256=request.base_sha256)
        return device_pb2.SubmitAck(submission_id=submission_id)

    def PullUpdate(  # noqa: N802 (name fixed by the generated base class)
        self, request: device_pb2.PullRequest, context: grpc.ServicerContext
    ) -> common_pb2.ParameterUpdate:
        """The newest parameters as a delta from what the device holds (empty payload: it is up to date)."""
        with _domain_errors(context, "PullUpdate"):
            update = updates.pull_update(self.state, request.device_id, request.bundle_id, request.held_version,
                                         request.held_sha256)
        if update is None:
            return common_pb2.ParameterUpdate(bundle_id=request.bundle_id, version=request.held_version)
        return _update(update)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """``edgeloop.v1.AdminService``: what operators call."""

    def __init__(self, state: ServerState, runner: RoundRunner) -> None:
        """Serve over ``state``, running rounds on ``runner``."""
        self.state = state
        self.runner = runner

    def PublishBundle(  # noqa: N802 (name fixed by the generated base class)
        self, request_iterator: Iterable[common_pb2.BundleChunk], context: grpc.ServicerContext
    ) -> admin_pb2.PublishBundleResponse:
        """Assemble the streamed files, verify the bundle, store it and make it current."""
        with _domain_errors(context, "PublishBundle"):
            chunks = (handlers.FileChunk(c.path, c.offset, c.data, c.file_size, c.file_sha256, c.bundle_id)
                      for c in request_iterator)
            files, claimed = handlers.assemble_files(chunks, self.state.limits.max_bundle_bytes)
            published = handlers.publish_bundle(self.state, files, claimed)
        return admin_pb2.PublishBundleResponse(bundle_id=published.bundle_id, total_bytes=published.total_bytes)

    def ListDevices(  # noqa: N802 (name fixed by the generated base class)
        self, request: admin_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListDevicesResponse:
        """Every registered device with its counts."""
        with _domain_errors(context, "ListDevices"):
            devices = handlers.list_devices(self.state)
        return admin_pb2.ListDevicesResponse(devices=[
            admin_pb2.DeviceInfo(device_id=d.device_id, labels=d.labels, registered_unix_ms=d.registered_ms,
                                 last_seen_unix_ms=d.last_seen_ms, samples_stored=d.samples_stored,
                                 drift_events=d.drift_events, acked_update_version=d.acked_update_version,
                                 outbox_dropped_samples=d.outbox_dropped, outbox_pending_samples=d.outbox_pending,
                                 rollbacks=d.rollbacks, cohort=d.cohort)
            for d in devices
        ])

    def StartRound(  # noqa: N802 (name fixed by the generated base class)
        self, request: admin_pb2.StartRoundRequest, context: grpc.ServicerContext
    ) -> admin_pb2.StartRoundResponse:
        """Queue a round; it runs on the round worker, not on this thread."""
        with _domain_errors(context, "StartRound"):
            record = self.runner.start(request.kind, request.max_samples, request.steps, request.cohort)
        return admin_pb2.StartRoundResponse(round_id=record.round_id)

    def GetRound(  # noqa: N802 (name fixed by the generated base class)
        self, request: admin_pb2.GetRoundRequest, context: grpc.ServicerContext) -> admin_pb2.RoundStatus:
        """The round's state, outcome and metrics."""
        with _domain_errors(context, "GetRound"):
            record = self.runner.get(request.round_id)
        return _round(record)
