"""Parameter updates and federated submissions: validate, store as blobs, publish per-cohort versions
encoded as deltas (:mod:`runtime.update_codec`), sign and stream them.

Plain functions over numpy dicts; watchers block on :class:`~server.broker.UpdateBroker`, never poll.

The federated parameter space of a bundle is its adaptable parameters plus, when the manifest has a
``trainable`` block, the model's full float weights from the bundle's trainable file (:func:`initial_params`).
Devices submit either plain tensors or an encoded payload (``"f32"`` or a delta to the exact parameters of
their base version, :func:`submit_update`); :func:`pull_update` answers a device with a delta from exactly
what it holds, which the server remembers per device after each lossy reply (:class:`HeldCache`), so what one
reply leaves out is sent with the next (error feedback without a residual on either side).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError
from runtime.params import VARIANCE_REASON, check_nonnegative, params_digest, validate_params
from runtime.update_codec import (
    ENCODINGS,
    compress_delta,
    decode_delta,
    decode_update,
    decoded_below_zero,
    encode_full,
)
from runtime.update_signing import UpdateHeader, payload_digest
from server.codec import decode_arrays, encode_arrays
from server.errors import BlobCorruptError, InvalidRequestError, InvalidTensorError, TooManyWatchersError
from server.manifest import BundleSpec
from server.records import DEFAULT_COHORT, BundleRecord, SubmissionRecord, UpdateRecord
from server.state import ServerState, check_id, require_device, require_parameters, resolve_bundle, spec_of

logger = logging.getLogger(__name__)
UPDATE_KINDS = ("distill", "fedavg")
PULL_DENSE_BELOW = 8192  # pull deltas send tensors of at most this many entries whole (runtime.update_codec)
MAX_NUM_SAMPLES = 2**31 - 1  # a submission's weight; more could overflow a round's int64 sample total in SQLite
MAX_WAIT_SECONDS = 86_400.0  # a longer max_wait_seconds waits this long (beyond ~292 years, timed waits overflow)


def _checked_params(spec: BundleSpec, params: Mapping[str, np.ndarray], partial: bool) -> dict[str, np.ndarray]:
    """``params`` as float32 copies, checked against the bundle: known names and shapes, finite values, no
    negative variance (``spec.variances``; the message names the parameter and its most negative value) and no
    negative value of a model's ``nonnegative_params``; else :class:`InvalidTensorError`."""
    if not params:
        raise InvalidTensorError("no parameter tensors given")
    try:
        checked = validate_params(params, spec.param_shapes, partial=partial)  # names, shapes, NaN/inf
        check_nonnegative(checked, spec.variances, VARIANCE_REASON)
    except InputError as exc:
        raise InvalidTensorError(str(exc)) from exc
    for model, names in spec.nonnegative.items():
        try:
            check_nonnegative(checked, names, f"model {model!r} of the bundle max-pools before this scale and is "
                                              "exact only for values >= 0 (its nonnegative_params)")
        except InputError as exc:
            raise InvalidTensorError(str(exc)) from exc
    return checked


_CACHE_LOCK = threading.Lock()
_INITIAL_CACHE: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
_INITIAL_CACHE_ENTRIES = 8


def initial_params(state: ServerState, bundle: BundleRecord) -> dict[str, np.ndarray]:
    """Version 0 of the bundle's federated parameters: the adaptable initial values, plus the trainable
    weights read from the bundle's trainable file (block files checked and decoded once per bundle id, which
    is immutable; at most _INITIAL_CACHE_ENTRIES bundles kept)."""
    spec = require_parameters(bundle, "a parameter version")
    if not spec.trainable_file and not spec.initial_file:
        return spec.initial_values()
    with _CACHE_LOCK:
        cached = _INITIAL_CACHE.get(bundle.bundle_id)
        if cached is not None:
            _INITIAL_CACHE.move_to_end(bundle.bundle_id)
    if cached is None:  # block files of the bundle: read once (bundles are immutable)
        files = bundle.files
        initial = state.blobs.get(files[spec.initial_file].sha256) if spec.initial_file else None
        cached = spec.initial_values(initial)
        if spec.trainable_file:
            cached.update(spec.trainable_initial(state.blobs.get(files[spec.trainable_file].sha256)))
        with _CACHE_LOCK:
            _INITIAL_CACHE[bundle.bundle_id] = cached
            while len(_INITIAL_CACHE) > _INITIAL_CACHE_ENTRIES:
                _INITIAL_CACHE.popitem(last=False)
    return dict(cached)


