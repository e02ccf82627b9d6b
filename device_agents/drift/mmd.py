"""Online MMD drift detection on feature windows (Gretton et al. 2012, "A kernel two-sample test", JMLR 13),
with the RBF kernel approximated by random Fourier features (Rahimi & Recht 2007, NeurIPS) and the threshold
calibrated to an expected run time (as alibi-detect's ``MMDDriftOnline``; see :mod:`device_agents.drift.windowed`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from device_agents.drift.base import check_positive_int
from device_agents.drift.windowed import WindowedEmbeddingDetector


def median_heuristic(x: np.ndarray, max_rows: int = 1000, seed: int = 0) -> float:
    """The median pairwise Euclidean distance between rows of ``x`` (on at most ``max_rows`` rows)."""
    rows = np.asarray(x, dtype=np.float64)
    if rows.shape[0] > max_rows:
        rows = rows[np.random.default_rng(seed).choice(rows.shape[0], max_rows, replace=False)]
    sq = np.sum(rows * rows, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T
    dist = np.sqrt(np.maximum(d2[np.triu_indices(rows.shape[0], 1)], 0.0))
    med = float(np.median(dist))
    if not med > 0:
        raise ValueError("the reference rows are all identical: the median-heuristic bandwidth is 0")
    return med


class MMDDrift(WindowedEmbeddingDetector):
    """Maximum mean discrepancy between a sliding window of feature vectors and a reference set.

    Features are standardised by the reference's per-dimension mean and standard deviation (``standardize``);
    the kernel is ``k(x, y) = exp(−‖x − y‖² / (2σ²))`` with ``σ`` the median pairwise distance of the
    standardised reference (the median heuristic), approximated by ``n_features`` random Fourier features
    ``φ(x) = sqrt(2/D)·cos(xΩ + b)``, ``Ω ~ N(0, σ⁻²)``, ``b ~ U[0, 2π)``, so that ``k(x, y) ≈ φ(x)·φ(y)``. The
    statistic after each update is the (biased) MMD² between the last ``window_size`` rows and the reference,

        MMD²_t = ‖ mean_{i ∈ window} φ(x_i) − mean_{r ∈ reference} φ(r) ‖²,

    which costs ``O(d·D)`` per row, however long the reference. A drift is signalled when it exceeds the
    threshold calibrated to ``ert`` (see :mod:`device_agents.drift.windowed`); each simulated no-change run
    splits the reference at random into halves, one for the reference embedding and one to draw the run
    from, so the estimation error of the reference mean is part of the null (which makes the threshold
    slightly conservative for the full reference used at run time).

    Parameters
    ----------
    reference
        Source feature vectors ``(n, d)``; None to learn them from the first ``reference_size`` rows after
        each reset (then ``dim`` is required).
    window_size
        Rows per test window.
    ert
        Expected run time (updates) to a false alarm when nothing changes.
    n_features
        Random Fourier features ``D``.
    bandwidth
        Kernel width ``σ``; None for the median heuristic on the reference.
    standardize
        Scale each feature by the reference's standard deviation before the kernel.
    dim, reference_size
        Feature dimension and reference length when ``reference`` is None.
    n_runs, run_length, seed
        Calibration: simulated no-change runs, their length, and the seed of the features and simulation.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> reference = rng.normal(0.0, 1.0, (500, 8))
    >>> stream = np.concatenate([rng.normal(0.0, 1.0, (300, 8)), rng.normal(0.5, 1.0, (300, 8))])
    >>> mmd = MMDDrift(reference, window_size=32, ert=10_000)
    >>> for i, row in enumerate(stream):
    ...     if mmd.update(row).drift_detected:
    ...         print(f"Change detected at index {i}")
    ...         break
    Change detected at index 320

    The reference stays, so while the shift lasts a drift is signalled again each time the window refills:

    >>> MMDDrift(reference, window_size=32, ert=10_000).update_many(stream)
    [320, 352, 384, 416, 448, 480, 512, 544, 576]
    """

    def __init__(
        self,
        reference: np.ndarray | None,
        window_size: int = 96,
        ert: float = 1_000_000,
        n_features: int = 512,
        bandwidth: float | None = None,
        standardize: bool = True,
        *,
        dim: int | None = None,
        reference_size: int = 1000,
        n_runs: int = 100,
        run_length: int = 2000,
        seed: int = 0,
    ) -> None:
        self.n_features = check_positive_int("n_features", n_features)
        if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be finite and > 0, got {bandwidth}")
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.standardize = bool(standardize)
        if reference is None and dim is None:
            raise ValueError("dim is required when reference is None")
        ref_dim = np.shape(reference)[-1] if reference is not None else dim
        if reference is not None and dim is not None and dim != ref_dim:
            raise ValueError(f"dim={dim} disagrees with the reference's {ref_dim} columns")
        super().__init__(int(ref_dim), reference, window_size, ert, reference_size, n_runs, run_length, seed)

    def _params(self) -> dict[str, Any]:
        return {"dim": self.dim, "window_size": self.window_size, "ert": self.ert, "n_features": self.n_features,
                "bandwidth": self.bandwidth, "standardize": self.standardize, "given_reference": self._given,
                "seed": self.seed}

    def _fit(self, reference: np.ndarray) -> None:
        self._center = reference.mean(axis=0) if self.standardize else np.zeros(self.dim)
        self._scale = reference.std(axis=0) + 1e-6 if self.standardize else np.ones(self.dim)
        sigma = self.bandwidth or median_heuristic((reference - self._center) / self._scale, seed=self.seed)
        rng = np.random.default_rng([self.seed, 1])
        self.sigma_ = sigma
        self._omega = rng.normal(0.0, 1.0 / sigma, (self.dim, self.n_features))
        self._phase = rng.uniform(0.0, 2.0 * math.pi, self.n_features)
        self._ref_mean = self._embed(reference).mean(axis=0)

    def _embed(self, x: np.ndarray) -> np.ndarray:
        # einsum, not BLAS: a row's result does not depend on the other rows of the batch
        projected = np.einsum("nd,dk->nk", (x - self._center) / self._scale, self._omega)
        return math.sqrt(2.0 / self.n_features) * np.cos(projected + self._phase)

    def _score(self, window_mean: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        diff = window_mean - (self._ref_mean if reference is None else reference)
        return np.sum(diff * diff, axis=-1)

    def _null_pools(self, reference: np.ndarray, rng: np.random.Generator, run: int
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        if run == 0:
            self._ref_embedded = self._embed(reference)
        order = rng.permutation(reference.shape[0])
        half = reference.shape[0] // 2
        emb = self._ref_embedded
        return emb[order[half:]], emb[order[:half]].mean(axis=0)
