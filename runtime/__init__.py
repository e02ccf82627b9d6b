"""Device-side runtime: verified bundles, one session interface, the adaptable model. Never imports torch."""

from runtime.bundle import Bundle, load_bundle
from runtime.errors import (
    BackendUnavailableError,
    BundleError,
    BundleIntegrityError,
    EdgeloopRuntimeError,
    GoldenMismatchError,
    InputError,
    ManifestError,
    ModelLoadError,
    SignatureError,
)
from runtime.manifest import Manifest, read_manifest
from runtime.model import AdaptableModel, ForwardResult, entropy, softmax
from runtime.session import Session, open_session

__all__ = [
    "AdaptableModel",
    "BackendUnavailableError",
    "Bundle",
    "BundleError",
    "BundleIntegrityError",
    "EdgeloopRuntimeError",
    "ForwardResult",
    "GoldenMismatchError",
    "InputError",
    "Manifest",
    "ManifestError",
    "ModelLoadError",
    "Session",
    "SignatureError",
    "entropy",
    "load_bundle",
    "open_session",
    "read_manifest",
    "softmax",
]
