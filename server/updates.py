"""Parameter updates and federated submissions: validate, store as blobs, publish per-cohort versions
encoded as deltas (:mod:`runtime.update_codec`), sign and stream them.

Plain functions over numpy dicts; watchers block on :class:`~server.broker.UpdateBroker`, never poll.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError
from runtime.params import params_digest, validate_params
from runtime.update_codec import compress_delta, decode_update, encode_full
from runtime.update_signing import UpdateHeader, payload_digest
from server.codec import decode_arrays, encode_arrays
from server.errors import BlobCorruptError, InvalidRequestError, InvalidTensorError, TooManyWatchersError
from server.manifest import BundleSpec
from server.records import DEFAULT_COHORT, BundleRecord, SubmissionRecord, UpdateRecord
from server.state import ServerState, check_id, require_device, resolve_bundle, spec_of

logger = logging.getLogger(__name__)
UPDATE_KINDS = ("distill", "fedavg")
MAX_WAIT_SECONDS = 86_400.0  # a longer max_wait_seconds waits this long (beyond ~292 years, timed waits overflow)


def _checked_params(spec: BundleSpec, params: Mapping[str, np.ndarray], partial: bool) -> dict[str, np.ndarray]:
    if not params:
        raise InvalidTensorError("no parameter tensors given")
    try:
        return validate_params(params, spec.param_shapes, partial=partial)
    except InputError as exc:
        raise InvalidTensorError(str(exc)) from exc


def submit_update(
    state: ServerState, device_id: str, bundle_id: str, base_version: int, num_samples: int,
    params: Mapping[str, np.ndarray],
) -> int:
    """Store a device's adapted parameters (names/shapes checked against the bundle); return the id."""
    device = require_device(state, device_id)
    bundle = resolve_bundle(state, bundle_id)
    if num_samples <= 0:
        raise InvalidRequestError(f"num_samples must be positive, got {num_samples}")
    latest = state.storage.latest_version(device.cohort)
    if not 0 <= base_version <= latest:
        raise InvalidRequestError(f"base_version {base_version} is not a published version (0..{latest})")
    checked = _checked_params(spec_of(bundle), params, partial=True)
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
        initial = {k: np.asarray(v, dtype=np.float32) for k, v in spec_of(bundle).initial.items()}
        return 0, initial, initial, params_digest(initial)
    held = _blob_params(state, prev.held_blob or prev.blob, prev.held_sha256 or prev.sha256, prev.version)
    return prev.version, _blob_params(state, prev.blob, prev.sha256, prev.version), held, params_digest(held)


def _blob_params(state: ServerState, blob: str, sha256: str, version: int) -> dict[str, np.ndarray]:
    values = decode_arrays(state.blobs.get(blob))
    if params_digest(values) != sha256:
        raise BlobCorruptError(f"update v{version}: parameters do not match sha256 {sha256}")
    return values


def publish_update(
    state: ServerState, bundle_id: str, kind: str, params: Mapping[str, np.ndarray], round_id: int | None = None,
    cohort: str = DEFAULT_COHORT,
) -> ParameterUpdate:
    """Store a full parameter set as the cohort's next version, encoded for sending, and wake watchers.

    With a delta encoding (``state.update_encoding``) the payload is the difference to what the cohort's
    devices hold, compressed with error feedback: the residual is the exact previous parameters minus the
    held ones, so what a message leaves out is sent with the next one (:mod:`runtime.update_codec`).
    """
    if kind not in UPDATE_KINDS:
        raise InvalidRequestError(f"update kind {kind!r} is not one of {UPDATE_KINDS}")
    check_id(cohort, "cohort")
    bundle = resolve_bundle(state, bundle_id)
    spec = spec_of(bundle)
    checked = _checked_params(spec, params, partial=False)
    with state.publish_lock:
        base_version, base_exact, base_held, base_sha = _base_of(state, bundle, cohort)
        encoding = state.update_encoding
        if encoding == "f32":
            payload, held = encode_full(checked), checked
            base_version, base_sha = 0, ""
        else:
            delta = {k: checked[k] - base_exact[k] for k in checked}
            residual = {k: base_exact[k] - base_held[k] for k in checked}
            payload = compress_delta(delta, residual, encoding, state.update_topk_fraction).payload
            held = decode_update(payload, encoding, base_held, spec.param_shapes)
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
    header = UpdateHeader(record.bundle_id, record.cohort, record.version, base_version, record.kind,
                          record.round_id or 0, record.created_ms, encoding, payload_digest(payload),
                          record.held_sha256 or record.sha256, base_sha)
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
