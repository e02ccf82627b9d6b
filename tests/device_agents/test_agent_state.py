"""The agent's durable state (:mod:`device_agents.state`): what a restart must not lose — the applied update's
parameters and versions, what a rollback restores, an update on probation, undelivered reports — with a real
SQLite file, and against a real server where the server is part of the story."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from device_agents.agent import Agent, AgentConfig
from device_agents.client import DeviceClient
from device_agents.drift import PageHinkley, ScalarDetector
from device_agents.errors import UpdateRefusedError
from device_agents.health import HealthPolicy
from device_agents.messages import ParameterUpdate, RollbackInfo
from device_agents.state import AgentStateStore, Restored, SavedParameters, StateError, UpdateRef
from device_agents.tta import AlphaBN
from runtime.params import params_digest
from tests.device_agents.conftest import TinyAdaptableModel, start_edge_server

BUNDLE = "a" * 64


def _update(version: int, params: dict[str, np.ndarray]) -> ParameterUpdate:
    return ParameterUpdate(version, BUNDLE, "distill", params, params_digest(params))


def _agent(path: Path, model: object | None = None, *, client: DeviceClient | None = None,
           server_version: int | None = None, **cfg: object) -> Agent:
    """An agent over the tiny model with its state in ``path`` (a fresh model each time: a restarted device
    loads its bundle's parameters again)."""
    cfg = {"device_id": "dev-1", "bundle_id": BUNDLE, **cfg}
    return Agent(model or TinyAdaptableModel(), AlphaBN(), PageHinkley(threshold=2.0, mode="both", min_instances=20),
                 None, None, client, AgentConfig(**cfg), state=AgentStateStore(path),  # type: ignore[arg-type]
                 server_version=server_version)


def _shifted(params: dict[str, np.ndarray], delta: float) -> dict[str, np.ndarray]:
    return {k: v + delta for k, v in params.items() if k.endswith(".bias")}


# -- the store ---------------------------------------------------------------------------------------------------
def test_the_store_round_trips_parameters_and_reports(tmp_path: Path) -> None:
    arrays = {"bn1.mean": np.arange(4, dtype=np.float32), "bn1.var": np.ones(4, np.float32)}
    extra = {"fc.weight": np.eye(3, dtype=np.float32)}
    saved = SavedParameters(BUNDLE, "north", 7, 5, arrays, extra, ({"bn1.mean": np.zeros(4, np.float32)}, 3, {}),
                            UpdateRef(BUNDLE, "north", 5))
    rollback = RollbackInfo(BUNDLE, "north", 6, 5, "entropy rose", 0.1, 0.4, -1.0, -1.0)
    with AgentStateStore(tmp_path / "s.db") as store:
        store.save_parameters(saved)
        store.save_reports([(12, 3.5, 1000), (40, 7.25, 2000)], [rollback])
    with AgentStateStore(tmp_path / "s.db") as store:
        loaded = store.load()
    p = loaded.parameters
    assert p is not None
    assert (p.bundle_id, p.cohort, p.version, p.active_version, p.probation) == (BUNDLE, "north", 7, 5,
                                                                                 UpdateRef(BUNDLE, "north", 5))
    for got, want in ((p.model, arrays), (p.extra, extra), (p.previous[0], saved.previous[0])):  # type: ignore[index]
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
            assert got[name].dtype == want[name].dtype
    assert p.previous is not None and p.previous[1:] == (3, {})
    assert loaded.drift_reports == [(12, 3.5, 1000), (40, 7.25, 2000)]
    assert loaded.rollback_reports == [rollback]


def test_a_file_that_is_not_a_state_database_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match=r"state\.db is not a usable agent state database"):
        AgentStateStore(bad)
    with pytest.raises(StateError, match="cannot be opened"):
        AgentStateStore(tmp_path / "missing-dir" / "state.db")


def test_saved_rows_that_no_longer_decode_are_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    with AgentStateStore(path) as store:
        store.save_parameters(SavedParameters(BUNDLE, None, 2, 2, {"bn1.mean": np.zeros(4, np.float32)}, {}))
        store.save_reports([(1, 2.0, 3)], [])
    with sqlite3.connect(path) as conn:  # damage one array and add a report that is not JSON
        conn.execute("UPDATE params SET npy = ?", (b"\x93NUMPY garbage",))
        conn.execute("INSERT INTO reports (kind, body) VALUES ('drift', '{not json')")
    with caplog.at_level(logging.WARNING), AgentStateStore(path) as store:
        loaded = store.load()
    assert loaded.parameters is None and loaded.drift_reports == [(1, 2.0, 3)]
    assert "saved parameters do not decode" in caplog.text and "does not decode" in caplog.text


