"""Dirichlet label-skew partition and byzantine attacks: coverage, determinism, skew, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from device_agents.fleet.byzantine import ATTACKS, attack
from edgeloop.data.partition import dirichlet_partition


def test_partition_covers_every_sample_once_and_is_reproducible() -> None:
    labels = np.repeat(np.arange(10), 100)
    a = dirichlet_partition(labels, 20, 0.5, seed=0)
    b = dirichlet_partition(labels, 20, 0.5, seed=0)
    c = dirichlet_partition(labels, 20, 0.5, seed=1)
    flat = np.concatenate(a)
    assert len(a) == 20 and flat.size == 1000 and np.unique(flat).size == 1000
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 200)

    def mean_classes(alpha: float) -> float:
        parts = dirichlet_partition(labels, 10, alpha, seed=3)
        return float(np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 5) for p in parts]))

    assert mean_classes(0.1) < 5 < mean_classes(100.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"labels": np.zeros((2, 2), int), "n_clients": 2, "alpha": 1.0}, "1-D"),
    ({"labels": np.zeros(4), "n_clients": 2, "alpha": 1.0}, "integers"),
    ({"labels": np.zeros(4, int), "n_clients": 0, "alpha": 1.0}, "n_clients"),
    ({"labels": np.zeros(4, int), "n_clients": 2, "alpha": float("nan")}, "alpha"),
    ({"labels": np.zeros(4, int), "n_clients": 5, "alpha": 1.0}, "cannot give"),
])
def test_partition_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(**kwargs)


def test_attacks_transform_updates_as_documented() -> None:
    delta = {"w": np.array([1.0, -2.0], np.float32)}
    rng = np.random.default_rng(0)
    assert np.array_equal(attack("sign_flip", delta, rng, 2.0)["w"], [-2.0, 4.0])
    assert np.array_equal(attack("scaled", delta, rng, 3.0)["w"], [3.0, -6.0])
    noise = attack("random", {"w": np.zeros(10_000, np.float32)}, rng, 2.0)["w"]
    assert noise.dtype == np.float32 and 1.9 < float(noise.std()) < 2.1
    assert set(ATTACKS) == {"sign_flip", "scaled", "random"}
    with pytest.raises(ValueError, match="unknown byzantine attack"):
        attack("nope", delta, rng)
    with pytest.raises(ValueError, match="scale"):
        attack("scaled", delta, rng, -1.0)
