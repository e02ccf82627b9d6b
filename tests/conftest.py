"""Shared session fixtures: sklearn digits arrays, a small_cnn trained on them, its checkpoint and a bundle.

Everything is seeded; the model trains in a second or two on CPU. Fixtures are session-scoped: treat the
returned model as read-only (``copy.deepcopy`` it before changing weights).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

DIGITS_SEED = 0
DIGITS_TRAIN_FRACTION = 0.7
DIGITS_LABELS = [str(i) for i in range(10)]


@pytest.fixture(scope="session")
def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: sklearn digits / 16 as float32 (N, 1, 8, 8), int64 labels.

    A fixed seeded 70/30 split (``np.random.default_rng(0).permutation``).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(x))
    n_train = int(DIGITS_TRAIN_FRACTION * len(x))
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="session")
def digits_model(digits_arrays: tuple[np.ndarray, ...]) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, spec, metrics)``: small_cnn trained on the digits train split (seeded, eval mode)."""
    from exporter.train import TrainConfig, train_model

    x_train, y_train, _, _ = digits_arrays
    config = TrainConfig(arch="small_cnn", epochs=10, batch_size=64, lr=3e-3, seed=0, threads=1)
    return train_model("small_cnn", x_train, y_train, config)


@pytest.fixture(scope="session")
def digits_checkpoint(
    digits_model: tuple[Any, Any, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """``(path, sha256)`` of a checkpoint of :func:`digits_model` (meta: dataset "digits")."""
    from exporter.checkpoint import save_checkpoint

    model, spec, _ = digits_model
    path = tmp_path_factory.mktemp("digits_ckpt") / "small_cnn.pt"
    sha = save_checkpoint(model, "small_cnn", spec, path, {"dataset": "digits"})
    return path, sha


@pytest.fixture(scope="session")
def signing_key() -> Any:
    """The Ed25519 private key that signs :func:`digits_bundle` (re-sign a bundle a test edits with it)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def digits_bundle(
    digits_arrays: tuple[np.ndarray, ...],
    digits_checkpoint: tuple[Path, str],
    tmp_path_factory: pytest.TempPathFactory,
    signing_key: Any,
) -> Path:
    """A bundle (fp32 + int8, golden α 0.5) exported from :func:`digits_checkpoint`; read-only, shared.

    Golden inputs are the first 8 test samples; calibration uses 256 train samples; source statistics
    and accuracy come from the train split.
    """
    from exporter.bundle import export_bundle

    x_train, y_train, x_test, _ = digits_arrays
    out = tmp_path_factory.mktemp("digits_bundle") / "bundle"
    return export_bundle(
        digits_checkpoint[0],
        out,
        labels=DIGITS_LABELS,
        calibration_x=x_train[:256],
        golden_x=x_test[:8],
        source_x=x_train,
        source_y=y_train,
        int8=True,
        name="digits-small_cnn",
        golden_alpha=0.5,
        signing_key=signing_key,
    )