# -- a restarted agent -------------------------------------------------------------------------------------------
def test_a_restarted_agent_runs_the_update_it_had_and_can_still_roll_it_back(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    original = TinyAdaptableModel().params
    agent = _agent(path)
    agent.apply_update(_update(3, _shifted(original, 1.0)))
    agent.state.close()  # type: ignore[union-attr]

    assert agent.restored == Restored()  # a fresh state file: nothing taken over
    restarted = _agent(path)
    assert (restarted.version, restarted.active_version) == (3, 3)
    assert restarted.restored == Restored(version=3, active_version=3, detector=False)
    np.testing.assert_array_equal(restarted.model.params["bn1.bias"], original["bn1.bias"] + 1.0)
    assert restarted.rollback() is True  # the parameters before v3 were kept too
    restarted.state.close()  # type: ignore[union-attr]

    again = _agent(path)
    assert (again.version, again.active_version) == (3, 0)  # v3 stays seen: it is not fetched and applied again
    np.testing.assert_array_equal(again.model.params["bn1.bias"], original["bn1.bias"])
    assert again.rollback() is False


def test_an_update_on_probation_keeps_its_entropy_check_across_a_restart(tmp_path: Path, tiny_batch) -> None:
    path = tmp_path / "state.db"
    policy = HealthPolicy(max_entropy_increase=0.05, max_agreement_drop=1.0)
    original = TinyAdaptableModel().params
    harmful = {k: 0.01 * v for k, v in original.items() if k.endswith((".weight", ".bias"))}  # flat outputs
    agent = _agent(path, health=policy)
    assert agent.apply_update(_update(1, harmful)) is True  # no batch yet: the check waits for one
    agent.state.close()  # type: ignore[union-attr]

    restarted = _agent(path, health=policy)
    assert restarted.active_version == 1
    restarted.process_batch(tiny_batch)
    assert (restarted.version, restarted.active_version) == (1, 0)
    (info,) = restarted.rollbacks
    assert info.version == 1 and "entropy rose" in info.reason
    for name, value in original.items():
        np.testing.assert_array_equal(restarted.model.params[name], value, err_msg=name)


@pytest.mark.parametrize(("cfg", "server_version", "why"), [
    ({"bundle_id": "b" * 64}, None, "for bundle aaaaaaaaaaaa"),
    ({"cohort": "south"}, None, "for cohort 'north'"),
    ({}, 2, "update history was reset"),
])
def test_saved_parameters_that_do_not_fit_are_not_restored(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          cfg: dict, server_version: int | None, why: str) -> None:
    path = tmp_path / "state.db"
    original = TinyAdaptableModel().params
    agent = _agent(path, cohort="north")
    agent.apply_update(ParameterUpdate(3, BUNDLE, "distill", _shifted(original, 1.0),
                                       params_digest(_shifted(original, 1.0)), cohort="north"))
    agent.state.close()  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING):
        restarted = _agent(path, server_version=server_version, **{"cohort": "north", **cfg})
    assert why in caplog.text
    assert (restarted.version, restarted.active_version) == (0, 0)
    assert restarted.restored.version is None
    np.testing.assert_array_equal(restarted.model.params["bn1.bias"], original["bn1.bias"])
    assert restarted.state is not None and restarted.state.load().parameters is None  # forgotten


