"""A forward-only agent on a bundle exported with trainable weights: it fetches them with its model, holds
them beside the normalisation parameters it runs, and so applies and verifies int8 delta updates that carry
every name of the server's parameter space (adaptable ∪ trainable), including after a rollback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from device_agents.agent import Agent, AgentConfig
from device_agents.client import DeviceClient
from device_agents.drift import PageHinkley
from device_agents.tta import SourceModel
from edgeloop.admin import AdminClient
from edgeloop.federated.experiment import load_uint8, seeded_bundle
from runtime import AdaptableModel, load_bundle
from server.app import ServerConfig, create_server
from server.updates import current_params, publish_update


def test_agent_follows_delta_updates_of_a_trainable_bundle(tmp_path: Path) -> None:
    x = load_uint8("digits")[0]
    bundle_dir, _ = seeded_bundle("small_cnn", x, 10, 0, tmp_path / "bundle")
    server = create_server(ServerConfig(data_dir=tmp_path / "server", port=0, max_workers=4, grace_seconds=1.0))
    target = f"127.0.0.1:{server.start()}"
    try:
        with AdminClient(target) as admin:
            bundle_id = admin.publish_bundle(bundle_dir)
        client = DeviceClient(target, "dev-1", timeout=10.0)
        info = client.register()
        root = client.fetch_bundle(bundle_id, tmp_path / "device")
        assert (root / "trainable.bin").is_file()  # fetched with the model: updates carry these names
        model = AdaptableModel(load_bundle(root, threads=1))
        agent = Agent(model, SourceModel(), PageHinkley(threshold=50.0), None, None, client,
                      AgentConfig(device_id="dev-1", bundle_id=bundle_id, cohort=info.cohort,
                                  update_keys=(info.update_public_key,), health=None))
        state = server.state
        params, _ = current_params(state, bundle_id)
        trainable = sorted(set(params) - set(model.params))
        assert trainable and set(model.params) < set(params)

        params["bn1.bias"] = params["bn1.bias"] + 0.05
        publish_update(state, bundle_id, "fedavg", params)
        params[trainable[0]] = params[trainable[0]] + 0.01  # the trainers moved a conv weight
        params["bn1.bias"] = params["bn1.bias"] + 0.05
        v2 = publish_update(state, bundle_id, "fedavg", params)
        assert state.update_encoding != "f32"  # deltas, on the parameters the device holds
        result = agent.sync(wait_seconds=1.0)
        assert result.errors == () and result.applied_versions == (1, 2) and agent.version == v2.version
        assert np.allclose(agent.model.params["bn1.bias"], params["bn1.bias"], atol=1e-3)

        assert agent.rollback() and agent.active_version == 1  # model and trainable weights of v1
        params["bn1.bias"] = params["bn1.bias"] - 0.02
        publish_update(state, bundle_id, "fedavg", params)
        result = agent.sync(wait_seconds=1.0)  # its base is not what the device holds: sent in full
        assert result.errors == () and result.applied_versions == (3,)
        assert np.allclose(agent.model.params["bn1.bias"], params["bn1.bias"], atol=1e-6)
        client.close()
    finally:
        server.stop(grace=1.0)
