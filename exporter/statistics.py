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


def check_labels(y: np.ndarray, n: int, num_classes: int | None = None, what: str = "labels") -> np.ndarray:
    """Validate ``n`` integer labels (in ``[0, num_classes)`` when given); return them as int64. Errors name the
    labels as ``what`` (e.g. ``"source_y"``)."""
    arr = np.asarray(y)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},) (one label per sample), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes):
        where = "be >= 0" if num_classes is None else f"lie in [0, {num_classes})"
        raise ValueError(f"{what} must {where}, got range [{arr.min()}, {arr.max()}]")
    return arr


def check_source_data(source_x: np.ndarray, source_y: np.ndarray | None, num_classes: int) -> np.ndarray | None:
    """Refuse source samples whose statistics would be degenerate, before any work; return ``source_y`` checked
    (int64, one label in ``[0, num_classes)`` per sample of ``source_x``) or None without labels.

    The feature variances need 2 different samples (one sample's are zero). With labels, the class-conditional
    Gaussians' shared covariance (:func:`class_gaussians`: pooled within-class, ``N − K`` degrees of freedom for
    the ``K`` classes present) needs a class with 2 different samples: with one sample per class every sample
    is its class mean and the covariance is zero, which a device's Mahalanobis drift detector refuses. Other
    classes may have one sample (their mean is recorded, the covariance is shared) or none (count 0).
    """
    x = np.asarray(source_x)
    n = len(x)
    flat = x.reshape(n, -1)
    if source_y is None:
        if n < 2:
            raise ValueError(f"source_x has {n} sample; the source statistics need at least 2 "
                             "(the feature variances of a single sample are zero)")
        if not _varies(flat):
            raise ValueError(f"source_x's {n} samples are all identical; the source statistics need at least 2 "
                             "different samples (the feature variances would be zero)")
        return None
    y = check_labels(source_y, n, num_classes, what="source_y")
    classes = np.unique(y)
    if n <= len(classes):
        raise ValueError(
            f"source_x has {n} sample{'s' if n != 1 else ''} in {len(classes)} class(es) of source_y; the "
            f"class-conditional source statistics need at least {len(classes) + 1}, a class with 2 samples "
            "(with one sample per class the shared covariance is zero)")
    if not any(_varies(flat, np.flatnonzero(y == c)) for c in classes):
        raise ValueError(f"no class of source_y has 2 different samples in source_x ({n} samples, "
                         f"{len(classes)} classes): the shared within-class covariance would be zero")
    return y


def _varies(rows: np.ndarray, index: np.ndarray | None = None, chunk: int = 256) -> bool:
    """Whether the rows of ``rows`` (N, D) — those listed in ``index`` when given — are not all equal (compared
    in chunks: a different row usually comes first, and a large source set is never copied whole)."""
    index = np.arange(len(rows)) if index is None else index
    if len(index) < 2:
        return False
    first = rows[index[0]]
    return any(bool(np.any(rows[index[i : i + chunk]] != first)) for i in range(1, len(index), chunk))


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
    if not np.any(np.asarray(stats["features"]["var"]) > 0):
        raise ValueError(f"the model's features on the {len(ft)} samples of source_x do not vary (every feature "
                         "variance is zero): the source statistics would be degenerate")
    if source_y is not None:
        y = check_labels(source_y, len(p), p.shape[1], what="source_y")
        stats["accuracy"] = float((p.argmax(1) == y).mean())
        gaussians = class_gaussians(ft, y, p.shape[1])
        if not float(np.trace(gaussians["shared_covariance"])) > 0:
            raise ValueError("the model's features on source_x do not vary within any class of source_y: the "
                             "shared covariance of the class-conditional statistics would be zero")
        stats["class_conditional"] = gaussians
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
