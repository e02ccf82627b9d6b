"""Plain records the storage layer reads and writes, and the :class:`Storage` protocol; no SQL, no protobuf."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

ROUND_STATES = ("queued", "running", "done", "failed")
DEFAULT_COHORT = "default"


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle: its sha256 (also its blob digest) and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class DeviceRecord:
    """A registered device with counts of what it sent."""

    device_id: str
    labels: dict[str, str]
    backend: str
    registered_ms: int
    last_seen_ms: int
    acked_update_version: int = 0
    samples_stored: int = 0
    drift_events: int = 0
    outbox_dropped: int = 0
    outbox_pending: int = 0
    rollbacks: int = 0

    @property
    def cohort(self) -> str:
        """The device's cohort: its ``cohort`` label, or ``"default"``."""
        return self.labels.get("cohort") or DEFAULT_COHORT


@dataclass(frozen=True)
class BundleRecord:
    """A published bundle: parsed manifest, its files (including manifest.json) and whether it is current."""

    bundle_id: str
    manifest: dict[str, Any]
    files: dict[str, FileEntry]
    created_ms: int
    is_current: bool = False


@dataclass(frozen=True)
class SampleRecord:
    """An uploaded sample; tensors live in the blob store under ``input_blob`` / ``features_blob``."""

    sample_id: str
    device_id: str
    bundle_id: str
    input_blob: str | None
    features_blob: str | None
    entropy: float
    prediction: int
    stream_position: int
    captured_ms: int
    received_ms: int
    used_in_round: int | None = None


@dataclass(frozen=True)
class DriftRecord:
    """A drift event reported by a device; ``id`` is assigned on insert."""

    device_id: str
    detector: str
    signal: str
    statistic: float
    threshold: float
    stream_position: int
    detected_ms: int
    received_ms: int
    id: int | None = None


@dataclass(frozen=True)
class OutboxRecord:
    """The newest report of a device's outbox; dropped counts are cumulative and never lowered."""

    device_id: str
    dropped_samples: int
    dropped_bytes: int
    pending_samples: int
    pending_bytes: int
    max_bytes: int
    eviction_policy: str
    reported_ms: int
    received_ms: int


@dataclass(frozen=True)
class UpdateRecord:
    """A published parameter update of one cohort; ``version`` counts up within the cohort.

    ``blob``/``sha256``: the exact parameters the round produced. ``held_blob``/``held_sha256``: what a
    device holds after applying the update as sent (differs from ``blob`` by the lossy encoding's residual).
    ``payload_blob`` is the encoded message body (``encoding``, against ``base_version`` whose held digest is
    ``base_sha256``); an empty ``payload_blob`` means "send ``held_blob`` in full".
    """

    version: int
    bundle_id: str
    kind: str
    round_id: int | None
    blob: str
    sha256: str
    created_ms: int
    cohort: str = DEFAULT_COHORT
    held_blob: str = ""
    held_sha256: str = ""
    encoding: str = "f32"
    base_version: int = 0
    base_sha256: str = ""
    payload_blob: str = ""


@dataclass(frozen=True)
class RollbackRecord:
    """A device's report that it rolled an update back; ``id`` is assigned on insert."""

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
    received_ms: int
    id: int | None = None


@dataclass(frozen=True)
class SubmissionRecord:
    """A device's adapted parameters for federated aggregation; ``id`` is assigned on insert."""

    device_id: str
    bundle_id: str
    base_version: int
    num_samples: int
    blob: str
    received_ms: int
    used_in_round: int | None = None
    id: int | None = None
    cohort: str | None = None
    """The submitting device's cohort; None on insert: the registry takes the device's ``cohort`` label."""


@dataclass(frozen=True)
class AggregatorStateRecord:
    """A strategy's persisted state (FedAU participation, the DP accountant's ledger): ``state`` is its JSON,
    ``version`` the format version of that JSON (checked on load), ``updated_ms`` when it was last saved."""

    strategy: str
    version: int
    state: str
    updated_ms: int