def _record_at(state: ServerState, bundle_id: str, cohort: str, version: int) -> UpdateRecord | None:
    """The cohort's update record of ``version`` (None for version 0 or an unknown version)."""
    if version <= 0:
        return None
    records = state.storage.updates_since(bundle_id, version - 1, cohort)
    return records[0] if records and records[0].version == version else None


def version_params(state: ServerState, bundle: BundleRecord, cohort: str, version: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(exact, held)`` parameters of the cohort's ``version`` (0: the bundle's initial parameters, both)."""
    if version == 0:
        initial = initial_params(state, bundle)
        return initial, initial
    record = _record_at(state, bundle.bundle_id, cohort, version)
    if record is None:
        raise InvalidRequestError(f"version {version} is not a published update of cohort {cohort!r}")
    exact = _blob_params(state, record.blob, record.sha256, version)
    if not record.held_blob or record.held_blob == record.blob:
        return exact, exact
    return exact, _blob_params(state, record.held_blob, record.held_sha256, version)


def _decode_submission(
    state: ServerState, device_id: str, bundle: BundleRecord, cohort: str, base_version: int, encoding: str,
    payload: bytes, base_sha256: str,
) -> dict[str, np.ndarray]:
    """The parameters an encoded submission yields: in full (``"f32"``), or the decoded delta (the device's own
    change, only the names it carries) added to the exact parameters of ``base_version``, so the error of a lossy
    copy the device trained from does not enter the aggregate. ``base_sha256`` (optional) must name what the
    device started from: ``base_version``'s exact or held parameters, or what this server last sent it."""
    if encoding not in ENCODINGS:
        raise InvalidRequestError(f"submission encoding {encoding!r} is not one of {ENCODINGS}")
    spec = spec_of(bundle)
    if encoding == "f32":
        try:
            return decode_update(payload, "f32", None, spec.param_shapes)
        except InputError as exc:
            raise InvalidTensorError(f"undecodable f32 submission payload: {exc}") from exc
    exact, held = version_params(state, bundle, cohort, base_version)
    if base_sha256:
        cached = held_cache(state).get(device_id, bundle.bundle_id, cohort)
        known = {params_digest(exact), params_digest(held)} | ({cached[0]} if cached is not None else set())
        if base_sha256 not in known and base_sha256 != state.storage.sent_digest(device_id, bundle.bundle_id, cohort):
            raise InvalidRequestError(f"the submission's base_sha256 {base_sha256[:16]!r} matches neither version "
                                      f"{base_version}'s parameters nor what this device was last sent")
    try:
        delta = decode_delta(payload, encoding, spec.param_shapes)
    except InputError as exc:
        raise InvalidTensorError(f"undecodable {encoding} submission payload: {exc}") from exc
    params = {k: exact[k] + d for k, d in delta.items()}
    for name in sorted(nonnegative_names(spec) & set(params)):
        params[name] = _zero_rounding_below_zero(device_id, name, params[name], delta[name])
    return params


