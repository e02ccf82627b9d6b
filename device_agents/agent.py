"""The device agent: predict with forward-only TTA, watch for drift, queue chosen samples, sync.

One :meth:`Agent.process_batch` runs TTA prediction → per-sample normalised entropies → the drift detector
on each sample (a scalar detector on its entropy, a feature detector such as MMD or Mahalanobis on its
penultimate features) → the entropy-band selector → the durable outbox. A drift event drives three things: the
TTA state is re-anchored (``tta.on_drift()``, under the ``"reset"`` policy), the selector's byte budget is
boosted for a while (:meth:`EntropyBandSelector.on_drift`), and a ``ReportDrift`` with the evidence
(detector, signal, statistic, threshold, stream position) goes to the server — kept and retried at the next
:meth:`Agent.sync` when the server cannot be reached. :meth:`Agent.sync` drains the outbox, reports its
counts (what its byte bound dropped) and applies newer parameter updates; a background watcher thread can
apply updates as they are published instead.

Federated learning: :meth:`Agent.learn` takes a labelled batch and improves the adaptable parameters with
zeroth-order steps (SPSA, forward passes only, :mod:`device_agents.zeroth_order`); :meth:`Agent.contribute`
submits what the device learned — its TTA method's adapted statistics (and FOA's scale/shift) and the
parameters ``learn`` changed — for the server's aggregation.

A folded or foreign model (a :class:`runtime.predictor.Predictor`: no adaptable graph, e.g. a wrapped ONNX/TFLite
model) runs the same loop — prediction with an output-only TTA method (``source``, ``lame``, ``t3a``), drift,
selection, outbox and upload — but has no parameters to update or contribute: :meth:`Agent.sync` does not
watch for updates, and :meth:`Agent.learn`, :meth:`Agent.contribute` and :meth:`Agent.start_watcher` raise
:class:`~device_agents.tta.ModelCapabilityError` naming the bundle.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from device_agents.drift import DriftDetector, detector_name, detector_signal
from device_agents.errors import (
    BaseMismatchError,
    DivergedHistoryError,
    OutboxError,
    StaleUpdateError,
    TransportError,
    UpdateRefusedError,
    UpdateRejectedError,
)
from device_agents.health import Health, HealthMonitor, HealthPolicy
from device_agents.messages import ParameterUpdate, RollbackInfo, UploadResult
from device_agents.outbox import OutboxSample, SqliteOutbox
from device_agents.selection import UPLOAD_MODES, EntropyBandSelector
from device_agents.state import (
    AgentStateStore,
    Restored,
    SavedComponent,
    SavedParameters,
    SavedState,
    StateError,
    UpdateRef,
)
from device_agents.tta import ModelCapabilityError, TTAMethod, TTAOutput, normalized_entropy
from device_agents.tta.models import describe_model, is_adaptable
from device_agents.updates import SubmissionEncoder, check_order, check_signature, decode_params
from device_agents.zeroth_order import SPSA, SPSAStep
from runtime.checks import is_finite_number
from runtime.errors import InputError
from runtime.update_codec import ENCODINGS, decode_delta, decoded_below_zero

if TYPE_CHECKING:
    from device_agents.client import DeviceClient, UpdateStream
    from runtime.model import AdaptableModel
    from runtime.predictor import Predictor

logger = logging.getLogger(__name__)

DRIFT_POLICIES = ("reset", "none")
REFUSED_REPORT_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE")
"""gRPC codes with which the server refuses a report for good (a retry gets the same answer): such a report is
dropped, logged and counted instead of blocking the reports queued behind it."""


@dataclass(frozen=True)
class AgentConfig:
    """Settings of :class:`Agent`.

    ``drift_policy``: ``"reset"`` calls ``tta.on_drift()`` after a batch in which drift fired; ``"none"`` only
    records it. ``upload_mode`` (:data:`~device_agents.selection.UPLOAD_MODES`) chooses what a queued sample
    carries: ``"input"``, ``"features"`` (privacy: inputs never leave the device) or ``"both"``.
    ``detector_name``: the name drift reports carry (None: the detector's registry name).
    ``max_pending_drift_reports`` bounds the drift reports kept for a retry while the server is unreachable
    (the oldest go first). ``report_outbox``: send the outbox's counts (``ReportOutbox``) after a sync's
    upload when its drops or backlog changed since the last report (and at the first sync). ``sync_wait_seconds``
    is how long :meth:`Agent.sync` waits for updates; ``watch_wait_seconds`` bounds each watcher RPC (and so
    how long a stop can take at worst); ``watch_retry_seconds`` is the pause after a failed watch.
    ``update_keys``: raw Ed25519 keys server updates must be signed by (None: signatures are not checked);
    ``cohort``: the cohort updates must be for (None: not checked). ``health`` decides when an applied
    update is rolled back (:class:`~device_agents.health.HealthPolicy`; None: never automatically).
    ``contribution_encoding``: how :meth:`Agent.contribute` sends parameters — ``"f32"`` plain tensors, or a
    delta encoding of :mod:`runtime.update_codec` (``"int8_delta"``, ``"int8_topk_delta"`` keeping
    ``contribution_topk_fraction`` of each tensor) of the change from the held version, with error feedback
    across contributions (what one leaves out goes with the next).
    ``save_state_seconds``: with a state store, the components' state (TTA method, detector, selector) is also
    saved after a batch once this long has passed since the last save, so a power loss between syncs loses at
    most that much of what they learnt (None: only at sync, close and drift; 0: after every batch). A batch in
    which drift fired is always followed by a save: a power loss must not bring back the detector's state from
    before the drift it signalled (it would signal the same drift again).
    """

    device_id: str
    bundle_id: str
    drift_policy: str = "reset"
    report_drift: bool = True
    detector_name: str | None = None
    upload_mode: str = "both"
    upload_batch: int = 64
    report_outbox: bool = True
    max_pending_drift_reports: int = 256
    sync_wait_seconds: float = 0.05
    watch_wait_seconds: float = 2.0
    watch_retry_seconds: float = 1.0
    join_timeout_seconds: float = 10.0
    cohort: str | None = None
    update_keys: tuple[bytes, ...] | None = None
    health: HealthPolicy | None = field(default_factory=HealthPolicy)
    contribution_encoding: str = "f32"
    contribution_topk_fraction: float = 0.25
    save_state_seconds: float | None = 60.0

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must be non-empty")
        if self.drift_policy not in DRIFT_POLICIES:
            raise ValueError(f"drift_policy must be one of {DRIFT_POLICIES}, got {self.drift_policy!r}")
        if self.upload_mode not in UPLOAD_MODES:
            raise ValueError(f"upload_mode must be one of {UPLOAD_MODES}, got {self.upload_mode!r}")
        if self.upload_batch < 1:
            raise ValueError(f"upload_batch must be >= 1, got {self.upload_batch}")
        if self.max_pending_drift_reports < 0:
            raise ValueError(f"max_pending_drift_reports must be >= 0, got {self.max_pending_drift_reports}")
        if self.contribution_encoding not in ENCODINGS:
            raise ValueError(f"contribution_encoding must be one of {ENCODINGS}, got {self.contribution_encoding!r}")
        if not 0.0 < self.contribution_topk_fraction <= 1.0:
            raise ValueError(f"contribution_topk_fraction must be in (0, 1], got {self.contribution_topk_fraction}")
        for name in ("sync_wait_seconds", "watch_wait_seconds", "watch_retry_seconds", "join_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.save_state_seconds is not None and not (is_finite_number(self.save_state_seconds)
                                                        and self.save_state_seconds >= 0):
            raise ValueError(f"save_state_seconds must be a finite number >= 0 or None, got "
                             f"{self.save_state_seconds!r}")

    @property
    def upload_input(self) -> bool:
        """Whether queued samples carry the model input."""
        return self.upload_mode in ("input", "both")

    @property
    def upload_features(self) -> bool:
        """Whether queued samples carry the penultimate features."""
        return self.upload_mode in ("features", "both")


@dataclass(frozen=True)
class BatchResult:
    """Outcome of one batch: predictions, normalised entropies (entropy / ln K), probabilities, drift.

    ``queued_ids`` are the sample ids the outbox stored durably for this batch (acknowledged locally).
    """

    pred: np.ndarray
    entropy: np.ndarray
    probs: np.ndarray
    drift: bool
    drift_positions: tuple[int, ...]
    selected: int
    queued_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SyncResult:
    """Outcome of :meth:`Agent.sync`: the upload (None when skipped or failed), versions applied, errors."""

    upload: UploadResult | None
    applied_versions: tuple[int, ...]
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentStats:
    """Counters since the agent started; ``accuracy`` is None until a labelled batch was seen.

    ``samples_not_watched``: samples the drift detector did not see because it refused one (``ValueError``: e.g.
    an MMD reference learnt from identical rows); the batch's predictions stand and the rest of that batch is
    skipped."""

    samples_seen: int
    labelled_seen: int
    correct: int
    drift_positions: tuple[int, ...]
    selected: int
    uploaded_samples: int
    uploaded_bytes: int
    downloaded_bytes: int
    update_versions: tuple[int, ...]
    rejected_updates: int
    sync_failures: int
    drift_reports_pending: int = 0
    drift_reports_dropped: int = 0
    samples_not_queued: int = 0
    learned_samples: int = 0
    contributions: int = 0
    rollback_reports_pending: int = 0
    reports_refused: int = 0
    state_write_failures: int = 0
    samples_not_watched: int = 0

    @property
    def accuracy(self) -> float | None:
        """Share of labelled samples predicted correctly."""
        return self.correct / self.labelled_seen if self.labelled_seen else None


@dataclass(frozen=True)
class PendingContribution:
    """A contribution handed to the caller by ``Agent.contribute(submit=False)``: manifest-named parameters, the
    samples behind them and the version whose parameters the device held (the submission's ``base_version``)."""

    params: dict[str, np.ndarray]
    num_samples: int
    base_version: int


@dataclass
class _Counters:
    seen: int = 0
    labelled: int = 0
    correct: int = 0
    selected: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    rejected: int = 0
    sync_failures: int = 0
    drift_reports_dropped: int = 0
    reports_refused: int = 0
    state_failures: int = 0
    not_queued: int = 0
    not_watched: int = 0
    learned: int = 0
    contributions: int = 0
    contributed_mark: int = 0  # seen + learned at the last acknowledged contribution
    drifts: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


class Agent:
    """Runs one model on one device. ``selector``/``outbox``/``client`` may be None (no upload / offline).

    ``optimizer`` is the zeroth-order optimiser :meth:`learn` uses (None: an :class:`SPSA` with default settings,
    made on the first labelled batch).

    ``state`` (optional) keeps what a restart must not lose (:mod:`device_agents.state`): the applied
    parameters and versions, the parameters a rollback restores, an update still on probation, the drift
    and rollback reports not yet delivered, and the state of the TTA method, the drift detector and the
    selector (saved at each :meth:`sync` and at :meth:`close`; each restored only into a component of the same
    identity: for the TTA method the same method, bundle and parameters). The agent restores them at
    construction — unless they are for another bundle or cohort, are refused by the model, or are newer than
    ``server_version`` (the server's
    newest update version for this bundle and cohort, from the registration: a saved version above it means
    the server's update history was reset), in which case it starts from the bundle's parameters — and saves
    them on every change. A failed save is logged and counted (``AgentStats.state_write_failures``); the agent
    goes on with its state in memory. :attr:`restored` (a :class:`~device_agents.state.Restored`) says what the
    constructor took over.
    """

    def __init__(
        self,
        model: AdaptableModel | Predictor,
        tta: TTAMethod,
        detector: DriftDetector,
        selector: EntropyBandSelector | None,
        outbox: SqliteOutbox | None,
        client: DeviceClient | None,
        config: AgentConfig,
        *,
        version: int = 0,
        optimizer: SPSA | None = None,
        state: AgentStateStore | None = None,
        server_version: int | None = None,
    ) -> None:
        self.model = model
        self.adaptable = is_adaptable(model)  # False: a folded/foreign predictor, no parameters to update
        self.optimizer = optimizer
        self._encoder = (None if config.contribution_encoding == "f32" else
                         SubmissionEncoder(config.contribution_encoding, config.contribution_topk_fraction))
        self.tta = tta
        self.detector = detector
        self.signal = detector_signal(detector)  # scalar detectors watch entropy, feature detectors features
        self.detector_label = config.detector_name or detector_name(detector)
        self.selector = selector
        self.outbox = outbox
        self.client = client
        self.config = config
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()  # orders the components' saves (see save_component_states)
        self._counters = _Counters()
        self._version = int(version)
        self._active_version = int(version)
        # (model params, version, extra params) before the last update, for a rollback
        self._previous: tuple[dict[str, np.ndarray], int, dict[str, np.ndarray]] | None = None
        # Names updates carry that the model does not run: a bundle's trainable weights (``trainable`` block),
        # which devices that only adapt normalisation still hold so that delta updates apply and verify.
        self._extra = _trainable_weights(model)
        params = model.params if self.adaptable else {}  # type: ignore[union-attr]
        self._held = {**params, **self._extra}  # the parameters of active_version, the base deltas apply to
        self._initial = (dict(params), dict(self._extra), int(version))  # what a diverged history restarts from
        self._health = (HealthMonitor(model, config.health)  # type: ignore[arg-type]
                        if config.health is not None and self.adaptable else None)
        self._pending_rollbacks: list[RollbackInfo] = []
        # an update applied before any batch was seen (a fresh start, a restart): its entropy check waits for the
        # first batch after it, then compares the parameters before and after on that batch (see _probation_check)
        self._probation: UpdateRef | None = None
        self.rollbacks: list[RollbackInfo] = []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._stream: UpdateStream | None = None
        self._pending_drift: list[tuple[int, float, int]] = []  # (position, statistic, detected_ms)
        self._reported_outbox: tuple[int, int, int] | None = None  # (dropped, dropped_bytes, pending) last sent
        # Sample ids are <device>:<session>:<stream position>: a retried upload reuses the id stored in the
        # outbox (stored once), while a restarted agent replaying positions from 0 gets fresh ids.
        self.session_id = uuid.uuid4().hex[:12]
        self.state = state
        self._components_saved = time.monotonic()  # when the components' state was last saved (or restored)
        self.restored = Restored()  # what the constructor took over from ``state``
        if state is not None:
            self._restore(state.load(), server_version)

    # -- durable state ------------------------------------------------------------------------------------------
    def _restore(self, saved: SavedState, server_version: int | None) -> None:
        """Take over the saved reports, and the saved parameter state when it fits this bundle, cohort, model and
        server (see the class docstring)."""
        self._pending_drift = saved.drift_reports[-self.config.max_pending_drift_reports:] if (
            self.config.max_pending_drift_reports) else []
        self._pending_rollbacks = list(saved.rollback_reports)
        if saved.drift_reports or saved.rollback_reports:
            logger.info("restored %d drift and %d rollback reports not yet delivered", len(self._pending_drift),
                        len(self._pending_rollbacks))
        parameters = self._restore_parameters(saved.parameters, server_version)
        components = self._restore_components(saved.components)
        if components.get("selector") and self.outbox is not None:
            self._charge_selector(saved.components["selector"])
        self.restored = Restored(
            version=self._version if parameters else None, active_version=self._active_version if parameters else None,
            tta=components["tta"], detector=components.get("detector", False),
            selector=components.get("selector", False), drift_reports=len(self._pending_drift),
            rollback_reports=len(self._pending_rollbacks))

    def _restore_parameters(self, p: SavedParameters | None, server_version: int | None) -> bool:
        """Take over the saved parameter state when it fits; True when it did."""
        if p is None or not self.adaptable:
            return False
        why = self._saved_mismatch(p, server_version)
        if why is None:
            try:
                self.model.set_params(p.model)  # type: ignore[union-attr]
            except InputError as exc:
                why = f"the model refuses them: {exc}"
        if why is not None:
            logger.warning("agent state %s: not restoring the saved parameters of v%d (%s); starting from the "
                           "bundle's parameters", self.state.path if self.state else "?", p.active_version, why)
            self._save(lambda store: store.clear_parameters())
            return False
        self._hold(p.extra, p.active_version)
        self._version, self._previous, self._probation = p.version, p.previous, p.probation
        logger.info("restored the parameters of v%d (newest accepted v%d)", p.active_version, p.version)
        return True

    def _components(self) -> list[tuple[str, dict[str, Any], Any]]:
        """``(kind, identity, component)`` of each component whose state is saved (:mod:`device_agents.state`):
        the TTA method (its state belongs to the method, the bundle and the parameters it adapted), the drift
        detector (its configuration and the bundle) and the upload selector."""
        out: list[tuple[str, dict[str, Any], Any]] = [
            ("tta", {"method": self.tta.name, "bundle_id": self.config.bundle_id,
                     "active_version": self._active_version}, self.tta)]
        if getattr(self.detector, "saves_state", False):  # a user's own detector may not implement it
            out.append(("detector", {"detector": repr(self.detector), "bundle_id": self.config.bundle_id},
                        self.detector))
        if self.selector is not None:
            out.append(("selector", {"selector": type(self.selector).__name__}, self.selector))
        return out

    def _restore_components(self, saved: Mapping[str, SavedComponent]) -> dict[str, bool]:
        """Take over each component's saved state when its identity is this agent's component's (see
        :meth:`_components`); ``{kind: restored}``."""
        out: dict[str, bool] = {}
        for kind, identity, component in self._components():
            got = saved.get(kind)
            out[kind] = False
            if got is None:
                continue
            if got.identity != identity:
                logger.info("not restoring the saved %s state: it belongs to %s; this agent's is %s", kind,
                            _identity(got.identity), _identity(identity))
                continue
            try:
                component.restore(got.state)
            except (TypeError, ValueError) as exc:  # restore names what is wrong, and changes nothing then
                logger.warning("not restoring the saved %s state (%s): %s", kind, _identity(identity), exc)
                continue
            logger.info("restored the saved %s state (%s, %d arrays)", kind, _identity(identity), len(got.state))
            out[kind] = True
        return out

    def _charge_selector(self, saved: SavedComponent) -> None:
        """Charge the restored selector for the samples its outbox holds from after its save (it selected them,
        and the snapshot does not know)."""
        assert self.selector is not None and self.outbox is not None
        try:
            self.selector.charge(self.outbox.bytes_created_after(int(float(saved.state["wall_time"]) * 1000)))
        except OutboxError as exc:
            logger.warning("could not charge the selector for samples queued after its save: %s", exc)

    def save_component_states(self) -> None:
        """Save the TTA method's, the drift detector's and the selector's state, in one transaction (a no-op
        without a state store); :meth:`sync` and :meth:`close` call it. A failed save is logged and counted,
        like every save."""
        if self.state is None:
            return
        with self._save_lock:  # two savers (a batch's periodic save, a sync on another thread) write in order
            with self._lock:
                self._components_saved = time.monotonic()
                try:
                    saved = [SavedComponent(kind, identity, dict(component.snapshot()))
                             for kind, identity, component in self._components()]
                except Exception as exc:  # a component that cannot describe its state: counted, the agent goes on
                    logger.error("could not take the components' state to save it: %s: %s", type(exc).__name__, exc)
                    self._counters.state_failures += 1
                    return
            self._save(lambda store: store.save_components(saved))

    def _hold(self, extra: dict[str, np.ndarray], active_version: int) -> None:
        """Bookkeeping after ``model.set_params``: the trainable weights and the version that go with the model's
        parameters now, the held set deltas apply to, and a TTA state of the old parameters dropped."""
        self._extra = dict(extra)
        self._held = {**self.model.params, **self._extra}  # type: ignore[union-attr]
        self._active_version = int(active_version)
        self.tta.on_params_changed()

    def _saved_mismatch(self, p: SavedParameters, server_version: int | None) -> str | None:
        """Why the saved parameter state does not fit this agent, or None when it does."""
        if p.bundle_id != self.config.bundle_id:
            return f"they are for bundle {p.bundle_id[:12]}, this agent runs {self.config.bundle_id[:12]}"
        if self.config.cohort is not None and p.cohort != self.config.cohort:
            return f"they are for cohort {p.cohort!r}, this device is in {self.config.cohort!r}"
        if server_version is not None and p.version > server_version:
            return (f"the server's newest update is v{server_version}: its update history was reset since the "
                    f"device accepted v{p.version}")
        if set(p.extra) != set(self._extra):
            return "they hold other trainable weights than the bundle"
        return None

    def _save(self, write: Callable[[AgentStateStore], None]) -> None:
        """Run one write on the state store; a failure is logged and counted, never raised."""
        if self.state is None:
            return
        try:
            write(self.state)
        except StateError as exc:
            logger.error("%s", exc)
            with self._lock:
                self._counters.state_failures += 1

    def _save_parameters(self) -> None:
        """Save the parameter state (called under the lock after every change to it)."""
        saved = SavedParameters(self.config.bundle_id, self.config.cohort, self._version, self._active_version,
                                dict(self.model.params), dict(self._extra), self._previous,  # type: ignore[union-attr]
                                self._probation)
        self._save(lambda store: store.save_parameters(saved))

    def _save_reports(self) -> None:
        """Save the undelivered reports (called after every change to them)."""
        with self._lock:
            drift, rollbacks = list(self._pending_drift), list(self._pending_rollbacks)
        self._save(lambda store: store.save_reports(drift, rollbacks))

    @property
    def version(self) -> int:
        """The newest update version accepted (updates at or below it are refused as stale)."""
        return self._version

    @property
    def active_version(self) -> int:
        """The version whose parameters the model holds (differs from :attr:`version` after a rollback)."""
        return self._active_version

    def process_batch(self, x: np.ndarray, y: np.ndarray | None = None, position: int | None = None) -> BatchResult:
        """Predict, detect drift, select and queue samples for one batch.

        ``position`` is the stream position of ``x[0]`` (default: samples seen so far); positions name the
        samples (``<device>:<session>:<position>``), so a replayed position is stored once. A drift in the
        batch boosts the selector's budget before this batch's samples are chosen.

        ``y`` (optional) holds one integer label in 0..K-1 per sample; other labels raise :class:`InputError`
        naming the problem before anything is counted or queued (and before the prediction when the model states
        its class count, as bundles do). So does a ``position`` that is not an integer >= 0 whose batch ends below
        2**63 (the outbox and the wire hold positions as int64).
        """
        labels = None if y is None else self._check_labels(x, y)
        if position is not None:
            position = _check_position(position, len(x) if np.ndim(x) else 0)
        with self._lock:
            start = self._counters.seen if position is None else position
            out = self.tta.predict(self.model, x)
            if labels is not None and labels.size and labels.max() >= out.probs.shape[1]:
                raise InputError(f"labels must lie in 0..{out.probs.shape[1] - 1}, got {int(labels.max())}")
            if self._health is not None:
                self._health.observe(x)
            rolled_back = self._probation_check() if self._probation is not None else None
            pred = out.probs.argmax(axis=1)
            ent = normalized_entropy(out.probs)
            events = self._detect(out.features if self.signal == "features" else ent, start)
            if events and self.selector is not None:
                self.selector.on_drift()
            queued = self._enqueue(np.asarray(x), out, ent, pred, start)
            if events and self.config.drift_policy == "reset":
                self.tta.on_drift()
            self._count(pred, labels, len(queued), [p for p, _ in events])
        if rolled_back is not None:
            self._report_rollback(rolled_back)
        every = self.config.save_state_seconds
        due = every is not None and time.monotonic() - self._components_saved >= every
        if self.state is not None and (due or events):  # a drift resets the detector: a crash must not undo it
            self.save_component_states()
        now = int(time.time() * 1000)
        for pos, statistic in events:
            self._report_drift(pos, statistic, now)
        return BatchResult(pred, ent, out.probs, bool(events), tuple(p for p, _ in events), len(queued), queued)

    def _check_labels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``y`` as int64, one per sample of ``x``, each in 0..K-1 (K from the model when it says; the
        prediction's width is checked too); else :class:`InputError` naming the problem."""
        labels = np.asarray(y)
        if labels.dtype.kind not in "iu":
            raise InputError(f"labels must have an integer dtype, got {labels.dtype}")
        labels = labels.reshape(-1).astype(np.int64)
        n = len(x) if np.ndim(x) else 0
        if labels.shape != (n,):
            raise InputError(f"labels have shape {np.shape(y)}; expected one per sample of the batch ({n},)")
        k = getattr(self.model, "num_classes", None) or len(getattr(self.model, "labels", ()) or ()) or None
        if labels.size and (labels.min() < 0 or (k is not None and labels.max() >= k)):
            raise InputError(f"labels must lie in 0..{'K' if k is None else k - 1}, got values from "
                             f"{int(labels.min())} to {int(labels.max())}")
        return labels

    def _detect(self, values: np.ndarray | None, start: int) -> list[tuple[int, float]]:
        """Feed the batch's signal (entropies, or feature rows for a feature detector) one sample at a time, so
        each drift has its stream position and statistic. A sample the detector refuses ends the batch's detection
        (logged, counted in ``AgentStats.samples_not_watched``) instead of failing the batch; a detector still
        learning its reference (``fitted`` False) is reset then, so it learns a new one from the next samples."""
        if values is None:
            raise ModelCapabilityError(f"the {self.detector_label} drift detector watches features; the model "
                                       "returns none")
        events = []
        for i, value in enumerate(values):
            try:
                detected = self.detector.update(value).drift_detected
            except ValueError as exc:  # refused, its state unchanged: the batch's predictions stand
                learning = getattr(self.detector, "fitted", None) is False
                logger.error("the %s drift detector refuses the sample at stream position %d (%s); %d samples of "
                             "this batch go unwatched%s", self.detector_label, start + i, exc, len(values) - i,
                             "; it learns a new reference from the next samples" if learning else "")
                if learning:  # the reference it was learning cannot be used (e.g. identical rows): every later
                    self.detector.reset()  # row would complete the same one, and be refused too
                self._counters.not_watched += len(values) - i
                break
            if detected:
                events.append((start + i, self.detector.statistic))
                logger.info("drift at stream position %d (statistic %.3f)", start + i, self.detector.statistic)
        return events

    def _enqueue(
        self, x: np.ndarray, out: TTAOutput, ent: np.ndarray, pred: np.ndarray, start: int
    ) -> tuple[str, ...]:
        if self.selector is None or self.outbox is None:
            return ()
        cfg = self.config
        size = (x[0].astype(np.float32).nbytes if cfg.upload_input else 0) + (
            out.features[0].astype(np.float32).nbytes if cfg.upload_features else 0
        )
        chosen = self.selector.select(ent, size)
        if chosen.size == 0:
            return ()
        now = int(time.time() * 1000)
        samples = [
            OutboxSample(
                sample_id=f"{cfg.device_id}:{self.session_id}:{start + int(i)}",
                bundle_id=cfg.bundle_id,
                input=np.asarray(x[i], dtype=np.float32) if cfg.upload_input else None,
                features=np.asarray(out.features[i], dtype=np.float32) if cfg.upload_features else None,
                entropy=float(ent[i]),
                prediction=int(pred[i]),
                stream_position=start + int(i),
                captured_ms=now,
            )
            for i in chosen
        ]
        try:
            return self.outbox.put(samples, now_ms=now).stored
        except (OutboxError, ValueError) as exc:  # the device keeps serving predictions; the samples are counted
            # as lost: a file that cannot be written, or samples the outbox refuses (larger than its max_bytes)
            logger.error("%s; %d selected samples not queued", exc, len(samples))
            self._counters.not_queued += len(samples)
            return ()

    def _count(self, pred: np.ndarray, y: np.ndarray | None, selected: int, drifts: list[int]) -> None:
        c = self._counters
        c.seen += int(pred.shape[0])
        c.selected += selected
        c.drifts.extend(drifts)
        if y is not None:  # checked by _check_labels: one per prediction
            c.labelled += int(y.size)
            c.correct += int((y == pred).sum())

    def _report_drift(self, position: int, statistic: float, detected_ms: int) -> None:
        if self.client is None or not self.config.report_drift:
            return
        try:
            self._send_drift(self.client, (position, statistic, detected_ms))
        except TransportError as exc:
            logger.warning("could not report drift at position %d (kept for a retry): %s", position, exc)
            with self._lock:
                self._pending_drift.append((position, statistic, detected_ms))
                excess = len(self._pending_drift) - self.config.max_pending_drift_reports
                if excess > 0:
                    del self._pending_drift[:excess]
                    self._counters.drift_reports_dropped += excess
            self._save_reports()

    def _send_drift(self, client: DeviceClient, report: tuple[int, float, int]) -> None:
        position, statistic, detected_ms = report
        client.report_drift(self.detector_label, self.signal, statistic, self.detector.threshold, position,
                            detected_ms)

    def _flush_reports(self, client: DeviceClient) -> None:
        """Send the drift, then the rollback reports kept after failures, oldest first. A report the server
        refuses for good (:data:`REFUSED_REPORT_CODES`) is dropped and counted; any other failure stops the flush
        and raises, keeping the rest for the next sync."""
        with self._lock:
            kept = bool(self._pending_drift or self._pending_rollbacks)
        if not kept:
            return
        try:
            self._flush(client, self._pending_drift, self._send_drift)
            self._flush(client, self._pending_rollbacks, lambda c, info: c.report_rollback(info))
        finally:
            self._save_reports()

    def _flush(self, client: DeviceClient, pending: list[Any], send: Callable[[DeviceClient, Any], object]) -> None:
        while True:
            with self._lock:
                if not pending:
                    return
                report = pending[0]
            try:
                send(client, report)
            except TransportError as exc:
                if exc.code not in REFUSED_REPORT_CODES:
                    raise
                logger.error("the server refuses a kept report, dropping it: %s (%s)", report, exc)
                with self._lock:
                    self._counters.reports_refused += 1
            with self._lock:
                if pending and pending[0] is report:
                    pending.pop(0)

    def _report_outbox(self, client: DeviceClient, outbox: SqliteOutbox) -> None:
        """Send the outbox's counts when its drops or backlog changed since the last acknowledged report."""
        stats = outbox.stats
        key = (stats.dropped, stats.dropped_bytes, stats.pending_count)
        if key != self._reported_outbox:
            client.report_outbox(stats)
            self._reported_outbox = key

    def learn(self, x: np.ndarray, y: np.ndarray) -> SPSAStep:
        """One zeroth-order step (:class:`~device_agents.zeroth_order.SPSA`, 2q forward passes, no backward
        pass) on the labelled batch ``(x, y)``: the adaptable parameters it optimises change in the model, and
        the next :meth:`contribute` carries them. The passes normalise with the statistics the TTA method has
        adapted so far (:meth:`~device_agents.tta.TTAMethod.adapted_params`), so what is learned fits them.
        A rejected batch (shape, NaN, labels not integers in 0..K-1) raises :class:`InputError` and changes
        nothing; an accepted batch's samples count towards the next contribution."""
        self._require_parameters("learn from labelled batches")
        with self._lock:
            if self.optimizer is None:
                self.optimizer = SPSA()
            step = self.optimizer.step(self.model, x, y, fixed=self.tta.adapted_params(self.model))
            self._counters.learned += int(np.asarray(x).shape[0])
        return step

    def contribution(self) -> dict[str, np.ndarray]:
        """What :meth:`contribute` would send now: the TTA method's adapted parameters
        (:meth:`~device_agents.tta.TTAMethod.adapted_params`: statistics, FOA's scale/shift) over every
        parameter that differs from the held version's (e.g. changed by :meth:`learn`)."""
        self._require_parameters("contribute to federated aggregation")
        with self._lock:
            current = self.model.params
            changed = {k: v for k, v in current.items()
                       if k not in self._held or not np.array_equal(v, self._held[k])}
            return {**changed, **self.tta.adapted_params(self.model)}

    @overload
    def contribute(self, submit: Literal[True] = ...) -> int | None: ...

    @overload
    def contribute(self, submit: Literal[False]) -> PendingContribution | None: ...

    def contribute(self, submit: bool = True) -> int | PendingContribution | None:
        """Submit what the device learned since its last contribution to the server's federated aggregation;
        return the submission id.

        The submission carries :meth:`contribution` with ``num_samples`` = samples processed since the last
        acknowledged contribution (by :meth:`process_batch` and :meth:`learn`; a batch given to both counts
        twice) and ``base_version`` = the version whose parameters the device holds (:attr:`active_version`).
        Nothing to contribute — no sample processed since, or nothing adapted (the ``source`` method, or right
        after a reset) — is a no-op returning None. A transport failure raises
        :class:`~device_agents.errors.TransportError` and keeps the counters, so the next call sends the
        samples again; without a client, :class:`RuntimeError`.

        ``submit=False`` hands the contribution to the caller instead (a :class:`PendingContribution`; e.g. the
        fleet simulator, which may corrupt it as a byzantine device before sending): nothing is sent, no client
        is needed, and the counters advance as if it had been acknowledged.
        """
        self._require_parameters("contribute to federated aggregation")
        if submit and self.client is None:
            raise RuntimeError("contribute needs a client; this agent is offline")
        with self._lock:
            processed = self._counters.seen + self._counters.learned
            num_samples = processed - self._counters.contributed_mark
            params = self.contribution() if num_samples > 0 else {}
            pending = PendingContribution(params, num_samples, self._active_version)
            if not params:
                return None
            if not submit:
                self._mark_contributed(processed)
                return pending
            encoded = self._encode(params) if self._encoder is not None else None  # on the same held version
        assert self.client is not None
        try:
            if encoded is None or encoded[0] is None:
                submission_id = self.client.submit_update(self.config.bundle_id, pending.base_version, num_samples,
                                                          params)
            else:
                submission_id = self.client.submit_update(self.config.bundle_id, pending.base_version, num_samples,
                                                          encoding=self.config.contribution_encoding,
                                                          payload=encoded[0])
        except TransportError:
            if encoded is not None and self._encoder is not None:
                with self._lock:
                    self._encoder.residual = encoded[1]  # put back, so the retry does not count it twice
            raise
        with self._lock:
            self._mark_contributed(processed)
        logger.info("contributed %d parameters over %d samples on v%d (submission %d)", len(params), num_samples,
                    pending.base_version, submission_id)
        return submission_id

    def _encode(self, params: dict[str, np.ndarray]) -> tuple[bytes | None, dict[str, np.ndarray]]:
        """``(payload, residual before)``: the error-feedback delta of ``params`` from the held parameters.

        The payload is None when the delta would decode a parameter that must be >= 0 (a layer's variance, a
        model's ``nonnegative_params``) below 0 where ``params`` holds it >= 0 (int8 rounding around 0, or error
        feedback carried over): the contribution then goes in full (f32), exactly, and the residual is cleared,
        since the full values carry everything (the server refuses a negative variance)."""
        assert self._encoder is not None
        saved = self._encoder.residual
        payload = self._encoder.encode(params, self._held)
        model = self.model
        must = (set(model.nonnegative_params) | set(model.manifest.variance_params)) & set(params)  # type: ignore[union-attr]
        if must:
            delta = decode_delta(payload, self.config.contribution_encoding,
                                 {k: np.shape(v) for k, v in params.items()})
            below = decoded_below_zero({k: self._held[k] + delta.get(k, 0.0) for k in must}, params, must)
            if below:
                logger.info("contribution sent as f32: its %s delta would decode %s below 0",
                            self.config.contribution_encoding, ", ".join(below[:4]))
                self._encoder.residual = {}
                return None, saved
        return payload, saved

    def _mark_contributed(self, processed: int) -> None:
        self._counters.contributed_mark = max(self._counters.contributed_mark, processed)
        self._counters.contributions += 1

    def apply_update(self, update: ParameterUpdate) -> bool:
        """Verify, install and health-check a parameter update; return False when it was rolled back.

        Checks, in order: the signature (with ``config.update_keys``), bundle and cohort, that the version is
        newer than :attr:`version` (a replayed or older update is refused), and the parameters it yields on
        the held base against its digest. The swap is one ``set_params``. Then the health signal is compared
        with the parameters before (:class:`~device_agents.health.HealthPolicy`); when it worsened beyond the
        thresholds the previous parameters are restored and the rollback is reported to the server. An update
        applied before any batch was seen (a fresh start, a restart) has no recent batch for the entropy signal:
        that comparison is made on the next batch :meth:`process_batch` gets, before and after, once.

        Raises :class:`UpdateIntegrityError` (signature, bundle, cohort, digest), :class:`StaleUpdateError`,
        :class:`~device_agents.errors.BaseMismatchError` (a delta on another base),
        :class:`~device_agents.errors.UpdateRefusedError` (names/shapes/values refused by ``model.set_params``:
        the update is authentic, so its version counts as seen — it is not fetched again — while the model keeps
        its parameters, and the refusal is reported to the server like a rollback) or
        :class:`UpdateRejectedError` (a model without adaptable parameters).
        """
        if not self.adaptable:
            raise UpdateRejectedError(f"update v{update.version} refused: bundle {self.config.bundle_id} runs "
                                      f"{describe_model(self.model)}, which has no adaptable parameters")
        check_signature(update, self.config.update_keys)
        with self._lock:
            check_order(update, self.config.bundle_id, self.config.cohort, self._version)
            params = decode_params(update, self._held, self._active_version)
            previous, previous_version = self.model.params, self._active_version
            before = self._health.measure(previous) if self._health is not None else None
            ref = UpdateRef(update.bundle_id, update.cohort, int(update.version))
            try:
                self.model.set_params({k: v for k, v in params.items() if k not in self._extra})
            except InputError as exc:
                refusal, info = self._refuse(ref, f"refused by the model: {exc}"), None
            else:
                refusal = None
                self._previous = (previous, previous_version, self._extra)
                self._version = int(update.version)
                self._hold({k: params.get(k, v) for k, v in self._extra.items()}, self._version)
                self._counters.versions.append(self._version)
                info = self._health_check(ref, before)
                # no recent batch to measure the entropy on: that check waits for the next batch
                self._probation = ref if info is None and before is not None and math.isnan(before.entropy) else None
                if info is None:
                    self._save_parameters()  # a rollback saved the restored state
        if refusal is not None:
            self._report_rollback(refusal)
            raise UpdateRefusedError(f"update v{update.version} {refusal.reason}")
        if info is not None:
            self._report_rollback(info)
            return False
        logger.info("applied %s update v%d", update.kind, update.version)
        return True

    def _refuse(self, ref: UpdateRef, reason: str) -> RollbackInfo:
        """Record an authentic update the model refused: its version counts as seen, the parameters stay."""
        self._version = max(self._version, ref.version)
        self._counters.rejected += 1
        self._save_parameters()
        logger.error("update v%d %s; keeping the parameters of v%d", ref.version, reason, self._active_version)
        return RollbackInfo(ref.bundle_id, ref.cohort, ref.version, self._active_version, reason,
                            NOT_MEASURED, NOT_MEASURED, NOT_MEASURED, NOT_MEASURED)

    def _health_check(self, ref: UpdateRef, before: Health | None) -> RollbackInfo | None:
        if self._health is None or before is None:
            return None
        return self._verdict(ref, before, self._health.measure(self.model.params))

    def _probation_check(self) -> RollbackInfo | None:
        """The deferred entropy check of the update on probation, on the batches seen since it was applied: the
        parameters before it against the current ones (a rollback when the current ones are worse)."""
        ref, self._probation = self._probation, None
        if self._health is None or self._previous is None or ref is None:
            return None
        before = self._health.measure(self._previous[0])
        info = self._verdict(ref, before, self._health.measure(self.model.params))
        if info is None:
            self._save_parameters()  # off probation
        return info

    def _verdict(self, ref: UpdateRef, before: Health, after: Health) -> RollbackInfo | None:
        """Roll the update ``ref`` back when the health policy finds ``after`` worse than ``before``; the
        report."""
        assert self._health is not None
        reason = self._health.policy.verdict(before, after)
        if not reason:
            return None
        restored = self._previous[1] if self._previous is not None else 0
        self.rollback()
        info = RollbackInfo(ref.bundle_id, ref.cohort, ref.version, restored, reason,
                            *(_reported(v) for v in (before.entropy, after.entropy, before.agreement,
                                                     after.agreement)))
        self.rollbacks.append(info)
        logger.warning("rolled back update v%d: %s", ref.version, reason)
        return info

    def _report_rollback(self, info: RollbackInfo) -> None:
        if self.client is None:
            return
        try:
            self.client.report_rollback(info)
        except TransportError as exc:
            logger.warning("could not report the rollback of v%d (kept for a retry): %s", info.version, exc)
            with self._lock:
                self._pending_rollbacks.append(info)
            self._save_reports()

    def rollback(self) -> bool:
        """Restore the parameters held before the last update; False when there is nothing to restore.

        :attr:`version` is kept, so the rolled-back update is not fetched and applied again; the next update
        arrives in full, since its delta base is not what the device holds.
        """
        with self._lock:
            if self._previous is None:
                return False
            params, version, extra = self._previous
            self.model.set_params(params)
            self._hold(extra, version)
            self._previous = self._probation = None
            self._save_parameters()
        logger.warning("rolled back to parameters of v%d", version)
        return True

    def _apply_from_stream(self, stream: UpdateStream, errors: list[str] | None = None) -> list[int]:
        """Apply the stream's updates in order. A stale one is skipped; a refused one (recorded and reported by
        :meth:`apply_update`) is noted in ``errors`` and the stream goes on; any other failure raises."""
        applied = []
        for update in stream:
            if self._stop.is_set() and threading.current_thread() is self._watcher:
                break
            try:
                if self.apply_update(update):
                    applied.append(update.version)
            except StaleUpdateError as exc:
                logger.debug("ignoring %s", exc)
            except UpdateRefusedError as exc:
                if errors is not None:
                    errors.append(str(exc))
        return applied

    def _watch_and_apply(self, client: DeviceClient, wait: float, errors: list[str] | None = None) -> list[int]:
        """Watch for updates after :attr:`version` and apply them. After a rollback or a refusal the server's
        next update may be a delta on the version the device did not keep (it learns what the device holds when
        a watch starts): then the watch is opened once more, and the server sends that update in full."""
        applied: list[int] = []
        for attempt in (1, 2):
            stream = client.watch_updates(self.config.bundle_id, self._version, wait,
                                          held_version=self._active_version)
            self._stream = stream
            if self._stop.is_set() and threading.current_thread() is self._watcher:
                stream.cancel()
            try:
                applied += self._apply_from_stream(stream, errors)
                return applied
            except BaseMismatchError as exc:
                stream.cancel()
                if attempt == 2:
                    raise
                if isinstance(exc, DivergedHistoryError):
                    self._start_over(exc)
                else:
                    logger.info("%s; watching again from the held version", exc)
            finally:
                self._stream = None
        return applied

    def _start_over(self, why: Exception) -> None:
        """Go back to the parameters the agent was built with (the bundle's) and their version: the server's
        update history is not the one the device followed, so its next watch fetches that history from there."""
        params, extra, version = self._initial
        with self._lock:
            self.model.set_params(params)  # type: ignore[union-attr]
            self._hold(extra, version)
            self._version, self._previous, self._probation = version, None, None
            self._save_parameters()
        logger.warning("%s: the server's update history differs from the device's; starting over from the "
                       "parameters of v%d", why, version)

    def sync(self, wait_seconds: float | None = None) -> SyncResult:
        """Save the components' state (with a state store), upload the outbox, deliver kept reports, then apply updates
        newer than :attr:`version` (waiting up to ``wait_seconds``, default ``config.sync_wait_seconds``; a model
        without adaptable parameters only uploads). Transport failures, an outbox that cannot be read or written
        (:class:`~device_agents.errors.OutboxError`: the updates are still applied) and refused updates are logged,
        counted and returned in ``errors``; they do not raise."""
        wait = self.config.sync_wait_seconds if wait_seconds is None else wait_seconds
        if not wait > 0:
            raise ValueError(f"wait_seconds must be > 0 (0 would wait forever), got {wait}")
        self.save_component_states()
        if self.client is None:
            return SyncResult(None, (), ("no client: offline",))
        errors: list[str] = []
        upload = None
        try:
            self._flush_reports(self.client)
        except TransportError as exc:
            errors.append(str(exc))
        if self.outbox is not None:
            try:
                upload = self.client.upload(self.outbox, self.config.upload_batch)
                with self._lock:
                    self._counters.uploaded += upload.sent
                    self._counters.uploaded_bytes += upload.bytes_sent
                if self.config.report_outbox:
                    self._report_outbox(self.client, self.outbox)
            except (TransportError, OutboxError) as exc:  # a damaged or locked outbox must not hold back updates
                errors.append(str(exc))
        applied: list[int] = []
        if not self.adaptable:  # nothing to update: the server refuses to watch a bundle without parameters
            return self._sync_result(upload, applied, errors)
        try:
            applied = self._watch_and_apply(self.client, wait, errors)
        except (TransportError, UpdateRejectedError) as exc:
            errors.append(str(exc))
            with self._lock:
                self._counters.rejected += isinstance(exc, UpdateRejectedError)
        return self._sync_result(upload, applied, errors)

    def _sync_result(self, upload: UploadResult | None, applied: list[int], errors: list[str]) -> SyncResult:
        if errors:
            with self._lock:
                self._counters.sync_failures += 1
            logger.warning("sync problems: %s", "; ".join(errors))
        return SyncResult(upload, tuple(applied), tuple(errors))

    def start_watcher(self) -> None:
        """Start a daemon thread that applies updates as the server publishes them."""
        if self.client is None:
            raise RuntimeError("start_watcher needs a client; this agent is offline")
        self._require_parameters("watch for parameter updates")
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._stop.clear()
        self._watcher = threading.Thread(
            target=self._watch_loop, args=(self.client,), name=f"edgeloop-watch-{self.config.device_id}", daemon=True
        )
        self._watcher.start()

    def _watch_loop(self, client: DeviceClient) -> None:
        while not self._stop.is_set():
            try:
                self._watch_and_apply(client, self.config.watch_wait_seconds)
            except (TransportError, UpdateRejectedError) as exc:
                logger.warning("update watcher: %s", exc)
                with self._lock:
                    self._counters.rejected += isinstance(exc, UpdateRejectedError)
                self._stop.wait(self.config.watch_retry_seconds)

    def stop_watcher(self) -> None:
        """Stop the watcher thread (cancelling its RPC) and join it."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
        if self._watcher is not None:
            self._watcher.join(self.config.join_timeout_seconds)
            if self._watcher.is_alive():
                logger.error("update watcher did not stop within %.1f s", self.config.join_timeout_seconds)
            self._watcher = None

    def _require_parameters(self, what: str) -> None:
        """Raise :class:`ModelCapabilityError` naming the bundle when the model has no adaptable parameters."""
        if not self.adaptable:
            raise ModelCapabilityError(f"bundle {self.config.bundle_id}: {describe_model(self.model)} has no "
                                       f"adaptable parameters (a folded or foreign model, served as published), so "
                                       f"this device cannot {what}")

    def close(self) -> None:
        """Stop the watcher and save the components' state (TTA method, detector, selector); the model, outbox,
        state store and client belong to the caller and stay open."""
        self.stop_watcher()
        self.save_component_states()

    @property
    def stats(self) -> AgentStats:
        """A snapshot of the counters."""
        with self._lock:
            c = self._counters
            return AgentStats(
                samples_seen=c.seen, labelled_seen=c.labelled, correct=c.correct, drift_positions=tuple(c.drifts),
                selected=c.selected, uploaded_samples=c.uploaded, uploaded_bytes=c.uploaded_bytes,
                downloaded_bytes=self.client.bytes_down if self.client is not None else 0,
                update_versions=tuple(c.versions), rejected_updates=c.rejected, sync_failures=c.sync_failures,
                drift_reports_pending=len(self._pending_drift), drift_reports_dropped=c.drift_reports_dropped,
                samples_not_queued=c.not_queued, learned_samples=c.learned, contributions=c.contributions,
                rollback_reports_pending=len(self._pending_rollbacks), reports_refused=c.reports_refused,
                state_write_failures=c.state_failures, samples_not_watched=c.not_watched,
            )


def _identity(identity: Mapping[str, Any]) -> str:
    """A component's identity for a log line (bundle ids shortened)."""
    return ", ".join(f"{k}={(v[:12] + '…') if isinstance(v, str) and len(v) > 40 else v!r}"
                     for k, v in sorted(identity.items()))


def _check_position(position: object, n: int) -> int:
    """``position`` (the stream position of a batch's first of ``n`` samples) as an int, or :class:`InputError`:
    an integer >= 0 whose batch's last position still fits an int64."""
    if isinstance(position, bool) or not isinstance(position, int | np.integer):
        raise InputError(f"position must be an integer stream position, got {type(position).__name__} "
                         f"{position!r}")
    value = int(position)
    if not 0 <= value <= 2**63 - 1 - max(n, 1):
        raise InputError(f"position must lie in 0..2**63-1 less the batch's {n} samples, got {value}")
    return value


def _trainable_weights(model: object) -> dict[str, np.ndarray]:
    """The bundle's trainable weights when ``model`` runs a bundle whose manifest has a ``trainable`` block
    (the file is fetched with the model and verified on load); else nothing."""
    manifest, bundle = getattr(model, "manifest", None), getattr(model, "bundle", None)
    if manifest is None or bundle is None or getattr(manifest, "trainable", None) is None:
        return {}
    return dict(manifest.trainable_params(bundle.root))


NOT_MEASURED = -1.0
"""What a rollback report carries for a health value that was not measured (entropy before any batch was seen,
agreement without golden vectors): both signals lie in [0, 1], and the wire holds finite numbers only."""


def _reported(value: float) -> float:
    return float(value) if np.isfinite(value) else NOT_MEASURED
