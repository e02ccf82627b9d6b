"""Handlers: the server's decisions about devices, bundles, samples and drift, over numpy and dataclasses.

Servicers translate wire messages into the ``*In`` dataclasses below, call these functions and translate
the results back; storage (:class:`~server.records.Storage`, :class:`~server.blobstore.BlobStore`)
persists. No protobuf here. Parameter updates and federated submissions are in :mod:`server.updates`,
rounds in :mod:`server.rounds`. Errors are the specific exceptions of :mod:`server.errors`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import SignatureError
from runtime.signing import SIGNATURE_NAME, verify_signature
from server.blobstore import sha256_hex
from server.codec import encode_array
from server.errors import (
    InvalidBundleError,
    InvalidRequestError,
    InvalidTensorError,
    PayloadTooLargeError,
    UnknownBundleFileError,
    UnknownDeviceError,
)
from server.manifest import MANIFEST_FILE, BundleSpec, check_bundle_path, parse_manifest
from server.records import (
    DEFAULT_COHORT,
    BundleRecord,
    DeviceRecord,
    DriftRecord,
    FileEntry,
    OutboxRecord,
    RollbackRecord,
    SampleRecord,
)
from server.state import (
    SMALL_TENSOR_BYTES,
    Limits,
    ServerState,
    check_id,
    require_device,
    resolve_bundle,
    spec_by_id,
)

logger = logging.getLogger(__name__)
MAX_LABELS = 64


# -- devices ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Registration:
    """What a registering device learns: the bundle to run (None before any publish) and the newest update."""

    device_id: str
    bundle_id: str | None
    latest_update_version: int
    bundle_files: list[str]
    cohort: str = DEFAULT_COHORT
    update_public_key: bytes = b""


def register_device(state: ServerState, device_id: str, labels: Mapping[str, str], backend: str) -> Registration:
    """Create or refresh a device and tell it which bundle to run."""
    check_id(device_id, "device_id")
    if len(backend) > 32:
        raise InvalidRequestError(f"runtime_backend {backend[:40]!r}… is longer than 32 characters")
    if len(labels) > MAX_LABELS or any(len(k) > 256 or len(v) > 256 or not k for k, v in labels.items()):
        raise InvalidRequestError(f"labels must be at most {MAX_LABELS} non-empty keys, keys and values "
                                  f"at most 256 characters; got {len(labels)} labels")
    if "cohort" in labels:
        check_id(labels["cohort"], "cohort label")
    device = state.storage.upsert_device(device_id, dict(labels), backend, state.clock())
    key = state.signer.public_key if state.signer is not None else b""
    bundle = state.storage.current_bundle()
    if bundle is None:
        return Registration(device_id, None, 0, [], device.cohort, key)
    latest = state.storage.latest_update(bundle.bundle_id, device.cohort)
    return Registration(device_id, bundle.bundle_id, latest.version if latest else 0, sorted(bundle.files),
                        device.cohort, key)


def list_devices(state: ServerState) -> list[DeviceRecord]:
    """Every registered device with its counts."""
    return state.storage.list_devices()


# -- bundles ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileChunk:
    """A piece of one bundle file as received (``file_size`` 0 / ``file_sha256`` "" when not stated)."""

    path: str
    offset: int
    data: bytes
    file_size: int = 0
    file_sha256: str = ""
    bundle_id: str = ""


def assemble_files(chunks: Iterable[FileChunk], max_total_bytes: int) -> tuple[dict[str, bytes], str]:
    """Join contiguous chunks into whole files; return ``(path → bytes, claimed bundle id or "")``.

    Each file's chunks must be contiguous and in offset order; stated sizes and sha256s are checked.
    """
    files: dict[str, bytearray] = {}
    stated: dict[str, tuple[int, str]] = {}
    claimed, total, current = "", 0, ""
    for chunk in chunks:
        path = check_bundle_path(chunk.path)
        if path != current and path in files:
            raise InvalidBundleError(f"file {path!r}: chunks are not contiguous in the stream")
        current = path
        buf = files.setdefault(path, bytearray())
        if chunk.offset != len(buf):
            raise InvalidBundleError(f"file {path!r}: chunk at offset {chunk.offset}, expected {len(buf)}")
        total += len(chunk.data)
        if total > max_total_bytes:
            raise PayloadTooLargeError(f"bundle exceeds the limit of {max_total_bytes} bytes")
        buf.extend(chunk.data)
        stated[path] = (chunk.file_size, chunk.file_sha256)
        claimed = chunk.bundle_id or claimed
    out = {p: bytes(b) for p, b in files.items()}
    for path, (size, digest) in stated.items():
        if size and size != len(out[path]):
            raise InvalidBundleError(f"file {path!r}: received {len(out[path])} bytes, chunks state {size}")
        if digest and digest != sha256_hex(out[path]):
            raise InvalidBundleError(f"file {path!r}: sha256 does not match the chunks' file_sha256 {digest}")
    return out, claimed


@dataclass(frozen=True)
class PublishedBundle:
    """Result of publishing: the bundle id (sha256 of manifest.json) and total bytes of its files."""

    bundle_id: str
    total_bytes: int


def publish_bundle(state: ServerState, files: Mapping[str, bytes], claimed_id: str = "") -> PublishedBundle:
    """Verify a bundle (manifest, file list, sha256s), store its files and make it the current bundle."""
    if MANIFEST_FILE not in files:
        raise InvalidBundleError(f"bundle has no {MANIFEST_FILE}")
    if SIGNATURE_NAME not in files:
        raise InvalidBundleError(f"bundle is unsigned: {SIGNATURE_NAME} is missing")
    try:  # the signature first: with trusted publishers, nothing a stranger wrote is parsed
        verify_signature(files[MANIFEST_FILE], files[SIGNATURE_NAME], state.trusted_publishers)
    except SignatureError as exc:
        raise InvalidBundleError(str(exc)) from exc
    manifest, spec = parse_manifest(files[MANIFEST_FILE])
    missing = sorted(set(spec.files) - set(files))
    if missing:
        raise InvalidBundleError(f"file(s) listed in {MANIFEST_FILE} are missing: {missing}")
    extra = sorted(set(files) - set(spec.files) - {MANIFEST_FILE, SIGNATURE_NAME})
    if extra:
        raise InvalidBundleError(f"file(s) not listed in {MANIFEST_FILE}: {extra}")
    for path, expected in sorted(spec.files.items()):
        actual = sha256_hex(files[path])
        if actual != expected:
            raise InvalidBundleError(f"file {path!r}: sha256 {actual} does not match the manifest's {expected}")
    if spec.trainable_file:
        spec.trainable_initial(files[spec.trainable_file])  # names, shapes, float32, finite
    if spec.initial_file:
        spec.initial_values(files[spec.initial_file])  # schema 2: the adaptable parameters' block, likewise
    bundle_id = sha256_hex(files[MANIFEST_FILE])
    if claimed_id and claimed_id != bundle_id:
        raise InvalidBundleError(f"chunks claim bundle id {claimed_id}, but manifest.json hashes to {bundle_id}")
    entries = {path: FileEntry(state.blobs.put(data), len(data)) for path, data in files.items()}
    state.storage.put_bundle(BundleRecord(bundle_id, manifest, entries, state.clock()), make_current=True)
    total = sum(len(d) for d in files.values())
    logger.info("published bundle %s (%d files, %d bytes)", bundle_id, len(files), total)
    return PublishedBundle(bundle_id, total)


@dataclass(frozen=True)
class BundleFile:
    """One file of a stored bundle: its path, sha256 and size (bytes via :func:`read_bundle_file`)."""

    path: str
    sha256: str
    size: int


def bundle_files(
    state: ServerState, device_id: str, bundle_id: str, paths: Sequence[str]
) -> tuple[str, list[BundleFile]]:
    """The bundle's id and the requested files (all when ``paths`` is empty), manifest.json first."""
    require_device(state, device_id)
    bundle = resolve_bundle(state, bundle_id)
    wanted = list(paths) or sorted(bundle.files, key=lambda p: (p != MANIFEST_FILE, p))
    unknown = [p for p in wanted if p not in bundle.files]
    if unknown:
        raise UnknownBundleFileError(f"bundle {bundle.bundle_id} has no file(s) {unknown}")
    return bundle.bundle_id, [BundleFile(p, bundle.files[p].sha256, bundle.files[p].size) for p in wanted]


