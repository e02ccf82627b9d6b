"""Agent: offline loop on the tiny model, update handling, and end to end against a real server + bundle."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agents.agent import Agent, AgentConfig
from device_agents.client import DeviceClient
from device_agents.drift import PageHinkley
from device_agents.errors import (
    OutboxError,
    StaleUpdateError,
    UpdateIntegrityError,
    UpdateRefusedError,
)
from device_agents.health import HealthPolicy
from device_agents.messages import ParameterUpdate
from device_agents.outbox import OutboxSample, SqliteOutbox
from device_agents.selection import EntropyBandSelector, SelectorConfig
from device_agents.tta import AlphaBN, AlphaBNConfig, SourceModel
from runtime import AdaptableModel, load_bundle
from runtime.errors import InputError
from runtime.params import params_digest

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = "a" * 64


class CountingAlphaBN(AlphaBN):
    """α-BN that counts drift resets."""

    def __init__(self, config: AlphaBNConfig | None = None) -> None:
        super().__init__(config)
        self.drift_calls = 0

    def on_drift(self) -> None:
        self.drift_calls += 1
        super().on_drift()


def _update(version: int, params: dict[str, np.ndarray], bundle_id: str = BUNDLE) -> ParameterUpdate:
    return ParameterUpdate(version, bundle_id, "distill", params, params_digest(params))


def _offline(model, tmp_path: Path, **cfg) -> Agent:
    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=None))
    return Agent(model, CountingAlphaBN(), PageHinkley(threshold=2.0, mode="both", min_instances=20), selector,
                 SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20), None,
                 AgentConfig(device_id="dev-1", bundle_id=BUNDLE, **cfg))


def test_process_batch_predicts_counts_and_queues(tiny_model, tiny_batch, tmp_path: Path) -> None:
    agent = _offline(tiny_model, tmp_path)
    y = tiny_model.forward(tiny_batch, alpha=0.6).logits.argmax(1)
    result = agent.process_batch(tiny_batch, y)
    assert result.pred.shape == (32,) and result.probs.shape == (32, 3)
    assert np.all((result.entropy >= 0) & (result.entropy <= 1))
    assert result.selected == 32 and agent.outbox.pending_count == 32
    (first, *_) = agent.outbox.peek_batch(1, now_ms=10**13)
    assert first.sample_id == f"dev-1:{agent.session_id}:0" and first.input.shape == (1, 8, 8)
    assert first.features.shape == (4,)
    agent.process_batch(tiny_batch, position=0)  # a replayed position is stored once
    assert agent.outbox.pending_count == 32
    stats = agent.stats
    assert stats.samples_seen == 64 and stats.labelled_seen == 32 and stats.accuracy == 1.0


def test_an_outbox_that_cannot_be_written_loses_the_samples_not_the_batch(tiny_model, tiny_batch, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    agent = _offline(tiny_model, tmp_path)
    agent.outbox._conn.execute("PRAGMA query_only = ON")  # every write now fails, as on a full disk
    result = agent.process_batch(tiny_batch)  # predictions still come back; the samples are counted as lost
    assert result.pred.shape == (32,) and result.selected == 0 and result.queued_ids == ()
    stats = agent.stats
    assert stats.samples_seen == 32 and stats.samples_not_queued == 32 and agent.outbox.pending_count == 0
    assert any("o.db: could not store 32 samples" in r.getMessage() for r in caplog.records)
    with pytest.raises(OutboxError, match=r"o\.db: could not store"):  # what the outbox itself raises
        agent.outbox.put([OutboxSample("dev-1:x:0", BUNDLE, tiny_batch[0], None, 0.5, 0, 0, 0)], now_ms=0)


def test_drift_is_detected_recorded_and_resets_tta(tiny_model, tmp_path: Path) -> None:
    agent = _offline(tiny_model, tmp_path)
    rng = np.random.default_rng(0)
    calm = (rng.random((256, 1, 8, 8)) * 0.05 + 0.5).astype(np.float32)
    positions = []
    for i in range(0, 256, 8):
        positions += agent.process_batch(calm[i : i + 8]).drift_positions
    shifted = (rng.random((256, 1, 8, 8)) * 1.0).astype(np.float32)
    for i in range(0, 256, 8):
        positions += agent.process_batch(shifted[i : i + 8]).drift_positions
    assert positions and all(p >= 256 for p in positions)
    assert agent.stats.drift_positions == tuple(positions)
    assert agent.tta.drift_calls == len({p // 8 for p in positions})


@pytest.mark.parametrize(("mode", "has_input", "has_features"),
                         [("input", True, False), ("features", False, True), ("both", True, True)])
def test_upload_modes_choose_what_a_sample_carries(tiny_model, tiny_batch, tmp_path: Path, mode: str,
                                                   has_input: bool, has_features: bool) -> None:
    agent = _offline(tiny_model, tmp_path, upload_mode=mode)
    result = agent.process_batch(tiny_batch[:4])
    assert result.queued_ids == tuple(f"dev-1:{agent.session_id}:{i}" for i in range(4))
    for s in agent.outbox.peek_batch(10, now_ms=10**13):
        assert (s.input is not None, s.features is not None) == (has_input, has_features)
    per_sample = 4 * 64 * has_input + 4 * 4 * has_features  # float32 1×8×8 input, 4 features
    assert agent.selector.counters.bytes_selected == 4 * per_sample


def test_drift_boosts_the_selector_budget(tiny_model, tmp_path: Path) -> None:
    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=8 * 320,
                                                  window_seconds=3600.0, drift_boost=3.0))
    agent = Agent(tiny_model, CountingAlphaBN(), PageHinkley(threshold=0.01, min_instances=1, mode="both"),
                  selector, SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20), None,
                  AgentConfig(device_id="dev-1", bundle_id=BUNDLE))
    first = agent.process_batch(np.full((8, 1, 8, 8), 0.1, np.float32))
    assert first.selected == 8 and not first.drift  # the window's budget: 8 samples of 320 bytes
    second = agent.process_batch(np.full((8, 1, 8, 8), 0.9, np.float32))
    assert second.drift and selector.counters.drift_boosts == 1
    assert second.selected == 8  # only the boost's extra tokens made room
    assert agent.tta.drift_calls == 1


def test_drift_policy_none_keeps_tta_state(tiny_model, tmp_path: Path) -> None:
    agent = _offline(tiny_model, tmp_path, drift_policy="none")
    agent.detector = PageHinkley(threshold=0.01, min_instances=1, mode="both")
    agent.process_batch(np.full((4, 1, 8, 8), 0.1, np.float32))
    agent.process_batch(np.full((4, 1, 8, 8), 0.9, np.float32))
    assert agent.stats.drift_positions and agent.tta.drift_calls == 0


def test_apply_update_versions_integrity_and_rollback(tiny_model, tmp_path: Path) -> None:
    agent = _offline(tiny_model, tmp_path)
    original = tiny_model.params
    new = {k: v + 1.0 for k, v in original.items() if k.endswith(".bias")}
    agent.apply_update(_update(3, new))
    assert agent.version == agent.active_version == 3
    np.testing.assert_array_equal(tiny_model.params["bn1.bias"], original["bn1.bias"] + 1.0)
    with pytest.raises(StaleUpdateError, match="v3"):
        agent.apply_update(_update(3, new))
    with pytest.raises(UpdateIntegrityError, match="bundle"):
        agent.apply_update(_update(4, new, bundle_id="b" * 64))
    bad = ParameterUpdate(4, BUNDLE, "distill", new, "0" * 64)
    with pytest.raises(UpdateIntegrityError, match="hash"):
        agent.apply_update(bad)
    assert agent.version == 3
    # authentic updates the model refuses: their versions count as seen (not fetched again), parameters stay
    with pytest.raises(UpdateRefusedError, match="unknown"):
        agent.apply_update(_update(4, {"fc.weight": np.ones(3, np.float32)}))
    with pytest.raises(UpdateRefusedError, match="NaN"):
        agent.apply_update(_update(5, {"bn1.bias": np.full(4, np.nan, np.float32)}))
    assert (agent.version, agent.active_version) == (5, 3)
    np.testing.assert_array_equal(tiny_model.params["bn1.bias"], original["bn1.bias"] + 1.0)
    assert agent.stats.rejected_updates == 2
    assert agent.rollback() is True
    np.testing.assert_array_equal(tiny_model.params["bn1.bias"], original["bn1.bias"])
    assert (agent.version, agent.active_version) == (5, 0)
    assert agent.rollback() is False
    assert agent.stats.update_versions == (3,)


@pytest.mark.parametrize("harmful", [True, False])
def test_an_update_applied_before_any_batch_gets_its_entropy_check_on_the_next_batch(tiny_model, tiny_batch,
                                                                                   tmp_path: Path,
                                                                                   harmful: bool) -> None:
    """A fresh or restarted device has no recent batch to measure the entropy of an update on: the check waits for
    the first batch after it and compares the parameters before and after on that batch."""
    agent = _offline(tiny_model, tmp_path, health=HealthPolicy(max_entropy_increase=0.05, max_agreement_drop=1.0))
    original = tiny_model.params
    scale = 0.01 if harmful else 1.0  # shrinking every affine map flattens the outputs: entropy near its maximum
    update = {k: (scale * v if k.endswith((".weight", ".bias")) else v) + (0.0 if harmful else 1e-3)
              for k, v in original.items() if not k.endswith(".var")}
    assert agent.apply_update(_update(1, update)) is True  # nothing to measure the entropy on yet: applied
    agent.process_batch(tiny_batch)
    assert agent.version == 1
    if not harmful:
        assert agent.active_version == 1 and agent.rollbacks == []
        agent.process_batch(tiny_batch)
        assert agent.active_version == 1 and agent.rollbacks == []  # checked once
        return
    assert agent.active_version == 0
    (info,) = agent.rollbacks
    assert info.version == 1 and info.restored_version == 0 and "entropy rose" in info.reason
    assert info.entropy_after > info.entropy_before + 0.05
    for name, value in original.items():
        np.testing.assert_array_equal(tiny_model.params[name], value, err_msg=name)


@pytest.mark.parametrize(("labels", "match"), [(np.zeros(5, np.int64), "shape"), (np.zeros(8), "integer dtype"),
                                               (np.full(8, 3), r"0\.\.2"), (np.full(8, -1), r"0\.\.2")])
def test_bad_labels_raise_before_anything_is_predicted_counted_or_queued(tiny_model, tmp_path: Path, labels,
                                                                         match: str) -> None:
    agent = _offline(tiny_model, tmp_path)
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    state = agent.tta.snapshot()
    with pytest.raises(InputError, match=match):
        agent.process_batch(x, labels)
    assert agent.stats.samples_seen == 0 and agent.stats.labelled_seen == 0
    assert agent.outbox.pending_count == 0 and agent.detector.n_seen == 0 and tiny_model.calls == []
    assert state.keys() == agent.tta.snapshot().keys()
    assert agent.process_batch(x, np.zeros(8, np.int64)).queued_ids  # the agent goes on with good labels


def test_update_that_makes_outputs_non_finite_is_rolled_back(tiny_model, tiny_batch, tmp_path: Path) -> None:
    agent = _offline(tiny_model, tmp_path)  # the tiny model has no golden vectors: entropy is the only signal
    agent.process_batch(tiny_batch)
    original = tiny_model.params
    poisoned = {**original, "bn1.var": np.full(4, -10.0, np.float32)}  # finite, but sqrt(var + eps) is NaN
    with np.errstate(invalid="ignore"):
        assert agent.apply_update(_update(1, poisoned)) is False
    assert "nan" in agent.rollbacks[-1].reason and agent.rollbacks[-1].entropy_after == -1.0
    assert (agent.version, agent.active_version) == (1, 0)
    np.testing.assert_array_equal(tiny_model.params["bn1.var"], original["bn1.var"])
    assert np.isfinite(agent.process_batch(tiny_batch).probs).all()


def test_offline_sync_and_watcher(tiny_model, tmp_path: Path) -> None:
    agent = _offline(tiny_model, tmp_path)
    assert agent.sync().errors == ("no client: offline",)
    with pytest.raises(RuntimeError, match="client"):
        agent.start_watcher()
    with pytest.raises(ValueError, match="wait_seconds"):
        agent.sync(wait_seconds=0)


@pytest.mark.parametrize("kwargs", [{"device_id": ""}, {"drift_policy": "panic"}, {"upload_batch": 0},
                                    {"upload_mode": "pixels"}, {"max_pending_drift_reports": -1},
                                    {"watch_wait_seconds": 0.0}])
def test_agent_config_validation(kwargs: dict) -> None:
    base = {"device_id": "d", "bundle_id": BUNDLE}
    with pytest.raises(ValueError):
        AgentConfig(**{**base, **kwargs})


def _connected_agent(edge_server, tmp_path: Path, **cfg) -> tuple[Agent, DeviceClient]:
    client = DeviceClient(edge_server.target, "dev-e2e", timeout=5.0)
    info = client.register({"site": "lab"})
    path = client.fetch_bundle(info.bundle_id, tmp_path / "bundles")
    model = AdaptableModel(load_bundle(path, threads=1))
    # ~20 samples' worth of budget: the server fsyncs every stored tensor, so keep uploads small
    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=10_000,
                                                  window_seconds=3600.0))
    agent = Agent(model, SourceModel(), PageHinkley(threshold=1.0, mode="up"), selector,
                  SqliteOutbox(tmp_path / "outbox.db", max_bytes=8 << 20), client,
                  AgentConfig(device_id="dev-e2e", bundle_id=info.bundle_id, cohort=info.cohort,
                              update_keys=(info.update_public_key,), **cfg),
                  version=info.latest_update_version)
    return agent, client


def test_end_to_end_with_server(edge_server, tmp_path: Path, digits_test) -> None:
    from edgeloop.data import corrupt

    agent, client = _connected_agent(edge_server, tmp_path, watch_wait_seconds=0.5)
    x, y = digits_test
    stream = np.concatenate([x[:192], corrupt(x[192:384], "contrast", 5, seed=0)])
    labels = y[:384]
    for i in range(0, 384, 32):
        agent.process_batch(stream[i : i + 32], labels[i : i + 32])
    stats = agent.stats
    assert stats.samples_seen == 384 and 0.5 < stats.accuracy < 1.0
    assert any(p >= 192 for p in stats.drift_positions)
    assert edge_server.server.state.storage.list_drift("dev-e2e")
    queued = agent.outbox.pending_count
    assert queued == stats.selected > 0
    params = agent.model.params
    params["bn1.bias"] = params["bn1.bias"] + 0.1
    version = edge_server.publish_update(params)
    result = agent.sync()
    assert result.errors == () and result.applied_versions == (version,)
    assert result.upload is not None and result.upload.stored == queued
    assert edge_server.samples_stored("dev-e2e") == queued and agent.outbox.pending_count == 0
    # an int8 delta: each value within half its tensor's scale (max |delta| / 127) of the published one
    np.testing.assert_allclose(agent.model.params["bn1.bias"], params["bn1.bias"], rtol=0, atol=0.1 / 254 + 1e-7)
    stats = agent.stats
    assert stats.uploaded_samples == queued and stats.uploaded_bytes > 0
    assert stats.downloaded_bytes > 0 and stats.update_versions == (version,)
    client.close()


def test_background_watcher_applies_updates_and_stops(edge_server, tmp_path: Path) -> None:
    agent, client = _connected_agent(edge_server, tmp_path, watch_wait_seconds=0.5)
    agent.start_watcher()
    params = agent.model.params
    params["bn1.weight"] = params["bn1.weight"] * 1.5
    version = edge_server.publish_update(params)
    deadline = time.monotonic() + 5.0
    while agent.version != version and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.version == version
    scale = float(np.abs(params["bn1.weight"] / 3).max()) / 127  # the delta is weight * 0.5
    np.testing.assert_allclose(agent.model.params["bn1.weight"], params["bn1.weight"], rtol=0, atol=scale / 2 + 1e-6)
    started = time.monotonic()
    agent.close()
    assert time.monotonic() - started < 2.0
    assert not any(t.name.startswith("edgeloop-watch") for t in threading.enumerate())
    client.close()


def test_sync_survives_server_loss(edge_server, tmp_path: Path, tiny_batch) -> None:
    agent, client = _connected_agent(edge_server, tmp_path)
    agent.process_batch(tiny_batch[:16])
    edge_server.server.stop(grace=0.1)
    result = agent.sync()
    assert result.errors and result.applied_versions == ()
    assert agent.outbox.pending_count == agent.stats.selected
    assert agent.stats.sync_failures == 1
    client.close()


def test_device_side_does_not_import_torch() -> None:
    code = ("import device_agents.agent, device_agents.client, device_agents.tta, device_agents.outbox, runtime; "
            "import sys; assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_feature_detector_watches_features_and_reports_its_signal(tiny_model, tmp_path: Path) -> None:
    """A feature detector (Mahalanobis against Gaussians around the calm features) is fed the batch's feature
    rows; its drift events carry the ``features`` signal and the detector's registry name."""
    from device_agents.drift import MahalanobisDrift

    rng = np.random.default_rng(0)
    calm = (rng.random((256, 1, 8, 8)) * 0.05 + 0.5).astype(np.float32)
    feats = tiny_model.forward(calm).features
    means = np.repeat(feats.mean(0, keepdims=True), 3, axis=0)
    detector = MahalanobisDrift(means, np.cov(feats.T) + 1e-3 * np.eye(feats.shape[1]), window_size=8,
                                ert=100_000, reference=feats, n_runs=50, run_length=400)
    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=None))
    agent = Agent(tiny_model, SourceModel(), detector, selector, SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20),
                  None, AgentConfig(device_id="dev-1", bundle_id=BUNDLE))
    assert (agent.signal, agent.detector_label) == ("features", "mahalanobis")
    positions = []
    for i in range(0, 128, 8):
        positions += agent.process_batch(calm[i : i + 8]).drift_positions
    shifted = (rng.random((128, 1, 8, 8)) * 1.0).astype(np.float32)
    for i in range(0, 128, 8):
        positions += agent.process_batch(shifted[i : i + 8]).drift_positions
    assert positions and min(positions) >= 128


