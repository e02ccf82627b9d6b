"""Domain errors raised by the server's handlers and storage; servicers map them to gRPC status codes."""

from __future__ import annotations


class ServerError(Exception):
    """Base class of every server domain error."""


class InvalidRequestError(ServerError, ValueError):
    """A request is malformed: a missing id, a negative count, an unknown round kind …"""


class InvalidTensorError(InvalidRequestError):
    """A tensor has the wrong dtype, shape, name or holds NaN/inf."""


class InvalidBundleError(InvalidRequestError):
    """A published bundle is inconsistent: bad manifest, missing/extra file, sha256 mismatch."""


class SampleIdConflictError(InvalidRequestError):
    """An uploaded sample id is already stored for another device (ids are ``<device>:<session>:<position>``):
    acknowledging it as a duplicate would make the uploader drop a sample the server never stored."""


class PayloadTooLargeError(ServerError):
    """A request exceeds a configured size limit (bytes or item count)."""


class TooManyWatchersError(ServerError):
    """Every update-watch slot is taken; the device should retry later."""


class UnknownDeviceError(ServerError):
    """The device has not registered."""


class UnknownBundleError(ServerError):
    """No bundle with this id was ever published."""


class NoBundlePublishedError(ServerError):
    """The operation needs a current bundle and none is published yet."""


class NothingToAggregateError(ServerError):
    """A round found no unused submissions (fedavg) or no unused samples (distill)."""


class NoAdaptableParametersError(ServerError):
    """The operation needs the bundle's adaptable parameters (a submission, an update, a round), but the bundle
    was published without any: a wrapped foreign model (no ``adaptable`` block) is served as published."""


class DistillerUnavailableError(ServerError):
    """A distillation round was asked for but no distiller is configured."""


class UnknownRoundError(ServerError):
    """No round with this id exists."""


class StorageError(ServerError, RuntimeError):
    """The registry or blob store is unusable (schema from the future, unreadable file …); a RuntimeError, so
    that callers reporting start-up failures (``edgeloop serve``) print its message rather than a traceback."""


class BlobNotFoundError(StorageError, KeyError):
    """No blob with this digest is stored."""

    def __str__(self) -> str:
        """The message itself (``KeyError`` would quote it)."""
        return str(self.args[0]) if self.args else ""


class BlobCorruptError(StorageError):
    """A stored blob's bytes no longer hash to its digest."""


class UnknownBundleFileError(UnknownBundleError):
    """The bundle exists but has no file at the requested path."""


class ServerShuttingDownError(ServerError):
    """The server is stopping and accepts no new work."""


class AuthenticationError(ServerError):
    """A call carries no credential, or one the server does not know (a bad token or enrollment secret)."""


class PermissionDeniedError(ServerError):
    """A valid credential used for something it does not allow (another device's data, the admin service)."""


class RateLimitedError(ServerError):
    """A device (or an enrolling peer) made more calls than its rate limit allows; retry later."""


class EnrollmentDisabledError(ServerError):
    """``Enroll`` was called but the server has no enrollment secret (insecure development mode)."""