def read_bundle_file(state: ServerState, file: BundleFile) -> bytes:
    """The verified bytes of one bundle file."""
    return state.blobs.get(file.sha256)


# -- samples ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleIn:
    """One uploaded sample as decoded from the wire; ``input`` / ``features`` may be absent (None)."""

    device_id: str
    sample_id: str
    bundle_id: str
    input: np.ndarray | None
    features: np.ndarray | None
    entropy: float
    prediction: int
    stream_position: int
    captured_ms: int


@dataclass(frozen=True)
class UploadResult:
    """Ids newly stored and ids already stored (idempotent retries), in request order."""

    stored_ids: list[str]
    duplicate_ids: list[str]


class UploadBatch:
    """Collects the samples of one upload stream, enforcing the count and byte limits as they arrive."""

    def __init__(self, limits: Limits) -> None:
        """Start an empty batch under ``limits``."""
        self.limits = limits
        self.samples: list[SampleIn] = []
        self.bytes_received = 0

    def add(self, sample: SampleIn, nbytes: int) -> None:
        """Append a sample whose wire size was ``nbytes``."""
        self.bytes_received += nbytes
        if self.bytes_received > self.limits.max_upload_bytes:
            raise PayloadTooLargeError(f"upload exceeds the limit of {self.limits.max_upload_bytes} bytes")
        if len(self.samples) >= self.limits.max_samples_per_upload:
            raise PayloadTooLargeError(f"upload exceeds {self.limits.max_samples_per_upload} samples")
        self.samples.append(sample)


