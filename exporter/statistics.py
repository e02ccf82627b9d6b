"""Source statistics of a bundle's penultimate features, shared by our own bundles and foreign ones.

``source_statistics`` in the manifest holds the prediction entropy's mean and standard deviation and the
accuracy, and references the numeric blocks: in schema version 2 (:func:`write_statistic_blocks`) the feature
mean and variance go into ``source_features.bin`` (every device fetches it) and the class-conditional
Gaussians (means, counts, shared covariance) into ``class_statistics.bin`` (fetched only by a device that
scores drift by Mahalanobis distance or seeds T3A with them), both compressed float32 blocks
(:mod:`runtime.blocks`); our bundles and foreign ones (:mod:`exporter.foreign`) both write them. Schema version 1
kept the feature statistics inline and the Gaussians in :data:`STATISTICS` (still read by the runtime and the
server). numpy only (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.blocks import encode_block
from runtime.model import entropy

STATISTICS = "source_statistics.npz"  # schema version 1
FEATURES_FILE = "source_features.bin"  # schema version 2
CLASS_STATISTICS_FILE = "class_statistics.bin"  # schema version 2


def check_labels(y: np.ndarray, n: int, num_classes: int | None = None) -> np.ndarray:
    """Validate ``n`` integer labels (in ``[0, num_classes)`` when given); return them as int64."""
    arr = np.asarray(y)
    if arr.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes):
        where = "be >= 0" if num_classes is None else f"lie in [0, {num_classes})"
        raise ValueError(f"labels must {where}, got range [{arr.min()}, {arr.max()}]")
    return arr


def output_statistics(probs: np.ndarray, features: np.ndarray, source_y: np.ndarray | None) -> dict[str, Any]:
    """Feature mean/var, entropy mean/std, accuracy (None without ``source_y``) and — with labels — the
    class-conditional Gaussians of ``features`` (N, D) given class probabilities ``probs`` (N, K)."""
    p = np.asarray(probs, dtype=np.float64)
    ft = np.asarray(features, dtype=np.float64)
    if p.ndim != 2 or ft.ndim != 2 or len(p) != len(ft) or len(p) == 0:
        raise ValueError(f"probs {p.shape} and features {ft.shape} must be (N, K) and (N, D) with N >= 1")
    ent = entropy(p)
    stats: dict[str, Any] = {
        "features": {"mean": ft.mean(0).tolist(), "var": ft.var(0).tolist()},
        "entropy": {"mean": float(ent.mean()), "std": float(ent.std())},
        "accuracy": None,
    }
    if source_y is not None:
        y = check_labels(source_y, len(p), p.shape[1])
        stats["accuracy"] = float((p.argmax(1) == y).mean())
        stats["class_conditional"] = class_gaussians(ft, y, p.shape[1])
    return stats


def class_gaussians(features: np.ndarray, y: np.ndarray, num_classes: int, shrinkage: float = 1e-3) -> dict[str, Any]:
    """Class-conditional feature means and one shared (pooled within-class) covariance, for Mahalanobis
    drift scores (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples").

    The covariance is shrunk towards its mean diagonal by ``shrinkage`` so that it is invertible on a device.
    """
    f = np.asarray(features, dtype=np.float64)
    counts = np.bincount(y, minlength=num_classes)
    means = np.zeros((num_classes, f.shape[1]))
    for c in np.flatnonzero(counts):
        means[c] = f[y == c].mean(axis=0)
    centred = f - means[y]
    cov = centred.T @ centred / max(len(f) - int((counts > 0).sum()), 1)
    cov += shrinkage * float(np.trace(cov)) / cov.shape[0] * np.eye(cov.shape[0])
    return {"means": means, "counts": counts, "shared_covariance": cov, "shrinkage": shrinkage}


def write_statistic_blocks(tmp: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Schema version 2: move the feature mean/var of ``stats`` into :data:`FEATURES_FILE` and the
    class-conditional Gaussians into :data:`CLASS_STATISTICS_FILE` (float32 blocks, the covariance's upper
    triangle only); return the manifest's ``source_statistics`` block referencing them."""
    out = {k: v for k, v in stats.items() if k not in ("features", "class_conditional", "layers")}
    mean = np.asarray(stats["features"]["mean"], dtype=np.float32)
    var = np.asarray(stats["features"]["var"], dtype=np.float32)
    (tmp / FEATURES_FILE).write_bytes(encode_block({"mean": mean, "var": var}))
    out["features"] = {"file": FEATURES_FILE, "dim": int(mean.shape[0])}
    gauss = stats.get("class_conditional")
    if gauss is not None:
        cov = np.asarray(gauss["shared_covariance"], dtype=np.float32)
        means = np.asarray(gauss["means"], dtype=np.float32)
        arrays = {"means": means, "counts": np.asarray(gauss["counts"], np.int64),
                  "shared_covariance_upper": cov[np.triu_indices(cov.shape[0])]}  # symmetric: half is enough
        (tmp / CLASS_STATISTICS_FILE).write_bytes(encode_block(arrays))
        out["class_conditional"] = {"file": CLASS_STATISTICS_FILE, "classes": int(means.shape[0]),
                                    "dim": int(means.shape[1]), "covariance_storage": "upper_triangle_row_major",
                                    "shrinkage": gauss["shrinkage"]}
    return out