@dataclass(frozen=True)
class RoundRecord:
    """A distillation or aggregation round and its outcome."""

    round_id: int
    kind: str
    state: str
    created_ms: int
    update_version: int | None = None
    samples_used: int = 0
    error: str = ""
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Storage(Protocol):
    """Metadata persistence used by the handlers. Every method is atomic and safe to call from any thread."""

    def upsert_device(self, device_id: str, labels: dict[str, str], backend: str, now_ms: int) -> DeviceRecord:
        """Create the device or refresh its labels, backend and last-seen time; return it."""
        ...

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device with counts, or None."""
        ...

    def touch_device(self, device_id: str, now_ms: int) -> None:
        """Record that the device was seen at ``now_ms``."""
        ...

    def set_acked_version(self, device_id: str, version: int) -> None:
        """Raise the device's acknowledged update version to ``version`` (never lowers it)."""
        ...

    def list_devices(self) -> list[DeviceRecord]:
        """Every device with counts, ordered by id."""
        ...

    def put_bundle(self, bundle: BundleRecord, make_current: bool) -> BundleRecord:
        """Insert the bundle (or keep the stored one with the same id) and optionally make it current."""
        ...

    def get_bundle(self, bundle_id: str) -> BundleRecord | None:
        """The bundle, or None."""
        ...

    def current_bundle(self) -> BundleRecord | None:
        """The current bundle, or None when nothing is published."""
        ...

    def insert_samples(
        self, samples: Sequence[SampleRecord], seen_ms: int | None = None, tensors: Mapping[str, bytes] | None = None
    ) -> list[bool]:
        """Insert in one transaction, ignoring ids the same device already stored (an id stored for another
        device raises :class:`~server.errors.SampleIdConflictError` and stores nothing); per sample, True when
        newly stored. With ``seen_ms``, the same transaction records the samples' devices as seen then, and
        ``tensors`` (digest → encoded bytes: the samples' small tensors) are stored with them: one commit per
        upload."""
        ...

    def get_tensor(self, digest: str) -> bytes | None:
        """The bytes of a sample tensor stored by :meth:`insert_samples`, or None."""
        ...

    def device_exists(self, device_id: str) -> bool:
        """Whether ``device_id`` is registered (a cheap check, without the counts of :meth:`get_device`)."""
        ...

    def get_sample(self, sample_id: str) -> SampleRecord | None:
        """The sample, or None."""
        ...

    def unused_samples(self, bundle_id: str, limit: int | None, with_input: bool) -> list[SampleRecord]:
        """Samples of the bundle not yet used by a round, oldest first."""
        ...

    def mark_samples_used(self, sample_ids: Sequence[str], round_id: int) -> None:
        """Record that a round used these samples."""
        ...

    def release_samples(self, round_id: int, sample_ids: Sequence[str] | None = None) -> int:
        """Make samples marked used by ``round_id`` unused again (``sample_ids``: only those; None: all of the
        round's); return how many. For a round that claimed its samples and then did not publish."""
        ...

    def insert_drift(self, event: DriftRecord) -> int:
        """Store a drift event; return its id."""
        ...

    def list_drift(self, device_id: str | None) -> list[DriftRecord]:
        """Drift events, optionally of one device, oldest first."""
        ...

    def record_outbox(self, report: OutboxRecord) -> OutboxRecord:
        """Merge a device's outbox report: dropped counts become the maximum of stored and reported, the
        rest is taken from the report unless a newer one (by ``reported_ms``) is stored; return the result."""
        ...

    def get_outbox(self, device_id: str) -> OutboxRecord | None:
        """The device's merged outbox report, or None before its first report."""
        ...

    def insert_submission(self, submission: SubmissionRecord) -> int:
        """Store a federated submission (its cohort: the record's, else the device's ``cohort`` label); return
        its id. Listeners added with :meth:`add_submission_listener` are called after the commit."""
        ...

    def add_submission_listener(self, listener: Callable[[SubmissionRecord], None]) -> None:
        """Call ``listener`` with each submission right after it is durably stored (errors are logged)."""
        ...

    def get_submission(self, submission_id: int) -> SubmissionRecord | None:
        """The submission, or None."""
        ...

    def unused_submissions(self, bundle_id: str, cohort: str | None = None,
                           limit: int | None = None) -> list[SubmissionRecord]:
        """Submissions for the bundle (of ``cohort`` when given) not yet used by a round, oldest first (at most
        ``limit``)."""
        ...

    def unused_submission_groups(self) -> list[tuple[str, str, int]]:
        """``(bundle_id, cohort, count)`` of every group holding unused submissions, ordered."""
        ...

    def mark_submissions_used(self, ids: Sequence[int], round_id: int,
                              aggregator_state: AggregatorStateRecord | None = None) -> None:
        """Record that a round used these submissions and, in the same transaction, save the strategy's state."""
        ...

    def load_aggregator_state(self, strategy: str) -> AggregatorStateRecord | None:
        """The persisted state of ``strategy``, or None."""
        ...

    def claim_submissions(self, round_id: int, ids: Sequence[int],
                          aggregator_state: AggregatorStateRecord | None = None) -> None:
        """Before a round publishes: record which submissions it takes and, in the same transaction, the
        strategy's state after the round (so a crash can over-count a privacy ledger, never under-count it)."""
        ...

    def start_round(self, kind: str, created_ms: int, submission_ids: Sequence[int],
                    aggregator_state: AggregatorStateRecord | None = None) -> RoundRecord:
        """Insert a round already running, with its claimed submissions and the strategy's state after it, in
        one transaction (see :meth:`claim_submissions`); return it with its id."""
        ...

    def finish_round(self, record: RoundRecord, used_ids: Sequence[int]) -> None:
        """Mark ``used_ids`` used by the round and save its final record, in one transaction."""
        ...

    def round_inputs(self, round_id: int) -> list[int]:
        """The submission ids a round claimed, ascending."""
        ...

    def unfinished_rounds(self) -> list[RoundRecord]:
        """Rounds left queued or running (by a server that stopped mid-round), oldest first."""
        ...

    def update_of_round(self, round_id: int) -> UpdateRecord | None:
        """The update a round published, or None."""
        ...

    def insert_update(self, record: UpdateRecord) -> UpdateRecord:
        """Store ``record`` under the cohort's next version (its ``version`` is ignored); return it."""
        ...

    def updates_since(self, bundle_id: str, since_version: int, cohort: str = DEFAULT_COHORT) -> list[UpdateRecord]:
        """The cohort's updates of the bundle with version > ``since_version``, ascending."""
        ...

    def latest_update(self, bundle_id: str, cohort: str = DEFAULT_COHORT) -> UpdateRecord | None:
        """The cohort's newest update of the bundle, or None."""
        ...

    def latest_version(self, cohort: str | None = None) -> int:
        """The cohort's newest update version (None: over all cohorts; 0 when none)."""
        ...

    def record_sent(self, device_id: str, bundle_id: str, cohort: str, version: int, sha256: str,
                    sent_ms: int) -> None:
        """Durably record the digest of the parameters a device holds after a lossy reply this server sent it
        (version ``version`` of the cohort's, approximately), replacing the one recorded before."""
        ...

    def sent_digest(self, device_id: str, bundle_id: str, cohort: str) -> str | None:
        """The digest :meth:`record_sent` last recorded for the device, or None."""
        ...

    def insert_rollback(self, record: RollbackRecord) -> int:
        """Store a rollback report; return its id."""
        ...

    def list_rollbacks(self, device_id: str | None = None) -> list[RollbackRecord]:
        """Rollback reports, optionally of one device, oldest first."""
        ...

    def create_round(self, kind: str, created_ms: int) -> RoundRecord:
        """Insert a queued round; return it with its id."""
        ...

    def save_round(self, record: RoundRecord) -> None:
        """Overwrite a round's state, results and timing."""
        ...

    def get_round(self, round_id: int) -> RoundRecord | None:
        """The round, or None."""
        ...

    def close(self) -> None:
        """Release the backend's resources."""
        ...
