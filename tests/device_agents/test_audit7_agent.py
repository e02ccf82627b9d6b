"""Agent edge cases from an audit: a drift detector that refuses a batch's signal (an MMD reference learnt from
identical feature rows) must not cost the batch its predictions; a stream position the outbox cannot hold is
refused before anything changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agents.agent import Agent, AgentConfig
from device_agents.drift import MMDDrift, PageHinkley
from device_agents.health import Health, HealthPolicy
from device_agents.outbox import SqliteOutbox
from device_agents.selection import EntropyBandSelector, SelectorConfig
from device_agents.tta import AlphaBN, SourceModel
from runtime.errors import InputError
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


@pytest.mark.parametrize(("position", "why"), [
    (-5, "must lie in 0..2"), (2**63 - 4, "must lie in 0..2"), (2**64, "must lie in 0..2"),
    (1.7, "must be an integer stream position, got float"), ("3", "got str"), (True, "got bool"),
])
def test_a_position_the_outbox_cannot_hold_is_refused_before_anything_changes(tiny_model, tiny_batch,
                                                                               tmp_path: Path, position: object,
                                                                               why: str) -> None:
    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=None))
    tta = AlphaBN()
    agent = Agent(tiny_model, tta, PageHinkley(), selector, SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20),
                  None, AgentConfig(device_id="dev-1", bundle_id="a" * 64))
    agent.process_batch(tiny_batch[:8])
    before = (tta.snapshot(), agent.detector.snapshot(), agent.stats, agent.outbox.pending_count)
    with pytest.raises(InputError, match=why):
        agent.process_batch(tiny_batch[8:], position=position)  # type: ignore[arg-type]
    after = (tta.snapshot(), agent.detector.snapshot(), agent.stats, agent.outbox.pending_count)
    for name in before[0]:
        np.testing.assert_array_equal(after[0][name], before[0][name], err_msg=name)
    for name in before[1]:
        np.testing.assert_array_equal(after[1][name], before[1][name], err_msg=name)
    assert after[2:] == before[2:]
    assert agent.process_batch(tiny_batch[8:], position=np.int64(8)).queued_ids[0] == f"dev-1:{agent.session_id}:8"


@pytest.mark.parametrize("kwargs", [{"max_entropy_increase": float("nan")}, {"max_agreement_drop": float("nan")},
                                    {"max_agreement_drop": "0.1"}, {"recent_samples": 2.5},
                                    {"recent_samples": True}])
def test_a_health_policy_that_would_roll_back_every_update_is_refused(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"health {name} must be"):
        HealthPolicy(**kwargs)  # NaN: every update rolled back ("entropy rose 0.200 -> 0.200 (> nan)")
    assert HealthPolicy(max_agreement_drop=float("inf")).verdict(Health(0.2, 1.0), Health(0.2, 0.0)) == ""
