"""Shared state and look-ups for the handlers: storage, blob store, broker, limits, clock; id checks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.blobstore import BlobStore, sha256_hex
from server.broker import UpdateBroker
from server.errors import (
    BlobCorruptError,
    InvalidRequestError,
    NoAdaptableParametersError,
    NoBundlePublishedError,
    UnknownBundleError,
    UnknownDeviceError,
)
from server.manifest import BundleSpec, bundle_spec
from server.records import BundleRecord, DeviceRecord, Storage
from server.update_signer import UpdateSigner

MAX_ID_LENGTH = 128


def now_ms() -> int:
    """Wall-clock time in Unix milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Limits:
    """Size limits enforced by the handlers."""

    max_upload_bytes: int = 64 << 20
    max_samples_per_upload: int = 4096
    max_bundle_bytes: int = 512 << 20


@dataclass
class ServerState:
    """Everything the handlers work on: metadata storage, blob store, update broker, limits and a clock.

    ``trusted_publishers``: raw Ed25519 public keys whose bundle signatures are accepted (None: any valid
    signature, which proves integrity but not origin). ``signer`` signs parameter updates (None: sent
    unsigned); ``update_encoding`` / ``update_topk_fraction`` choose how they are encoded
    (:mod:`runtime.update_codec`); ``publish_lock`` serialises publishing so each delta has one base.
    ``bundle_specs`` caches the parsed spec of each bundle id (bundles are content-addressed and immutable), so
    an upload does not read the registry for them.
    """

    storage: Storage
    blobs: BlobStore
    broker: UpdateBroker
    limits: Limits
    clock: Callable[[], int] = now_ms
    trusted_publishers: tuple[bytes, ...] | None = None
    signer: UpdateSigner | None = None
    update_encoding: str = "int8_delta"
    update_topk_fraction: float = 1.0
    publish_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    bundle_specs: dict[str, BundleSpec] = field(default_factory=dict, repr=False)


def check_id(value: str, what: str) -> str:
    """Require a non-empty printable id of at most :data:`MAX_ID_LENGTH` characters."""
    if not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        shown = repr(value[:MAX_ID_LENGTH]) + (f"… ({len(value)} characters)" if len(value) > MAX_ID_LENGTH else "")
        raise InvalidRequestError(f"{what} {shown} must be 1-{MAX_ID_LENGTH} printable characters")
    return value


def require_device(state: ServerState, device_id: str) -> DeviceRecord:
    """The registered device ``device_id`` (touching its last-seen time), or :class:`UnknownDeviceError`."""
    device = state.storage.get_device(device_id)
    if device is None:
        raise UnknownDeviceError(f"device {device_id!r} is not registered; call Register first")
    state.storage.touch_device(device_id, state.clock())
    return device


def resolve_bundle(state: ServerState, bundle_id: str) -> BundleRecord:
    """The bundle ``bundle_id``, or the current bundle when ``bundle_id`` is empty."""
    if not bundle_id:
        bundle = state.storage.current_bundle()
        if bundle is None:
            raise NoBundlePublishedError("no bundle has been published yet")
        return bundle
    bundle = state.storage.get_bundle(bundle_id)
    if bundle is None:
        raise UnknownBundleError(f"unknown bundle {bundle_id!r}")
    return bundle


def spec_of(bundle: BundleRecord) -> BundleSpec:
    """The validated :class:`BundleSpec` of a stored bundle."""
    return bundle_spec(bundle.manifest)


def require_parameters(bundle: BundleRecord, what: str, *, adaptable: bool = False) -> BundleSpec:
    """The bundle's spec when it has federated parameters (with ``adaptable``: adaptable ones, which a
    distillation moves); else :class:`NoAdaptableParametersError` naming the bundle, why and ``what`` was asked."""
    spec = spec_of(bundle)
    if not spec.param_shapes or (adaptable and not spec.initial_shapes):
        manifest = bundle.manifest
        raise NoAdaptableParametersError(
            f"bundle {bundle.bundle_id} ({manifest.get('name', '')!r}, arch {manifest.get('arch', '')!r}) has no "
            f"adaptable parameters: its manifest has no 'adaptable' block (a wrapped foreign model, served as "
            f"published), so {what} is not possible for it")
    return spec


SMALL_TENSOR_BYTES = 16 << 10  # uploaded sample tensors up to this size live in the registry, larger as blobs


def sample_tensor(state: ServerState, digest: str) -> bytes:
    """The verified bytes of an uploaded sample tensor: from the registry's small-tensor table (stored in the
    upload's own transaction) or else the blob store; :class:`BlobCorruptError` when they do not hash to it."""
    data = state.storage.get_tensor(digest)
    if data is None:
        return state.blobs.get(digest)
    actual = sha256_hex(data)
    if actual != digest:
        raise BlobCorruptError(f"sample tensor {digest} is corrupt in the registry: its bytes hash to {actual}")
    return data


def spec_by_id(state: ServerState, bundle_id: str) -> BundleSpec:
    """The spec of the stored bundle ``bundle_id`` (cached: a bundle id names immutable content)."""
    spec = state.bundle_specs.get(bundle_id)
    if spec is None:
        spec = state.bundle_specs[bundle_id] = spec_of(resolve_bundle(state, bundle_id))
    return spec
