"""Exceptions raised by the device runtime. Each message names the offending file, model, tensor or value."""

from __future__ import annotations


class EdgeloopRuntimeError(Exception):
    """Base class of every runtime error."""


class BundleError(EdgeloopRuntimeError):
    """A bundle cannot be used."""


class ManifestError(BundleError):
    """manifest.json is missing, unreadable, or does not follow the schema."""


class BundleIntegrityError(BundleError):
    """A file named by the manifest is missing or its sha256 does not match."""


class GoldenMismatchError(BundleError):
    """A model's outputs on the golden inputs differ from the recorded outputs beyond tolerance."""


class InputError(EdgeloopRuntimeError, ValueError):
    """A tensor fed to the runtime has the wrong name, shape or dtype, or holds NaN/inf."""


class BackendUnavailableError(EdgeloopRuntimeError):
    """The requested inference backend is not installed or cannot load the model."""


class ModelLoadError(BackendUnavailableError):
    """The backend is installed but cannot load this model file (corrupt, or not what the manifest says)."""


class SignatureError(BundleError):
    """manifest.sig is missing or malformed, does not verify, or the signer is not trusted."""
