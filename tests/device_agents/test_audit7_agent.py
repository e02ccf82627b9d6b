"""Agent edge cases from an audit: a drift detector that refuses a batch's signal (an MMD reference learnt from
identical feature rows) must not cost the batch its predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agents.agent import Agent, AgentConfig
from device_agents.drift import MMDDrift
from device_agents.tta import SourceModel
from tests.device_agents.conftest import TinyAdaptableModel


def test_a_detector_refusing_the_signal_costs_the_batch_its_drift_check_not_its_predictions(tmp_path: Path) -> None:
    model = TinyAdaptableModel()
    detector = MMDDrift(None, dim=TinyAdaptableModel.channels, reference_size=64, window_size=8, ert=1000,
                        n_runs=10, run_length=50)
    agent = Agent(model, SourceModel(), detector, None, None, None, AgentConfig(device_id="dev-1", bundle_id="a" * 64))
    blank = np.zeros((16, 1, 8, 8), np.float32)  # a covered camera: every feature row the same
    for _ in range(3):
        agent.process_batch(blank)
    assert detector.n_seen == 48
    result = agent.process_batch(blank)  # its 64th row completes a reference of identical rows: refused
    assert result.pred.shape == (16,) and not result.drift
    assert detector.n_seen == 0 and not detector.fitted  # that reference is dropped: it learns a new one
    varied = np.random.default_rng(0).random((96, 1, 8, 8), dtype=np.float32)
    agent.process_batch(varied)  # the stream varies again: a reference is learnt and the detector goes on
    assert detector.fitted and detector.n_seen == 96
    stats = agent.stats
    assert stats.samples_seen == 160 and stats.samples_not_watched == 1