def test_agent_derives_the_signal_and_name_from_its_detector(tiny_model, tmp_path: Path) -> None:
    from device_agents.drift import ADWIN, MMDDrift

    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=None))
    outbox = SqliteOutbox(tmp_path / "o.db", max_bytes=1 << 20)
    config = AgentConfig(device_id="dev-1", bundle_id=BUNDLE)
    adwin = Agent(tiny_model, SourceModel(), ADWIN(), selector, outbox, None, config)
    assert (adwin.signal, adwin.detector_label) == ("entropy", "adwin")
    mmd = Agent(tiny_model, SourceModel(), MMDDrift(None, dim=4, window_size=8, reference_size=32), selector,
                outbox, None, AgentConfig(device_id="dev-1", bundle_id=BUNDLE, detector_name="my-mmd"))
    assert (mmd.signal, mmd.detector_label) == ("features", "my-mmd")
    assert mmd.process_batch(np.full((8, 1, 8, 8), 0.5, np.float32)).pred.shape == (8,)


@pytest.mark.parametrize("name", ["page_hinkley", "adwin", "kswin", "mahalanobis", "mmd"])
def test_make_detector_builds_every_registered_detector_for_a_bundle(bundle_dir: Path, name: str) -> None:
    from device_agents.drift import DETECTORS, detector_name
    from edgeloop.pipeline import make_detector

    detector = make_detector(name, AdaptableModel(load_bundle(bundle_dir)))
    assert name in DETECTORS and detector_name(detector) == name


def test_make_detector_names_an_unknown_detector(bundle_dir: Path) -> None:
    from edgeloop.pipeline import make_detector

    with pytest.raises(ValueError, match=r"unknown drift detector 'cusum'.*adwin"):
        make_detector("cusum", AdaptableModel(load_bundle(bundle_dir)))