def _zero_rounding_below_zero(device_id: str, name: str, value: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``value`` (a parameter that must be >= 0, :func:`nonnegative_names`, decoded from a lossy delta) with its
    entries less than one quantisation step of ``delta`` below 0 set to 0: an honest device's variance near 0 can
    decode that far below it (the int8 rounding of this message, up to half a step, plus what its error feedback
    carried over). The step is the tensor's int8 scale, ``max|delta| / 127`` (its largest entry is sent as ±127).
    Entries further below 0 are kept, for :func:`_checked_params` to refuse naming them."""
    step = float(np.max(np.abs(delta))) / 127.0 if delta.size else 0.0
    rounding = (value < 0) & (value >= -step)
    if not rounding.any():
        return value
    logger.info("submission of device %s: %d value(s) of %s within one quantisation step (%.3g) below 0 set to 0",
                device_id, int(rounding.sum()), name, step)
    return np.where(rounding, np.float32(0.0), value).astype(np.float32)


def submit_update(
    state: ServerState, device_id: str, bundle_id: str, base_version: int, num_samples: int,
    params: Mapping[str, np.ndarray] | None = None, *, encoding: str = "", payload: bytes = b"",
    base_sha256: str = "",
) -> int:
    """Store a device's parameters; return the submission id.

    Names, shapes and finiteness are checked against the bundle's parameter space, and a negative variance
    (``<layer>.var``) or ``nonnegative_params`` value is refused naming the parameter and its most negative value
    (a round never has to project one away; :class:`InvalidTensorError`, INVALID_ARGUMENT). Either ``params``
    (plain tensors) or ``encoding`` + ``payload``: a delta (the device's change) is added to the exact parameters
    of ``base_version`` and the result is checked (a variance or scale less than one quantisation step of the
    delta below 0 is rounding of a value near 0 and set to 0: :func:`_zero_rounding_below_zero`); ``base_sha256``, when
    given, must be the digest of what the device started from (that version's exact or held parameters, or what
    this server last sent it), else the submission is refused."""
    device = require_device(state, device_id)
    bundle = resolve_bundle(state, bundle_id)
    require_parameters(bundle, f"a federated parameter submission (SubmitUpdate from device {device_id!r})")
    if not 0 < num_samples <= MAX_NUM_SAMPLES:
        raise InvalidRequestError(f"num_samples must be in 1..{MAX_NUM_SAMPLES}, got {num_samples}")
    latest = state.storage.latest_version(device.cohort)
    if not 0 <= base_version <= latest:
        raise InvalidRequestError(f"base_version {base_version} is not a published version (0..{latest})")
    if payload and params:
        raise InvalidRequestError("a submission carries either tensors or an encoded payload, not both")
    if payload or encoding:
        if not payload:
            raise InvalidRequestError(f"encoding {encoding!r} given without a payload")
        params = _decode_submission(state, device_id, bundle, device.cohort, base_version, encoding, payload,
                                    base_sha256)
    try:
        checked = _checked_params(spec_of(bundle), params or {}, partial=True)
    except InvalidTensorError as exc:
        if not payload:
            raise
        lossy = "" if encoding == "f32" or "is negative" not in str(exc) else \
            "; a value less than one quantisation step below 0 is taken as rounding and set to 0, this one is not"
        raise InvalidTensorError(f"{exc} (in the parameters decoded from the {encoding} payload on base_version "
                                 f"{base_version}{lossy})") from exc
    blob = state.blobs.put(encode_arrays(checked))
    record = SubmissionRecord(device_id, bundle.bundle_id, base_version, num_samples, blob, state.clock())
    return state.storage.insert_submission(record)


@dataclass(frozen=True)
class ParameterUpdate:
    """A versioned full set of adaptable parameters for one bundle and cohort (what the round produced)."""

    version: int
    bundle_id: str
    kind: str
    round_id: int | None
    params: dict[str, np.ndarray]
    sha256: str
    created_ms: int
    cohort: str = DEFAULT_COHORT


@dataclass(frozen=True)
class SignedUpdate:
    """One update as sent to a device: the signed header, the encoded payload and the signature."""

    header: UpdateHeader
    payload: bytes
    signature: bytes
    key_id: str

    @property
    def version(self) -> int:
        """The update's version within its cohort."""
        return self.header.version

    @property
    def kind(self) -> str:
        """What made the update ("distill" | "fedavg")."""
        return self.header.kind


def _base_of(state: ServerState, bundle: BundleRecord, cohort: str) -> tuple[int, dict[str, np.ndarray],
                                                                          dict[str, np.ndarray], str]:
    """The cohort's newest ``(version, exact params, held params, held digest)``; version 0 is the bundle's."""
    prev = state.storage.latest_update(bundle.bundle_id, cohort)
    if prev is None:
        initial = initial_params(state, bundle)
        return 0, initial, initial, params_digest(initial)
    held = _blob_params(state, prev.held_blob or prev.blob, prev.held_sha256 or prev.sha256, prev.version)
    return prev.version, _blob_params(state, prev.blob, prev.sha256, prev.version), held, params_digest(held)


def _blob_params(state: ServerState, blob: str, sha256: str, version: int) -> dict[str, np.ndarray]:
    values = decode_arrays(state.blobs.get(blob))
    if params_digest(values) != sha256:
        raise BlobCorruptError(f"update v{version}: parameters do not match sha256 {sha256}")
    return values


def nonnegative_names(spec: BundleSpec) -> frozenset[str]:
    """The parameters that must be >= 0: those some model of the bundle needs so (the union of its models'
    ``nonnegative_params``) and the adaptable layers' variances (a negative one makes the graph's
    normalisation NaN)."""
    return frozenset(n for names in spec.nonnegative.values() for n in names) | frozenset(spec.variances)


def project_nonnegative(spec: BundleSpec, params: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """``params`` with every negative value of a parameter that must be >= 0 (:func:`nonnegative_names`) set
    to 0, and how many values that changed: the projection of a server-computed result (distillation,
    aggregation with a server learning rate) onto what every device can run. Submissions never carry a
    negative one (:func:`submit_update` refuses it), so for a mean of them this is defence in depth."""
    out, clamped = dict(params), 0
    for name in sorted(nonnegative_names(spec)):
        if name in out:
            arr = np.asarray(out[name], dtype=np.float32)
            negative = arr < 0
            if negative.any():
                clamped += int(negative.sum())
                out[name] = np.where(negative, np.float32(0.0), arr)
    return out, clamped


def _all_finite(params: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.all(np.isfinite(v))) for v in params.values())


def _lossy_update(spec: BundleSpec, checked: Mapping[str, np.ndarray], base_exact: Mapping[str, np.ndarray],
                  base_held: Mapping[str, np.ndarray], encoding: str, topk_fraction: float
                  ) -> tuple[bytes, dict[str, np.ndarray], str]:
    """``(payload, what devices hold after it, "")`` of the delta from ``base_held`` to ``checked`` with error
    feedback, or ``(b"", {}, why)`` when that delta must not be sent and the update goes in full: it would leave
    devices a negative value of a parameter that must be >= 0 where the exact one is not (int8 rounding around 0),
    or it is not finite in float32 (finite parameters far apart: a step from near -max to near +max overflows,
    and one near the float32 limit can decode past it) — a held state with inf would make every later delta of
    the cohort inf too, so no later update could be published."""
    with np.errstate(over="ignore", invalid="ignore"):
        delta = {k: checked[k] - base_exact[k] for k in checked}
        residual = {k: base_exact[k] - base_held[k] for k in checked}
        if not (_all_finite(delta) and _all_finite(residual)
                and _all_finite({k: delta[k] + residual[k] for k in checked})):
            return b"", {}, "is not finite in float32 (parameters too far apart)"
        payload = compress_delta(delta, residual, encoding, topk_fraction).payload
        held = decode_update(payload, encoding, base_held, spec.param_shapes)
    if not _all_finite(held):
        return b"", {}, "would decode to non-finite values on devices (parameters near the float32 limit)"
    if decoded_below_zero(held, checked, nonnegative_names(spec)):
        return b"", {}, "would hold a negative value of a parameter that must be >= 0"
    return payload, held, ""


def publish_update(
    state: ServerState, bundle_id: str, kind: str, params: Mapping[str, np.ndarray], round_id: int | None = None,
    cohort: str = DEFAULT_COHORT, project: bool = False,
) -> ParameterUpdate:
    """Store a parameter set as the cohort's next version, encoded for sending, and wake watchers.

    ``project`` (for results the server computed itself: rounds) first sets negative values of the bundle's
    ``nonnegative_params`` and variances to 0 (:func:`project_nonnegative`, logged); otherwise such a value is
    refused.

    Every adaptable parameter is required; trainable names ``params`` leaves out keep the previous version's
    values (e.g. a distillation round moves only the adaptable parameters of a bundle that also carries
    trainable weights).

    With a delta encoding (``state.update_encoding``) the payload is the difference to what the cohort's
    devices hold, compressed with error feedback: the residual is the exact previous parameters minus the
    held ones, so what a message leaves out is sent with the next one (:mod:`runtime.update_codec`).
    """
    if kind not in UPDATE_KINDS:
        raise InvalidRequestError(f"update kind {kind!r} is not one of {UPDATE_KINDS}")
    check_id(cohort, "cohort")
    bundle = resolve_bundle(state, bundle_id)
    spec = require_parameters(bundle, f"publishing a parameter update ({kind})")
    if project:
        params, clamped = project_nonnegative(spec, params)
        if clamped:
            logger.warning("%s update of bundle %s: %d negative value(s) of parameters that must be >= 0 (its "
                           "models' nonnegative_params, variances) set to 0", kind, bundle.bundle_id, clamped)
    given = _checked_params(spec, params, partial=True)  # after a projection no negative variance is left
    missing = sorted(set(spec.initial_shapes) - set(given))
    if missing:
        raise InvalidTensorError(f"missing adaptable parameter(s) {missing}")
    with state.publish_lock:
        base_version, base_exact, base_held, base_sha = _base_of(state, bundle, cohort)
        checked = {**base_exact, **given}
        encoding = state.update_encoding
        if encoding == "f32":
            payload, held = encode_full(checked), checked
            base_version, base_sha = 0, ""
        else:
            payload, held, why_full = _lossy_update(spec, checked, base_exact, base_held, encoding,
                                                    state.update_topk_fraction)
            if why_full:
                logger.info("update of bundle %s sent as f32: its %s delta %s", bundle.bundle_id, encoding, why_full)
                encoding, payload, held = "f32", encode_full(checked), checked
                base_version, base_sha = 0, ""
        digest, held_sha = params_digest(checked), params_digest(held)
        record = state.storage.insert_update(UpdateRecord(
            0, bundle.bundle_id, kind, round_id, state.blobs.put(encode_arrays(checked)), digest, state.clock(),
            cohort, state.blobs.put(encode_arrays(held)), held_sha, encoding, base_version, base_sha,
            state.blobs.put(payload)))
    state.broker.publish(record.version)
    logger.info("published update %s/v%d (%s, %s, %d payload bytes) for bundle %s", cohort, record.version, kind,
                encoding, len(payload), bundle.bundle_id)
    return ParameterUpdate(record.version, bundle.bundle_id, kind, round_id, checked, digest, record.created_ms,
                           cohort)


def current_params(state: ServerState, bundle_id: str, cohort: str = DEFAULT_COHORT
                   ) -> tuple[dict[str, np.ndarray], int]:
    """The cohort's newest exact parameters and their version (the manifest's initial values and 0 before any)."""
    bundle = resolve_bundle(state, bundle_id)
    version, exact, _, _ = _base_of(state, bundle, cohort)
    return exact, version


def signed_update(state: ServerState, record: UpdateRecord, held_version: int) -> SignedUpdate:
    """The message for a device holding ``held_version``: the stored delta when its base matches, else the
    update's held parameters in full; signed with the server's update key (unsigned when it has none)."""
    if record.payload_blob and record.encoding != "f32" and record.base_version == held_version:
        payload, encoding, base_version, base_sha = (state.blobs.get(record.payload_blob), record.encoding,
                                                     record.base_version, record.base_sha256)
    else:
        held = _blob_params(state, record.held_blob or record.blob, record.held_sha256 or record.sha256,
                            record.version)
        payload, encoding, base_version, base_sha = encode_full(held), "f32", 0, ""
    return _signed(state, record, payload, encoding, base_version, base_sha, record.held_sha256 or record.sha256)


def _signed(state: ServerState, record: UpdateRecord, payload: bytes, encoding: str, base_version: int,
            base_sha: str, after_sha: str) -> SignedUpdate:
    """``record``'s header for this payload (``after_sha``: the digest of what the device holds after it),
    signed with the server's update key (unsigned when it has none)."""
    header = UpdateHeader(record.bundle_id, record.cohort, record.version, base_version, record.kind,
                          record.round_id or 0, record.created_ms, encoding, payload_digest(payload), after_sha,
                          base_sha)
    signer = state.signer
    if signer is None:
        return SignedUpdate(header, payload, b"", "")
    return SignedUpdate(header, payload, signer.sign(header), signer.key_id)


def watch_updates(
    state: ServerState, device_id: str, bundle_id: str, since_version: int, max_wait_s: float,
    is_active: Callable[[], bool], held_version: int | None = None,
) -> Iterator[SignedUpdate]:
    """Validate the request, then return an iterator over the bundle's updates newer than ``since_version``.

    Updates are the device's cohort's. ``held_version`` (None: ``since_version``) is the version whose
    parameters the device holds; an update whose delta base differs is sent in full.
    The iterator yields stored updates, then blocks on the broker for new ones until ``max_wait_s`` passes
    (0: no limit), the server shuts down, or ``is_active()`` turns false. The device's acknowledged version
    is recorded as each update is handed over for sending.
    """
    device = require_device(state, device_id)
    bundle = resolve_bundle(state, bundle_id)
    require_parameters(bundle, "watching parameter updates (WatchUpdates)")
    held = since_version if held_version is None else held_version
    if since_version < 0 or held < 0 or not math.isfinite(max_wait_s) or max_wait_s < 0:
        raise InvalidRequestError(f"since_version {since_version}, held_version {held} and max_wait_seconds "
                                  f"{max_wait_s} must be >= 0")
    deadline = time.monotonic() + min(max_wait_s, MAX_WAIT_SECONDS) if max_wait_s > 0 else None
    return _watch(state, _Watch(device_id, bundle.bundle_id, device.cohort, since_version, held), deadline, is_active)


@dataclass
class _Watch:
    device_id: str
    bundle_id: str
    cohort: str
    last: int
    held: int


def _watch(
    state: ServerState, w: _Watch, deadline: float | None, is_active: Callable[[], bool],
) -> Iterator[SignedUpdate]:
    broker = state.broker
    if not broker.try_open_watch():  # taken on first iteration, so a never-started stream holds no slot
        raise TooManyWatchersError(f"all {broker.watchers} update-watch slots are taken; retry later")
    try:
        while is_active() and not broker.closed:
            seen = broker.latest
            for record in state.storage.updates_since(w.bundle_id, w.last, w.cohort):
                update = signed_update(state, record, w.held)
                state.storage.set_acked_version(w.device_id, record.version)  # recorded as it is sent
                w.last = w.held = record.version
                yield update
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            broker.wait_for(seen, remaining, cancelled=lambda: not is_active())
    finally:
        broker.close_watch()


class HeldCache:
    """What each device holds after a lossy :func:`pull_update` reply: ``(device, bundle, cohort) -> (digest,
    parameters)``, least recently used first out beyond ``max_bytes``. A device missing here (evicted, or the
    server restarted) is answered from a published version's parameters when its digest matches one, else in
    full, so the cache only saves bytes and never decides correctness."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        """Keep at most ``max_bytes`` of parameters."""
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str, str, str], tuple[str, dict[str, np.ndarray], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, device_id: str, bundle_id: str, cohort: str) -> tuple[str, dict[str, np.ndarray]] | None:
        """The digest and parameters last sent to the device, or None."""
        with self._lock:
            entry = self._entries.get((device_id, bundle_id, cohort))
            if entry is None:
                return None
            self._entries.move_to_end((device_id, bundle_id, cohort))
            return entry[0], entry[1]

    def put(self, device_id: str, bundle_id: str, cohort: str, digest: str, params: dict[str, np.ndarray]) -> None:
        """Remember what the device holds now."""
        size = sum(int(v.nbytes) for v in params.values())
        key = (device_id, bundle_id, cohort)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            if size > self.max_bytes:
                return
            self._entries[key] = (digest, params, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, _, n) = self._entries.popitem(last=False)
                self._bytes -= n


def held_cache(state: ServerState) -> HeldCache:
    """The server's :class:`HeldCache` (one per :class:`ServerState`, made on first use)."""
    with _CACHE_LOCK:
        cache = state.__dict__.get("_held_cache")
        if cache is None:
            cache = state.__dict__["_held_cache"] = HeldCache()
        return cache


def pull_update(
    state: ServerState, device_id: str, bundle_id: str, held_version: int, held_sha256: str,
) -> SignedUpdate | None:
    """The cohort's newest exact parameters for a device that holds ``held_version`` with digest
    ``held_sha256``: None when it is up to date; else, with a delta encoding, the delta from exactly what it
    holds (what this server last sent it, or a published version's parameters) compressed without a residual
    (the base already is the device's state, so what is left out now is in the next reply); else in full."""
    device = require_device(state, device_id)
    bundle = resolve_bundle(state, bundle_id)
    require_parameters(bundle, "pulling a parameter update (PullUpdate)")
    cohort = device.cohort
    if held_version < 0:
        raise InvalidRequestError(f"held_version must be >= 0, got {held_version}")
    latest = state.storage.latest_update(bundle.bundle_id, cohort)
    if latest is None or held_version > latest.version:
        if latest is None and held_version == 0:
            return None
        raise InvalidRequestError(f"held_version {held_version} is not a published version of cohort {cohort!r} "
                                  f"(newest {0 if latest is None else latest.version})")
    cache = held_cache(state)
    cached = cache.get(device_id, bundle.bundle_id, cohort)
    if held_version == latest.version and held_sha256 in {latest.sha256, latest.held_sha256 or latest.sha256} | (
            {cached[0]} if cached else set()):
        return None
    exact = _blob_params(state, latest.blob, latest.sha256, latest.version)
    encoding, base = state.update_encoding, None
    if encoding != "f32" and held_sha256:
        if cached is not None and cached[0] == held_sha256:
            base = cached[1]
        else:
            try:
                for candidate in version_params(state, bundle, cohort, held_version):
                    if params_digest(candidate) == held_sha256:
                        base = candidate
                        break
            except InvalidRequestError:
                base = None
    after: dict[str, np.ndarray] | None = None
    if base is not None and set(base) == set(exact):
        with np.errstate(over="ignore", invalid="ignore"):  # a delta or its decoding past the float32 limit: in full
            delta = {k: exact[k] - base[k] for k in exact}
            if _all_finite(delta):
                payload = compress_delta(delta, None, encoding, state.update_topk_fraction, PULL_DENSE_BELOW).payload
                after = decode_update(payload, encoding, base, spec_of(bundle).param_shapes)
                after = after if _all_finite(after) else None
        base_version, base_sha = held_version, held_sha256
    if after is None:
        payload, encoding, base_version, base_sha, after = encode_full(exact), "f32", 0, "", exact
    after_sha = latest.sha256 if after is exact else params_digest(after)
    if after is not exact:  # recorded before the reply: a device's submission from it is checked against it,
        # after a restart or the cache's eviction too (the cache only saves bytes)
        state.storage.record_sent(device_id, bundle.bundle_id, cohort, latest.version, after_sha, state.clock())
        cache.put(device_id, bundle.bundle_id, cohort, after_sha, after)
    return _signed(state, latest, payload, encoding, base_version, base_sha, after_sha)
