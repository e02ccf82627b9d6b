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


@dataclass(frozen=True)
class ParameterUpdate:
    """A versioned set of adaptable parameters for one bundle; ``sha256`` is ``params_digest(params)``."""

    version: int
    bundle_id: str
    kind: str
    params: dict[str, np.ndarray] = field(repr=False)
    sha256: str
    created_ms: int = 0
    round_id: int = 0


@dataclass(frozen=True)
class UploadResult:
    """Outcome of draining an outbox: samples sent, newly stored, already stored, left for a retry."""

    batches: int = 0
    sent: int = 0
    stored: int = 0
    duplicates: int = 0
    retried: int = 0
    bytes_sent: int = 0
