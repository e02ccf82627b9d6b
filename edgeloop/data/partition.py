"""Split a labelled dataset across simulated clients with Dirichlet label skew (Hsu et al. 2019).

For each class, the class's sample indices are shuffled and cut into ``n_clients`` pieces whose sizes follow a
draw from Dirichlet(α·1): small α gives each client a few dominant classes, large α approaches an IID split.
Deterministic under ``seed`` (numpy's PCG64), so two runs — or two frameworks fed the same split — see the same
clients. numpy only.
"""

from __future__ import annotations

import numpy as np


def dirichlet_partition(labels: np.ndarray, n_clients: int, alpha: float, seed: int = 0,
                        min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``n_clients`` clients (sorted), Dirichlet(``alpha``) label skew.

    Redraws (up to ``max_tries`` times, with the same generator) until every client holds at least ``min_size``
    samples; raises ``ValueError`` naming the problem for bad arguments or when that cannot be met.

    >>> parts = dirichlet_partition(np.repeat(np.arange(3), 20), n_clients=4, alpha=0.5, seed=0)
    >>> sorted(np.concatenate(parts).tolist()) == list(range(60))
    True
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    for name, value in (("n_clients", n_clients), ("min_size", min_size), ("max_tries", max_tries)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n_clients <= 0:
        raise ValueError(f"n_clients must be positive, got {n_clients}")
    numeric = not isinstance(alpha, bool) and isinstance(alpha, int | float | np.number)
    if not (numeric and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if min_size < 0 or n_clients * min_size > y.size:
        raise ValueError(f"cannot give each of {n_clients} clients {min_size} of {y.size} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.size for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({alpha}) split of {y.size} samples gave all {n_clients} clients "
                     f">= {min_size} samples in {max_tries} tries; raise alpha or lower min_size")