def _validated_sample(state: ServerState, s: SampleIn, specs: dict[str, BundleSpec]) -> SampleIn:
    check_id(s.sample_id, "sample_id")
    what = f"sample {s.sample_id!r}"
    if s.input is None and s.features is None:
        raise InvalidTensorError(f"{what}: has neither input nor features")
    if not math.isfinite(s.entropy):
        raise InvalidRequestError(f"{what}: entropy {s.entropy} is not finite")
    if s.bundle_id not in specs:
        if not s.bundle_id:
            raise InvalidRequestError(f"{what}: bundle_id is empty")
        specs[s.bundle_id] = spec_by_id(state, s.bundle_id)
    spec = specs[s.bundle_id]
    x = None if s.input is None else spec.check_input(s.input, f"{what} input")
    f = None if s.features is None else spec.check_features(s.features, f"{what} features")
    return SampleIn(s.device_id, s.sample_id, s.bundle_id, x, f, float(s.entropy), int(s.prediction),
                    int(s.stream_position), int(s.captured_ms))


def store_samples(state: ServerState, samples: Sequence[SampleIn]) -> UploadResult:
    """Validate every sample, then write its tensors (fsynced) and commit the rows; idempotent on sample_id.

    Nothing is stored when any sample is invalid. Returning means the stored ids are durable.
    """
    devices = {s.device_id for s in samples}
    for device_id in sorted(devices):  # the last-seen time is recorded with the samples, in one commit
        if not state.storage.device_exists(device_id):
            raise UnknownDeviceError(f"device {device_id!r} is not registered; call Register first")
    specs: dict[str, BundleSpec] = {}
    valid = [_validated_sample(state, s, specs) for s in samples]
    received = state.clock()
    encoded = [encode_array(t) for s in valid for t in (s.input, s.features) if t is not None]
    # small tensors commit with their sample rows (one durable commit per upload); large ones are blobs first
    keys = [sha256_hex(b) if len(b) <= SMALL_TENSOR_BYTES else state.blobs.put(b) for b in encoded]
    small = {k: b for k, b in zip(keys, encoded, strict=True) if len(b) <= SMALL_TENSOR_BYTES}
    digests = iter(keys)
    records = [
        SampleRecord(
            s.sample_id, s.device_id, s.bundle_id,
            None if s.input is None else next(digests),
            None if s.features is None else next(digests),
            s.entropy, s.prediction, s.stream_position, s.captured_ms, received,
        )
        for s in valid
    ]
    is_new = state.storage.insert_samples(records, seen_ms=received, tensors=small)
    stored = [r.sample_id for r, new in zip(records, is_new, strict=True) if new]
    dups = [r.sample_id for r, new in zip(records, is_new, strict=True) if not new]
    logger.info("stored %d samples (%d duplicates) from %s", len(stored), len(dups), sorted(devices))
    return UploadResult(stored, dups)


# -- drift ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftIn:
    """A drift detector firing on a device, with its evidence."""

    device_id: str
    detector: str
    signal: str
    statistic: float
    threshold: float
    stream_position: int
    detected_ms: int


