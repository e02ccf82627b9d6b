"""Parameter updates and federated submissions: validate, store as blobs, publish versions, stream them.

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
from server.codec import decode_arrays, encode_arrays
from server.errors import BlobCorruptError, InvalidRequestError, InvalidTensorError, TooManyWatchersError
from server.manifest import BundleSpec
from server.records import SubmissionRecord, UpdateRecord
from server.state import ServerState, require_device, resolve_bundle, spec_of

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
    require_device(state, device_id)
    bundle = resolve_bundle(state, bundle_id)
    if num_samples <= 0:
        raise InvalidRequestError(f"num_samples must be positive, got {num_samples}")
    latest = state.storage.latest_version()
    if not 0 <= base_version <= latest:
        raise InvalidRequestError(f"base_version {base_version} is not a published version (0..{latest})")
    checked = _checked_params(spec_of(bundle), params, partial=True)
    blob = state.blobs.put(encode_arrays(checked))
    record = SubmissionRecord(device_id, bundle.bundle_id, base_version, num_samples, blob, state.clock())
    return state.storage.insert_submission(record)


@dataclass(frozen=True)
class ParameterUpdate:
    """A versioned full set of adaptable parameters for one bundle."""

    version: int
    bundle_id: str
    kind: str
    round_id: int | None
    params: dict[str, np.ndarray]
    sha256: str
    created_ms: int


def publish_update(
    state: ServerState, bundle_id: str, kind: str, params: Mapping[str, np.ndarray], round_id: int | None = None
) -> ParameterUpdate:
    """Store a full parameter set as the next version and wake watchers."""
    if kind not in UPDATE_KINDS:
        raise InvalidRequestError(f"update kind {kind!r} is not one of {UPDATE_KINDS}")
    bundle = resolve_bundle(state, bundle_id)
    checked = _checked_params(spec_of(bundle), params, partial=False)
    digest = params_digest(checked)
    blob = state.blobs.put(encode_arrays(checked))
    record = state.storage.insert_update(bundle.bundle_id, kind, round_id, blob, digest, state.clock())
    state.broker.publish(record.version)
    logger.info("published update v%d (%s) for bundle %s", record.version, kind, bundle.bundle_id)
    return load_update(state, record, checked)


def load_update(
    state: ServerState, record: UpdateRecord, params: Mapping[str, np.ndarray] | None = None
) -> ParameterUpdate:
    """The update's parameters (read from the blob store unless given), checked against its sha256."""
    values = dict(params) if params is not None else decode_arrays(state.blobs.get(record.blob))
    if params_digest(values) != record.sha256:
        raise BlobCorruptError(f"update v{record.version}: parameters do not match sha256 {record.sha256}")
    return ParameterUpdate(record.version, record.bundle_id, record.kind, record.round_id, values,
                           record.sha256, record.created_ms)


def current_params(state: ServerState, bundle_id: str) -> tuple[dict[str, np.ndarray], int]:
    """The bundle's newest parameters and their version (the manifest's initial values and 0 before any)."""
    bundle = resolve_bundle(state, bundle_id)
    latest = state.storage.latest_update(bundle.bundle_id)
    if latest is None:
        return {k: v.copy() for k, v in spec_of(bundle).initial.items()}, 0
    return load_update(state, latest).params, latest.version


def watch_updates(
    state: ServerState, device_id: str, bundle_id: str, since_version: int, max_wait_s: float,
    is_active: Callable[[], bool],
) -> Iterator[ParameterUpdate]:
    """Validate the request, then return an iterator over the bundle's updates newer than ``since_version``.

    The iterator yields stored updates, then blocks on the broker for new ones until ``max_wait_s`` passes
    (0: no limit), the server shuts down, or ``is_active()`` turns false. The device's acknowledged version
    is recorded as each update is handed over for sending.
    """
    require_device(state, device_id)
    bundle = resolve_bundle(state, bundle_id)
    if since_version < 0 or not math.isfinite(max_wait_s) or max_wait_s < 0:
        raise InvalidRequestError(f"since_version {since_version} and max_wait_seconds {max_wait_s} must be >= 0")
    deadline = time.monotonic() + min(max_wait_s, MAX_WAIT_SECONDS) if max_wait_s > 0 else None
    return _watch(state, device_id, bundle.bundle_id, since_version, deadline, is_active)


def _watch(
    state: ServerState, device_id: str, bundle_id: str, last: int, deadline: float | None,
    is_active: Callable[[], bool],
) -> Iterator[ParameterUpdate]:
    broker = state.broker
    if not broker.try_open_watch():  # taken on first iteration, so a never-started stream holds no slot
        raise TooManyWatchersError(f"all {broker.watchers} update-watch slots are taken; retry later")
    try:
        while is_active() and not broker.closed:
            seen = broker.latest
            for record in state.storage.updates_since(bundle_id, last):
                update = load_update(state, record)
                state.storage.set_acked_version(device_id, record.version)  # recorded as it is sent
                last = record.version
                yield update
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            broker.wait_for(seen, remaining, cancelled=lambda: not is_active())
    finally:
        broker.close_watch()
