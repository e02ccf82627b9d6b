"""Domain objects exchanged between the agent and its transport (no protobuf types leak past the client)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RegisterInfo:
    """The server's answer to a registration: the bundle to run and the newest update version."""

    device_id: str
    bundle_id: str
    latest_update_version: int
    bundle_files: tuple[str, ...]
    cohort: str = "default"
    update_public_key: bytes = b""


@dataclass(frozen=True)
class ParameterUpdate:
    """A versioned update of one cohort's adaptable parameters for one bundle.

    From the server it carries an encoded ``payload`` (``encoding`` against ``base_version``, see
    :mod:`runtime.update_codec`) and an Ed25519 ``signature`` over its header (:mod:`runtime.update_signing`);
    ``params`` is then None until the agent decodes it against the parameters it holds. A local update (tests,
    benchmarks) gives ``params`` directly, unsigned. ``sha256`` is ``params_digest`` of the parameters the
    device holds after applying the update.
    """

    version: int
    bundle_id: str
    kind: str
    params: dict[str, np.ndarray] | None = field(repr=False)
    sha256: str
    created_ms: int = 0
    round_id: int = 0
    cohort: str = "default"
    base_version: int = 0
    encoding: str = "f32"
    payload: bytes = field(default=b"", repr=False)
    base_sha256: str = ""
    signature: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class RollbackInfo:
    """What a device reports after undoing an update whose health check failed; a health value that was not
    measured (no batch seen yet, no golden vectors) is ``-1.0``."""

    bundle_id: str
    cohort: str
    version: int
    restored_version: int
    reason: str
    entropy_before: float
    entropy_after: float
    agreement_before: float
    agreement_after: float


@dataclass(frozen=True)
class UploadResult:
    """Outcome of draining an outbox: samples sent, newly stored, already stored, left for a retry."""

    batches: int = 0
    sent: int = 0
    stored: int = 0
    duplicates: int = 0
    retried: int = 0
    bytes_sent: int = 0
