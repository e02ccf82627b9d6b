"""Exceptions raised by the device agent; each message names the offending id, file, version or value."""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every device-agent error."""


class TransportError(AgentError):
    """An RPC to the server failed; ``code`` is the gRPC status code name (e.g. ``"UNAVAILABLE"``)."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method} failed with {code}: {details}")
        self.method = method
        self.code = code
        self.details = details


class OutboxError(AgentError):
    """The outbox database cannot be opened (not a database, corrupt, locked, another schema), read or written
    (a damaged page, a lock held too long, disk full); names the file."""


class BundleDownloadError(AgentError):
    """A downloaded bundle is malformed: bad chunk stream, unsafe path, or a file that fails its sha256."""


class UpdateRejectedError(AgentError):
    """A parameter update cannot be applied."""


class UpdateIntegrityError(UpdateRejectedError):
    """An update's parameters do not match its sha256, or it belongs to another bundle."""


class StaleUpdateError(UpdateRejectedError):
    """An update's version is not newer than the version already applied."""


class UpdateRefusedError(UpdateRejectedError):
    """An authentic update for this device (signature, bundle, cohort and order checked) that its model refuses
    (e.g. a value out of range): the device records the version as seen, keeps its parameters and reports it."""


class BaseMismatchError(UpdateRejectedError):
    """A delta update applies to a base version other than the one the device holds (it needs a full one)."""


class DivergedHistoryError(BaseMismatchError):
    """A delta on the version the device holds, but from other parameters than the device holds for it: the
    server's update history is not the one the device followed (e.g. the server's registry was reset)."""