def test_saved_parameters_the_model_refuses_are_not_restored(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    with AgentStateStore(path) as store:
        store.save_parameters(SavedParameters(BUNDLE, None, 4, 4, {"bn1.bias": np.zeros(7, np.float32)}, {}))
    with caplog.at_level(logging.WARNING):
        agent = _agent(path)
    assert "the model refuses them" in caplog.text
    assert (agent.version, agent.active_version) == (0, 0)


def test_a_failed_save_is_counted_and_the_agent_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = _agent(tmp_path / "state.db")
    agent.state.close()  # type: ignore[union-attr]  # every later write fails
    original = agent.model.params
    with caplog.at_level(logging.ERROR):
        assert agent.apply_update(_update(2, _shifted(original, 0.5))) is True
    assert agent.version == 2 and agent.stats.state_write_failures == 1
    assert "could not save the parameters" in caplog.text and "state.db" in caplog.text


def test_a_refused_update_counts_as_seen_and_the_stream_goes_on(tmp_path: Path) -> None:
    """An authentic update the model refuses must not block the updates after it (nor be fetched again)."""
    agent = _agent(tmp_path / "state.db")
    original = agent.model.params
    refused = _update(4, {"bn1.bias": np.full(4, np.nan, np.float32)})
    errors: list[str] = []
    applied = agent._apply_from_stream([refused, _update(5, _shifted(original, 2.0))], errors)  # type: ignore[arg-type]
    assert applied == [5] and (agent.version, agent.active_version) == (5, 5)
    assert len(errors) == 1 and "v4 refused by the model" in errors[0] and "NaN" in errors[0]
    with pytest.raises(UpdateRefusedError):
        agent.apply_update(_update(6, {"bn1.bias": np.full(4, np.inf, np.float32)}))
    assert (agent.version, agent.active_version) == (6, 5)
    agent.state.close()  # type: ignore[union-attr]
    assert (_agent(tmp_path / "state.db").version) == 6


# -- against a real server ---------------------------------------------------------------------------------------
def _drifting_stream() -> np.ndarray:
    rng = np.random.default_rng(0)
    calm = (rng.random((256, 1, 8, 8)) * 0.05 + 0.5).astype(np.float32)
    return np.concatenate([calm, rng.random((256, 1, 8, 8)).astype(np.float32)])


def test_undelivered_drift_and_rollback_reports_survive_a_restart(edge_server, tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with DeviceClient(edge_server.target, "dev-1", timeout=5.0) as live:
        live.register({})
    offline = DeviceClient("127.0.0.1:1", "dev-1", timeout=0.5)  # nothing listens there
    agent = _agent(path, client=offline, bundle_id=edge_server.bundle_id)
    stream = _drifting_stream()
    for i in range(0, len(stream), 8):
        agent.process_batch(stream[i : i + 8])
    drifts = agent.stats.drift_positions
    assert drifts and agent.stats.drift_reports_pending == len(drifts)
    agent._report_rollback(RollbackInfo(edge_server.bundle_id, "default", 2, 1, "entropy rose", 0.1, 0.5, -1, -1))
    agent._report_rollback(RollbackInfo(edge_server.bundle_id, "default", 1, 1, "refused for good", 0, 0, 0, 0))
    assert agent.stats.rollback_reports_pending == 2
    agent.state.close()  # type: ignore[union-attr]
    offline.close()

    with DeviceClient(edge_server.target, "dev-1", timeout=5.0) as live:
        restarted = _agent(path, client=live, bundle_id=edge_server.bundle_id)
        assert restarted.stats.drift_reports_pending == len(drifts)
        assert (restarted.restored.drift_reports, restarted.restored.rollback_reports) == (len(drifts), 2)
        result = restarted.sync(wait_seconds=0.2)
        stats = restarted.stats
        assert stats.drift_reports_pending == stats.rollback_reports_pending == 0
        assert stats.reports_refused == 1  # v1 "restored" to v1: the server refuses it for good, so it is dropped
        assert all("ReportRollback" not in e for e in result.errors)
    storage = edge_server.server.state.storage
    assert sorted(d.stream_position for d in storage.list_drift("dev-1")) == sorted(drifts)
    assert [(r.version, r.restored_version) for r in storage.list_rollbacks("dev-1")] == [(2, 1)]
    assert restarted.state is not None and restarted.state.load().drift_reports == []


def test_a_device_restarted_against_a_reset_server_follows_the_new_history(
        tmp_path: Path, bundle_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Saved v2 of one server history; the server is reset and publishes three other versions: the restored v2 is
    not the server's v2 (the delta for v3 does not fit), so the device starts over and ends on the new v3."""
    from runtime import AdaptableModel, load_bundle

    def connect(target: str) -> tuple[DeviceClient, Agent]:
        client = DeviceClient(target, "dev-1", timeout=5.0)
        info = client.register({})
        model = AdaptableModel(load_bundle(client.fetch_bundle(info.bundle_id, tmp_path / "bundles"), threads=1))
        return client, Agent(model, AlphaBN(), PageHinkley(), None, None, client,
                             AgentConfig(device_id="dev-1", bundle_id=info.bundle_id, cohort=info.cohort,
                                         health=None),
                             state=AgentStateStore(tmp_path / "state.db"), server_version=info.latest_update_version)

    with start_edge_server(tmp_path / "first", bundle_dir) as first:
        client, agent = connect(first.target)
        base = agent.model.params
        for delta in (0.1, 0.2):
            first.publish_update({**base, "bn1.bias": base["bn1.bias"] + delta})
        assert agent.sync(wait_seconds=0.3).applied_versions == (1, 2)
        agent.state.close()  # type: ignore[union-attr]
        client.close()
    with start_edge_server(tmp_path / "second", bundle_dir) as second:
        for delta in (-0.3, -0.4, -0.5):
            second.publish_update({**base, "bn1.bias": base["bn1.bias"] + delta})
        client, agent = connect(second.target)
        assert agent.active_version == 2  # restored: the server's newest (v3) does not reveal the reset
        with caplog.at_level(logging.WARNING):
            result = agent.sync(wait_seconds=0.3)
        assert "starting over from the parameters of v0" in caplog.text
        assert result.applied_versions == (1, 2, 3) and result.errors == ()
        assert (agent.version, agent.active_version) == (3, 3)
        want = second.server.state.storage.latest_update(agent.config.bundle_id)
        assert want is not None and params_digest(agent.model.params) in {want.sha256, want.held_sha256}
        agent.state.close()  # type: ignore[union-attr]
        client.close()


def test_connect_agent_restores_the_previous_run_from_its_work_dir(edge_server, tmp_path: Path) -> None:
    """What ``edgeloop agent --work-dir`` does across runs: the second run starts on the update the first applied."""
    from edgeloop.pipeline import close_agent, connect_agent

    work = tmp_path / "cam"
    agent = connect_agent(edge_server.target, "cam-1", work)
    try:
        params = agent.model.params
        version = edge_server.publish_update({**params, "bn1.bias": params["bn1.bias"] + 0.25})
        assert agent.sync(wait_seconds=0.3).applied_versions == (version,)
        held = agent.model.params
    finally:
        close_agent(agent)
    assert (work / "agent_state.sqlite3").is_file()
    again = connect_agent(edge_server.target, "cam-1", work)
    try:
        assert (again.version, again.active_version) == (version, version)
        assert params_digest(again.model.params) == params_digest(held)
        assert again.sync(wait_seconds=0.2).applied_versions == ()  # nothing fetched twice
        assert again.restored.version == version and again.restored.tta and again.restored.detector
    finally:
        close_agent(again)
    from edgeloop.pipeline import run_agent

    report = run_agent(server=edge_server.target, device_id="cam-1", work_dir=work, samples_per_domain=32)
    assert report["restored"]["version"] == report["version"] == version  # the CLI's JSON says what it took over


def _steady_run(tmp_path: Path, seed: int, batches: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``batches`` random batches and what an agent that never stops predicts on the last one."""
    rng = np.random.default_rng(seed)
    xs = [(rng.random((16, 1, 8, 8)) * 0.6 + 0.4).astype(np.float32) for _ in range(batches)]
    steady = _agent(tmp_path / "steady.db")
    for x in xs[:-1]:
        steady.process_batch(x)
    return xs, steady.process_batch(xs[-1]).probs


def test_the_tta_state_survives_a_restart(tmp_path: Path) -> None:
    """A device restarted mid-stream predicts the next batch exactly as one that never stopped: α-BN's running
    statistics are saved at close and restored for the same method, bundle and parameters."""
    batches, want = _steady_run(tmp_path, seed=3, batches=5)

    path = tmp_path / "restarted.db"
    first = _agent(path)
    for x in batches[:4]:
        first.process_batch(x)
    first.close()
    first.state.close()  # type: ignore[union-attr]
    restarted = _agent(path)
    assert restarted.restored.tta
    np.testing.assert_array_equal(restarted.process_batch(batches[4]).probs, want)
    fresh = _agent(tmp_path / "fresh.db").process_batch(batches[4]).probs
    assert not np.array_equal(fresh, want)  # the state made a difference


def test_a_drift_under_way_at_a_restart_is_detected_where_it_would_have_been(tmp_path: Path) -> None:
    """The detector's state survives a restart: a device that restarts just as the stream shifts signals the
    drift at the same position as one that never stopped. Without it, the restarted detector takes the shifted
    stream as its reference and never signals it. The selector's byte budget comes back too."""
    from device_agents.selection import EntropyBandSelector, SelectorConfig

    stream = _drifting_stream()

    def run(agent: Agent, lo: int, hi: int) -> list[int]:
        for i in range(lo, hi, 8):
            agent.process_batch(stream[i : i + 8], position=i)
        return list(agent.stats.drift_positions)

    def device(path: Path) -> Agent:
        return Agent(TinyAdaptableModel(), AlphaBN(), PageHinkley(threshold=2.0, mode="both", min_instances=20),
                     EntropyBandSelector(SelectorConfig(bytes_per_window=64)), None, None,
                     AgentConfig(device_id="dev-1", bundle_id=BUNDLE), state=AgentStateStore(path))

    steady = run(_agent(tmp_path / "steady.db"), 0, len(stream))
    assert steady and steady[0] >= 256  # the shift at 256 is signalled after the restart below

    first = device(tmp_path / "restarted.db")
    assert run(first, 0, 256) == []
    budget = first.selector.tokens  # type: ignore[union-attr]
    first.close()  # saves the components' state
    first.state.close()  # type: ignore[union-attr]
    restarted = device(tmp_path / "restarted.db")
    assert restarted.restored.detector and restarted.restored.selector and restarted.restored.tta
    assert restarted.selector.tokens == pytest.approx(budget, abs=1.0)  # type: ignore[union-attr]
    assert run(restarted, 256, len(stream)) == steady

    amnesic = _agent(tmp_path / "amnesic.db")  # a detector that starts afresh after the restart
    assert run(amnesic, 256, len(stream)) != steady


def test_a_power_loss_after_a_drift_does_not_bring_the_drift_back(tmp_path: Path) -> None:
    """The components are saved after a batch in which drift fired (even with no periodic save): a device that
    loses power after signalling a drift does not restore the detector from before it and signal it twice."""
    stream = _drifting_stream()

    def run(agent: Agent, lo: int, hi: int) -> list[int]:
        for i in range(lo, hi, 8):
            agent.process_batch(stream[i : i + 8], position=i)
        return list(agent.stats.drift_positions)

    steady = run(_agent(tmp_path / "steady.db"), 0, len(stream))
    cut = (steady[0] // 8 + 1) * 8  # just after the batch that signalled the first drift
    crashed = _agent(tmp_path / "crashed.db", save_state_seconds=None)
    assert run(crashed, 0, cut) == steady[:1]
    crashed.state.close()  # type: ignore[union-attr]  # power loss: no sync, no close
    booted = _agent(tmp_path / "crashed.db", save_state_seconds=None)
    assert booted.restored.detector
    assert steady[:1] + run(booted, cut, len(stream)) == steady


def test_components_are_saved_between_syncs_so_a_power_loss_keeps_them(tmp_path: Path) -> None:
    """``save_state_seconds``: the components' state is saved after a batch once that long has passed, so a power
    loss (no close, no sync) keeps what they learnt up to the last save."""
    batches, want = _steady_run(tmp_path, seed=4, batches=4)

    for every, kept in ((0.0, True), (None, False), (3600.0, False)):
        path = tmp_path / f"every-{every}.db"
        crashed = _agent(path, save_state_seconds=every)
        for x in batches[:3]:
            crashed.process_batch(x)
        crashed.state.close()  # type: ignore[union-attr]  # power loss: no close(), no sync()
        booted = _agent(path, save_state_seconds=every)
        assert (booted.restored.tta, booted.restored.detector) == (kept, kept), every
        assert np.array_equal(booted.process_batch(batches[3]).probs, want) == kept, every
    for bad in (-1.0, float("nan"), True, "60"):
        with pytest.raises(ValueError, match="save_state_seconds must be a finite number >= 0 or None"):
            AgentConfig(device_id="d", bundle_id=BUNDLE, save_state_seconds=bad)  # type: ignore[arg-type]


def test_a_tta_state_of_another_method_or_version_is_not_restored(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    agent = _agent(path)
    agent.process_batch(np.full((16, 1, 8, 8), 0.7, np.float32))
    agent.close()  # saves α-BN's state at v0
    original = agent.model.params
    agent.apply_update(_update(1, _shifted(original, 0.1)))  # now v1: the saved TTA state is v0's
    agent.state.close()  # type: ignore[union-attr]
    with caplog.at_level(logging.INFO):
        restarted = _agent(path)
    assert restarted.active_version == 1
    assert ("not restoring the saved tta state: it belongs to active_version=0, bundle_id='aaaaaaaaaaaa…', "
            "method='alpha_bn'; this agent's is active_version=1") in caplog.text
    assert restarted.tta.snapshot() == {}  # starts afresh on v1
    assert restarted.restored == Restored(version=1, active_version=1, tta=False, detector=True)
    restarted.close()  # saves v1's (empty) state
    restarted.state.close()  # type: ignore[union-attr]

    from device_agents.tta import LAME

    with caplog.at_level(logging.INFO):
        Agent(TinyAdaptableModel(), LAME(), PageHinkley(), None, None, None,
              AgentConfig(device_id="dev-1", bundle_id=BUNDLE), state=AgentStateStore(path))
    assert "not restoring the saved tta state: it belongs to active_version=1" in caplog.text
    assert "'alpha_bn'; this agent's is active_version=1, bundle_id='aaaaaaaaaaaa…', method='lame'" in caplog.text


class _Threshold(ScalarDetector):
    """A user's own detector that follows the detector contract but does not save its state."""

    def _reset_state(self) -> None:
        self._n = 0

    @property
    def n_seen(self) -> int:
        return self._n

    def _update_one(self, x: float) -> None:
        self._n += 1
        self._drift_detected = x > 0.99

    def _run_chunk(self, x: np.ndarray) -> int | None:
        hits = np.flatnonzero(x > 0.99)
        end = int(hits[0]) if hits.size else x.size - 1
        self._n += end + 1
        self._drift_detected = bool(hits.size)
        return end if hits.size else None


def test_a_detector_that_does_not_save_its_state_is_left_out(tmp_path: Path, tiny_batch) -> None:
    path = tmp_path / "state.db"
    agent = Agent(TinyAdaptableModel(), AlphaBN(), _Threshold(), None, None, None,
                  AgentConfig(device_id="dev-1", bundle_id=BUNDLE, save_state_seconds=0.0),
                  state=AgentStateStore(path))
    assert not agent.detector.saves_state and PageHinkley().saves_state
    agent.process_batch(tiny_batch)  # the periodic save after the batch
    agent.sync()
    agent.close()
    assert agent.stats.state_write_failures == 0
    agent.state.close()  # type: ignore[union-attr]
    saved = AgentStateStore(path).load().components
    assert set(saved) == {"tta"}  # the TTA method's state is kept; the detector's is not asked for


def test_samples_queued_after_the_last_save_are_charged_to_the_restored_budget(tmp_path: Path) -> None:
    """A power loss after samples were queued must not hand their bytes back: the restored selector is charged
    for what the outbox holds from after its save (a fresh selector would start full, the saved one as it was)."""
    from device_agents.outbox import SqliteOutbox
    from device_agents.selection import EntropyBandSelector, SelectorConfig

    def device() -> Agent:
        return Agent(TinyAdaptableModel(), AlphaBN(), PageHinkley(threshold=50.0),
                     EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=1 << 20,
                                                        window_seconds=1e9)),
                     SqliteOutbox(tmp_path / "outbox.db", max_bytes=1 << 24), None,
                     AgentConfig(device_id="dev-1", bundle_id=BUNDLE, save_state_seconds=None),
                     state=AgentStateStore(tmp_path / "state.db"))

    rng = np.random.default_rng(5)
    first = device()
    first.save_component_states()
    saved = first.selector.tokens  # type: ignore[union-attr]
    result = first.process_batch(rng.random((16, 1, 8, 8)).astype(np.float32))
    assert result.queued_ids and first.outbox is not None
    queued = first.outbox.pending_bytes
    for store in (first.state, first.outbox):  # power loss
        store.close()  # type: ignore[union-attr]
    booted = device()
    assert booted.restored.selector
    assert booted.selector.tokens == pytest.approx(saved - queued, abs=1.0)  # type: ignore[union-attr]
