"""Signed, versioned, per-cohort parameter updates between a real server and agents: tampering, replay,
delta chains with the full-update fallback, health rollback reported to the server, cohorts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from device_agents.agent import Agent, AgentConfig
from device_agents.client import DeviceClient
from device_agents.drift import PageHinkley
from device_agents.errors import StaleUpdateError, UpdateIntegrityError
from device_agents.health import HealthPolicy
from device_agents.messages import ParameterUpdate
from device_agents.tta import SourceModel
from runtime import AdaptableModel, load_bundle


def _agent(edge_server, tmp_path: Path, device_id: str, labels: dict[str, str] | None = None,
           **cfg) -> tuple[Agent, DeviceClient]:
    client = DeviceClient(edge_server.target, device_id, timeout=5.0)
    info = client.register(labels or {})
    model = AdaptableModel(load_bundle(client.fetch_bundle(info.bundle_id, tmp_path / device_id), threads=1))
    config = AgentConfig(device_id=device_id, bundle_id=info.bundle_id, cohort=info.cohort,
                         update_keys=(info.update_public_key,), **cfg)
    return Agent(model, SourceModel(), PageHinkley(threshold=50.0), None, None, client, config), client


def _received(client: DeviceClient, agent: Agent) -> list[ParameterUpdate]:
    return list(client.watch_updates(agent.config.bundle_id, agent.version, 0.3, held_version=agent.active_version))


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def test_tampered_unsigned_and_replayed_updates_are_rejected(edge_server, tmp_path: Path) -> None:
    agent, client = _agent(edge_server, tmp_path, "dev-t")
    params = agent.model.params
    params["bn1.bias"] = params["bn1.bias"] + 0.05
    edge_server.publish_update(params)
    (update,) = _received(client, agent)
    assert update.encoding == "int8_delta" and len(update.signature) == 64
    before = agent.model.params
    for bad, match in ((replace(update, payload=_flip(update.payload, len(update.payload) - 3)), "verify"),
                       (replace(update, signature=_flip(update.signature, 10)), "verify"),
                       (replace(update, version=update.version + 1), "verify"),
                       (replace(update, signature=b""), "unsigned")):
        with pytest.raises(UpdateIntegrityError, match=match):
            agent.apply_update(bad)
    assert agent.version == 0 and all(np.array_equal(agent.model.params[k], v) for k, v in before.items())
    assert agent.apply_update(update) is True and agent.version == update.version
    with pytest.raises(StaleUpdateError, match="replayed"):
        agent.apply_update(update)  # the same signed message again
    params["bn1.bias"] = params["bn1.bias"] + 0.05
    edge_server.publish_update(params)
    (newer,) = _received(client, agent)
    assert agent.apply_update(newer) and agent.version == newer.version
    with pytest.raises(StaleUpdateError):
        agent.apply_update(update)  # an older signed update after a newer one
    client.close()


def test_bad_update_is_rolled_back_reported_and_the_next_comes_in_full(edge_server, tmp_path: Path,
                                                                       digits_test) -> None:
    agent, client = _agent(edge_server, tmp_path, "dev-r", health=HealthPolicy(0.05, 0.05))
    x, y = digits_test
    for i in range(0, 128, 32):
        agent.process_batch(x[i : i + 32], y[i : i + 32])
    good = agent.model.params
    bad = {k: (-3.0 * v if k.endswith(".weight") else v) for k, v in good.items()}  # flips the affine scales
    v1 = edge_server.publish_update(bad)
    result = agent.sync()
    assert result.errors == () and result.applied_versions == ()
    assert agent.version == v1 and agent.active_version == 0
    assert all(np.array_equal(agent.model.params[k], good[k]) for k in good)
    (info,) = agent.rollbacks
    assert info.version == v1 and info.restored_version == 0 and "agreement" in info.reason
    assert info.agreement_after < info.agreement_before - 0.05
    (stored,) = edge_server.server.state.storage.list_rollbacks("dev-r")
    assert (stored.version, stored.restored_version, stored.cohort) == (v1, 0, "default")
    assert stored.agreement_before == pytest.approx(info.agreement_before)
    assert edge_server.server.state.storage.get_device("dev-r").rollbacks == 1  # type: ignore[union-attr]

    # the device holds v0's parameters, so v2 (a delta on v1 on the server) must come in full
    fixed = dict(good)
    fixed["bn1.bias"] = fixed["bn1.bias"] + 0.01
    v2 = edge_server.publish_update(fixed)
    (update,) = _received(client, agent)
    assert (update.version, update.encoding) == (v2, "f32")
    assert agent.apply_update(update) and agent.active_version == v2
    np.testing.assert_allclose(agent.model.params["bn1.bias"], fixed["bn1.bias"], atol=0.01 / 254 + 1e-6)
    client.close()


def test_rollback_before_any_batch_reports_unmeasured_entropy(edge_server, tmp_path: Path) -> None:
    """No batch seen yet: the entropy signal was not measured, the report says -1 and the server keeps it
    (a NaN would be refused, and the report retried forever)."""
    agent, client = _agent(edge_server, tmp_path, "dev-n", health=HealthPolicy(0.05, 0.05))
    good = agent.model.params
    v1 = edge_server.publish_update({k: (-3.0 * v if k.endswith(".weight") else v) for k, v in good.items()})
    result = agent.sync()
    assert result.errors == () and agent.active_version == 0
    (info,) = agent.rollbacks
    assert info.version == v1 and info.entropy_before == info.entropy_after == -1.0
    (stored,) = edge_server.server.state.storage.list_rollbacks("dev-n")
    assert stored.entropy_before == -1.0 and stored.agreement_before == pytest.approx(info.agreement_before)
    assert agent._pending_rollbacks == []  # accepted: nothing kept for a retry
    client.close()


def test_cohorts_have_independent_version_sequences(edge_server, tmp_path: Path) -> None:
    lab, lab_client = _agent(edge_server, tmp_path, "dev-lab", {"cohort": "lab"})
    field, field_client = _agent(edge_server, tmp_path, "dev-field")
    assert (lab.config.cohort, field.config.cohort) == ("lab", "default")
    params = lab.model.params
    for step in range(3):
        params["bn1.bias"] = params["bn1.bias"] + 0.01
        assert edge_server.publish_update(params, cohort="lab") == step + 1
    assert edge_server.publish_update(params) == 1
    assert [u.version for u in _received(lab_client, lab)] == [1, 2, 3]
    assert [(u.version, u.cohort) for u in _received(field_client, field)] == [(1, "default")]
    assert lab.sync().applied_versions == (1, 2, 3) and field.sync().applied_versions == (1,)
    (lab_update,) = lab_client.watch_updates(lab.config.bundle_id, 2, 0.3, held_version=2)
    with pytest.raises(UpdateIntegrityError, match="cohort"):
        field.apply_update(lab_update)  # validly signed and newer, but for another cohort
    lab_client.close()
    field_client.close()
