"""Drift detection by the Mahalanobis distance of features to the class-conditional source Gaussians of the
bundle (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples and adversarial
attacks", NeurIPS: class means, one shared covariance, the score is the distance to the closest class)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agents.drift.windowed import WindowedEmbeddingDetector

if TYPE_CHECKING:
    from runtime.bundle import Bundle


class MahalanobisScorer:
    """``s(x) = min_k (x − μ_k)ᵀ Σ_λ⁻¹ (x − μ_k)`` with the shrunk covariance ``Σ_λ = (1−λ)Σ + λ·(tr Σ / d)·I``.

    The features are whitened once by the inverse Cholesky factor of ``Σ_λ`` (``einsum``, so each row's score
    is computed the same way whatever the batch), then the squared distances to the whitened means are taken.
    """

    def __init__(self, means: np.ndarray, covariance: np.ndarray, shrinkage: float = 0.01) -> None:
        mu = np.asarray(means, dtype=np.float64)
        cov = np.asarray(covariance, dtype=np.float64)
        if mu.ndim != 2 or mu.shape[0] < 1:
            raise ValueError(f"means must have shape (classes, dim), got {mu.shape}")
        dim = mu.shape[1]
        if cov.shape != (dim, dim) or not np.all(np.isfinite(cov)) or not np.all(np.isfinite(mu)):
            raise ValueError(f"covariance must be a finite ({dim}, {dim}) matrix, got shape {cov.shape}")
        if not (math.isfinite(shrinkage) and 0.0 <= shrinkage <= 1.0):
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        sym = (cov + cov.T) / 2.0
        scale = float(np.trace(sym)) / dim
        if not scale > 0:
            raise ValueError("covariance has a non-positive trace")
        shrunk = (1.0 - shrinkage) * sym + shrinkage * scale * np.eye(dim)
        try:
            chol = np.linalg.cholesky(shrunk)
        except np.linalg.LinAlgError as exc:
            raise ValueError(f"covariance is not positive definite after shrinkage {shrinkage}; raise it") from exc
        self.dim = dim
        self.shrinkage = float(shrinkage)
        self._whiten = np.linalg.inv(chol).T  # x @ W has identity covariance
        self._means = np.einsum("kd,de->ke", mu, self._whiten)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Scores of rows ``x`` ``(n, dim)`` → ``(n,)``."""
        z = np.einsum("nd,de->ne", np.asarray(x, dtype=np.float64), self._whiten)
        diff = z[:, None, :] - self._means[None, :, :]
        return np.min(np.sum(diff * diff, axis=-1), axis=1)


class MahalanobisDrift(WindowedEmbeddingDetector):
    """Drift when the mean Mahalanobis score (:class:`MahalanobisScorer`) of the last ``window_size`` feature
    vectors exceeds a threshold calibrated to an expected run time ``ert`` on reference scores (see
    :mod:`device_agents.drift.windowed`).

    The Gaussians come from the bundle (:meth:`from_bundle`: class means and the shared covariance in its
    source statistics). The reference scores that set the threshold come from ``reference`` (source features)
    or, when it is None, from the first ``reference_size`` rows after each reset: a device that starts in its
    source domain calibrates itself, and re-learns after a drift.

    Parameters
    ----------
    means, covariance
        Class means ``(K, d)`` and the shared covariance ``(d, d)``.
    window_size
        Rows whose mean score is tested.
    ert
        Expected run time (updates) to a false alarm when nothing changes.
    shrinkage
        Covariance shrinkage λ toward a scaled identity.
    reference, reference_size
        Source feature vectors for the calibration, or None to use the first ``reference_size`` rows.
    n_runs, run_length, seed
        Calibration: simulated no-change runs, their length, and the seed.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(3)
    >>> means = np.array([[0.0, 0.0], [4.0, 4.0]])
    >>> stream = np.concatenate([rng.normal(0.0, 1.0, (400, 2)), rng.normal(1.0, 1.5, (200, 2))])
    >>> det = MahalanobisDrift(means, np.eye(2), window_size=16, ert=10_000, reference_size=200)
    >>> for i, row in enumerate(stream):
    ...     if det.update(row).drift_detected:
    ...         print(f"Change detected at index {i}")
    Change detected at index 410
    >>> MahalanobisDrift(means, np.eye(2), window_size=16, ert=10_000, reference_size=200).update_many(stream)
    [410]
    """

    def __init__(
        self,
        means: np.ndarray,
        covariance: np.ndarray,
        window_size: int = 32,
        ert: float = 1_000_000,
        shrinkage: float = 0.01,
        reference: np.ndarray | None = None,
        *,
        reference_size: int = 1000,
        n_runs: int = 200,
        run_length: int = 2000,
        seed: int = 0,
    ) -> None:
        self.scorer = MahalanobisScorer(means, covariance, shrinkage)
        super().__init__(self.scorer.dim, reference, window_size, ert, reference_size, n_runs, run_length, seed)

    @classmethod
    def from_bundle(cls, bundle: Bundle, **kwargs: Any) -> MahalanobisDrift:
        """A detector on the class-conditional Gaussians recorded in ``bundle``'s source statistics. Classes the
        source samples did not cover (count 0: their recorded mean is a placeholder zero vector) are left out,
        so that no row scores against a mean no class ever had."""
        gaussians = bundle.manifest.class_gaussians(bundle.root)
        if gaussians is None:
            raise ValueError(f"bundle {bundle.manifest.name!r} records no class-conditional source statistics")
        means, cov, counts = gaussians
        present = np.asarray(counts) > 0
        if not present.any():
            raise ValueError(f"bundle {bundle.manifest.name!r} records class-conditional statistics of no class "
                             "(every class count is 0)")
        return cls(np.asarray(means)[present], cov, **kwargs)

    def _params(self) -> dict[str, Any]:
        return {"dim": self.dim, "window_size": self.window_size, "ert": self.ert,
                "shrinkage": self.scorer.shrinkage, "given_reference": self._given, "seed": self.seed}

    def _fit(self, reference: np.ndarray) -> None:
        pass  # the Gaussians are fixed; the reference only sets the threshold

    def _embed(self, x: np.ndarray) -> np.ndarray:
        return self.scorer(x)[:, None]

    def _score(self, window_mean: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        return window_mean[:, 0]
