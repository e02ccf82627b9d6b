"""Selector edge cases from an audit: degenerate predictions (uniform over K classes) whose normalised entropy
rounds above 1 in float32."""

from __future__ import annotations

import numpy as np
import pytest

from device_agents.selection import EntropyBandSelector, SelectorConfig
from device_agents.tta import normalized_entropy


@pytest.mark.parametrize("k", [2, 3, 10, 1000])
def test_a_selector_fed_uniform_predictions_restores_its_own_snapshot(k: int) -> None:
    entropies = normalized_entropy(np.full((8, k), 1.0 / k, np.float32))  # e.g. 1.0000000084 for K = 10
    config = SelectorConfig(low=0.0, high=1.0, bytes_per_window=1000, window_seconds=60.0)
    selector = EntropyBandSelector(config)
    for _ in range(3):
        chosen = selector.select(entropies, 10)
        assert chosen.tolist() == list(range(8))  # entropy 1 lies in a band reaching high = 1: nothing is lost
    assert selector.running_mean_entropy is not None and 0.0 <= selector.running_mean_entropy <= 1.0
    restarted = EntropyBandSelector(config)
    restarted.restore(selector.snapshot())  # refused before: 'mean_entropy' must lie in [0, 1]
    assert restarted.running_mean_entropy == selector.running_mean_entropy