def report_drift(state: ServerState, event: DriftIn) -> int:
    """Store a drift event from a registered device; return its id."""
    require_device(state, event.device_id)
    check_id(event.detector, "detector")
    if event.signal:  # optional, bounded like the detector's name (it is stored and logged)
        check_id(event.signal, "signal")
    if not (math.isfinite(event.statistic) and math.isfinite(event.threshold)):
        raise InvalidRequestError(f"drift statistic {event.statistic} / threshold {event.threshold} not finite")
    record = DriftRecord(event.device_id, event.detector, event.signal, float(event.statistic),
                         float(event.threshold), int(event.stream_position), int(event.detected_ms), state.clock())
    event_id = state.storage.insert_drift(record)
    logger.info("drift event %d from %s: %s on %s", event_id, event.device_id, event.detector, event.signal)
    return event_id


# -- outbox reports ---------------------------------------------------------------------------------------
OUTBOX_EVICTION_POLICIES = ("drop_oldest", "drop_newest")


@dataclass(frozen=True)
class OutboxIn:
    """A device's report of its upload outbox: cumulative drops by the byte bound and what is pending."""

    device_id: str
    dropped_samples: int
    dropped_bytes: int
    pending_samples: int
    pending_bytes: int
    max_bytes: int
    eviction_policy: str
    reported_ms: int


def report_outbox(state: ServerState, report: OutboxIn) -> OutboxRecord:
    """Record a registered device's outbox report; return the merged record (dropped counts never go down)."""
    require_device(state, report.device_id)
    counts = {k: getattr(report, k) for k in ("dropped_samples", "dropped_bytes", "pending_samples",
                                              "pending_bytes", "max_bytes")}
    negative = {k: v for k, v in counts.items() if v < 0}
    if negative:
        raise InvalidRequestError(f"outbox report of {report.device_id!r}: negative counts {negative}")
    if report.eviction_policy not in OUTBOX_EVICTION_POLICIES:
        raise InvalidRequestError(f"outbox report of {report.device_id!r}: eviction_policy "
                                  f"{report.eviction_policy[:40]!r} is not one of {OUTBOX_EVICTION_POLICIES}")
    record = OutboxRecord(report.device_id, **{k: int(v) for k, v in counts.items()},
                          eviction_policy=report.eviction_policy, reported_ms=int(report.reported_ms),
                          received_ms=state.clock())
    merged = state.storage.record_outbox(record)
    if report.dropped_samples:
        logger.warning("device %s: outbox dropped %d samples (%d bytes) so far, %s", report.device_id,
                       merged.dropped_samples, merged.dropped_bytes, merged.eviction_policy)
    return merged


# -- rollbacks --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RollbackIn:
    """A device's report that it rolled an update back, with the health signal before and after."""

    device_id: str
    bundle_id: str
    cohort: str
    version: int
    restored_version: int
    reason: str
    entropy_before: float
    entropy_after: float
    agreement_before: float
    agreement_after: float
    rolled_back_ms: int


def report_rollback(state: ServerState, report: RollbackIn) -> int:
    """Store a registered device's rollback report; return its id."""
    device = require_device(state, report.device_id)
    for value, what in ((report.bundle_id, "bundle_id"), (report.cohort, "cohort")):
        if value:  # optional (cohort: the device's), bounded like every id (they are stored and logged)
            check_id(value, f"rollback report's {what}")
    if not 0 <= report.restored_version < report.version:
        raise InvalidRequestError(f"rollback of v{report.version} to v{report.restored_version}: the restored "
                                  "version must be older and >= 0")
    health = (report.entropy_before, report.entropy_after, report.agreement_before, report.agreement_after)
    if not all(math.isfinite(v) for v in health) or len(report.reason) > 1024:
        raise InvalidRequestError(f"rollback report of {report.device_id!r}: health values {health} must be finite "
                                  "and the reason at most 1024 characters")
    record = RollbackRecord(report.device_id, report.bundle_id, report.cohort or device.cohort, int(report.version),
                            int(report.restored_version), report.reason, *map(float, health),
                            int(report.rolled_back_ms), state.clock())
    rollback_id = state.storage.insert_rollback(record)
    logger.warning("device %s rolled back %s/v%d to v%d: %s", report.device_id, record.cohort, report.version,
                   report.restored_version, report.reason)
    return rollback_id
