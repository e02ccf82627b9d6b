"""Crash durability of parameter updates on a device: ``kill -9`` of a real agent process in the middle of
:meth:`Agent.apply_update` of its second update (the model already swapped to v2, the agent's bookkeeping and
its durable state not yet written). A restart on the same work directory holds exactly v1 — the update it had
applied and saved (:mod:`device_agents.state`), never a mix and never the bundle's v0 — and its next sync brings
it to the newest version with the parameters that version's digest names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from device_agents.agent import Agent, AgentConfig
from device_agents.client import DeviceClient
from device_agents.drift import PageHinkley
from device_agents.state import AgentStateStore
from device_agents.tta import SourceModel
from runtime import AdaptableModel, load_bundle
from runtime.params import params_digest
from server.updates import current_params, publish_update

ROOT = Path(__file__).resolve().parents[2]
# The child: an agent that syncs; the model's second set_params swaps the parameters, then stops for the test's
# SIGKILL.
_CHILD = """
import sys, time
from pathlib import Path
from tests.device_agents.test_crash_durability import build_agent
agent = build_agent(sys.argv[1], Path(sys.argv[2]))
swap = agent.model.set_params
swaps = []
def swap_then_hold(params):
    swap(params)
    swaps.append(1)
    if len(swaps) == 2:
        print("SWAPPED", flush=True)
        time.sleep(60)
agent.model.set_params = swap_then_hold
agent.sync(wait_seconds=5.0)
print("SYNC RETURNED", flush=True)
"""


def build_agent(target: str, work: Path) -> Agent:
    """What a device does at start-up: register, fetch (or reuse) the verified bundle, build the agent."""
    client = DeviceClient(target, "dev-upd", timeout=5.0, reconnect_backoff_ms=(50, 500))
    info = client.register()
    model = AdaptableModel(load_bundle(client.fetch_bundle(info.bundle_id, work / "bundles"), threads=1))
    return Agent(model, SourceModel(), PageHinkley(threshold=1e6), None, None, client,
                 AgentConfig(device_id="dev-upd", bundle_id=info.bundle_id, report_drift=False, health=None),
                 state=AgentStateStore(work / "agent_state.sqlite3"), server_version=info.latest_update_version)


def test_kill9_while_applying_an_update_restarts_on_one_consistent_version(edge_server, tmp_path: Path) -> None:
    state, bundle_id = edge_server.server.state, edge_server.bundle_id
    base, _ = current_params(state, bundle_id)
    for step in (1, 2):  # two versions: the device on v0 receives a chain of deltas
        publish_update(state, bundle_id, "distill",
                       {k: (v + 0.05 * step if k.endswith(".bias") else v).astype(np.float32)
                        for k, v in base.items()})
    latest = state.storage.latest_update(bundle_id)
    assert latest is not None and latest.version == 2
    first = state.storage.updates_since(bundle_id, 0, "default")[0]
    assert first.version == 1

    work = tmp_path / "device"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, edge_server.target, str(work)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = child.stdout.readline() if child.stdout is not None else ""
        while line and "SWAPPED" not in line and "SYNC RETURNED" not in line:
            line = child.stdout.readline()  # type: ignore[union-attr]
        assert "SWAPPED" in line, "the agent never applied its second update"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)

    agent = build_agent(edge_server.target, work)  # restart on the same work directory
    try:
        assert agent.version == agent.active_version == 1
        assert params_digest(agent.model.params) == first.held_sha256  # v1 exactly, nothing half-applied
        result = agent.sync(wait_seconds=2.0)
        assert result.errors == () and result.applied_versions[-1] == 2
        assert agent.version == agent.active_version == 2
        assert params_digest(agent.model.params) == latest.held_sha256  # v2 exactly, as its digest says
    finally:
        agent.close()
        assert agent.client is not None
        agent.client.close()
