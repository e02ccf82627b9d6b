"""Strategy state across restarts: FedAU's participation statistics and the DP ledger (ε, δ in GetRound) are
kept in the registry; a corrupt or foreign saved state stops start-up with a clear error; rounds a crash left
unfinished are settled; schema 2 registries gain submission cohorts."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from server import handlers, updates
from server.aggregation import Contribution, create_aggregator
from server.app import ServerConfig, create_server
from server.broker import UpdateBroker
from server.errors import StorageError
from server.privacy import RdpAccountant
from server.records import BundleRecord, SubmissionRecord
from server.rounds import RoundRunner
from server.state import Limits, ServerState
from server.storage import SCHEMA_VERSION, BlobStore, Registry
from tests.server.server_testkit import RPC_TIMEOUT, bundle_chunks, initial_params, make_bundle_files, wait_round


class Session:
    """One run of a server over ``data_dir`` with the given aggregator; submits and runs rounds over gRPC."""

    def __init__(self, data_dir: Path, aggregator: str, options: dict[str, Any]) -> None:
        self.server = create_server(ServerConfig(data_dir=data_dir, port=0, grace_seconds=1.0, update_encoding="f32",
                                                 aggregator=aggregator, aggregator_options=options))
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.device = device_pb2_grpc.DeviceServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.bundle_id = self.admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id

    def round(self, values: dict[str, float]) -> admin_pb2.RoundStatus:
        """Each device submits ``initial + value`` on the current version, then one fedavg round runs."""
        version = self.server.state.storage.latest_version("default")
        for device_id, value in values.items():
            self.device.Register(device_pb2.RegisterRequest(device_id=device_id), timeout=RPC_TIMEOUT)
            self.device.SubmitUpdate(device_pb2.FederatedUpdate(
                device_id=device_id, bundle_id=self.bundle_id, base_version=version, num_samples=1,
                tensors=tensors_to_proto(_params(value))), timeout=RPC_TIMEOUT)
        rid = self.admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT).round_id
        status = wait_round(self.admin, rid)
        assert status.state == "done", status.error
        return status

    def current(self) -> dict[str, np.ndarray]:
        """The default cohort's current parameters."""
        return updates.current_params(self.server.state, self.bundle_id)[0]

    def stop(self) -> None:
        """Close the channel and stop the server."""
        self.channel.close()
        self.server.stop(grace=1.0)


def _params(value: float) -> dict[str, np.ndarray]:
    return {k: v + np.float32(value) for k, v in initial_params().items() if k.startswith("bn1.")}


def _reference(name: str, options: dict[str, Any], rounds: list[dict[str, float]]) -> tuple[Any, dict, list]:
    """The same rounds through one aggregator that never restarts: (aggregator, final params, metrics)."""
    agg = create_aggregator(name, **options)
    base = {k: v.astype(np.float32) for k, v in initial_params().items()}
    metrics = []
    for values in rounds:
        out = agg.aggregate(base, [Contribution(d, _params(v), 1.0) for d, v in sorted(values.items())])
        base, metrics = out.params, [*metrics, out.metrics]
    return agg, base, metrics


FEDAU_ROUNDS = [{"a": 1.0, "b": 2.0, "c": 0.5}, {"a": 1.5}, {"a": 0.5}, {"a": 2.0, "b": -1.0}, {"c": 3.0, "a": 1.0}]


def test_fedau_participation_survives_a_restart(tmp_path: Path) -> None:
    options = {"cutoff": 10}
    first = Session(tmp_path / "d", "fedau", options)
    for values in FEDAU_ROUNDS[:3]:
        first.round(values)
    saved = first.server.runner.aggregator.state_dict()
    first.stop()

    second = Session(tmp_path / "d", "fedau", options)
    try:
        assert second.server.runner.aggregator.state_dict() == saved
        last = [second.round(values) for values in FEDAU_ROUNDS[3:]][-1]
        reference, params, metrics = _reference("fedau", options, FEDAU_ROUNDS)
        assert second.server.runner.aggregator.state_dict() == reference.state_dict()
        assert reference.stats["b"].omega == 3.0  # b's interval 1 → 4 spans the restart
        for k, v in params.items():
            np.testing.assert_allclose(second.current()[k], v, rtol=0, atol=1e-6)
        assert last.metrics["fedau_population"] == metrics[-1]["population"] == 3.0
    finally:
        second.stop()


def test_the_dp_ledger_survives_a_restart_and_epsilon_is_in_get_round(tmp_path: Path) -> None:
    options = {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5, "sampling_rate": 0.1, "seed": 3}
    rounds = [{"a": 0.2, "b": -0.1}, {"a": 0.1, "b": 0.3}, {"a": -0.2, "b": 0.1}]

    def epsilon(n: int) -> float:
        acc = RdpAccountant()
        acc.step(1.1, 0.1, n)
        return acc.epsilon(1e-5)

    first = Session(tmp_path / "d", "dp_fedavg", options)
    statuses = [first.round(values) for values in rounds[:2]]
    first.stop()
    assert [s.metrics["epsilon"] for s in statuses] == pytest.approx([epsilon(1), epsilon(2)])
    assert statuses[-1].metrics["delta"] == 1e-5 and statuses[-1].metrics["dp_fedavg_dp_rounds"] == 2.0

    second = Session(tmp_path / "d", "dp_fedavg", options)
    try:
        status = second.round(rounds[2])
        got = second.admin.GetRound(admin_pb2.GetRoundRequest(round_id=status.round_id), timeout=RPC_TIMEOUT)
        assert got.metrics["epsilon"] == pytest.approx(epsilon(3)) and got.metrics["epsilon"] > epsilon(1)
        assert got.metrics["delta"] == 1e-5
        _, params, _ = _reference("dp_fedavg", options, rounds)  # same noise: the generator's state was kept
        for k, v in params.items():
            np.testing.assert_allclose(second.current()[k], v, rtol=0, atol=1e-6)
    finally:
        second.stop()


def _registry_with_state(tmp_path: Path, strategy: str, version: int, state: str) -> Path:
    data = tmp_path / "data"
    reg = Registry(data / "registry.sqlite3")
    reg.close()
    with sqlite3.connect(data / "registry.sqlite3") as raw:
        raw.execute("INSERT INTO aggregator_state VALUES (?, ?, ?, 0)", (strategy, version, state))
    return data


@pytest.mark.parametrize(("state", "version", "needle"), [
    ("{not json", 1, "is corrupt: Expecting property name"),
    (json.dumps({"devices": {"a": [1, 2]}}), 1, "is corrupt: fedau state of device 'a' must be 5 numbers"),
    (json.dumps({"devices": {"a": [0, 1, -2.0, 1, 1]}}), 1, "is corrupt: fedau state of device 'a' is out of range"),
    (json.dumps({"devices": {}}), 7, "has format version 7; this server reads version 1"),
])
def test_a_corrupt_or_foreign_saved_state_stops_start_up(tmp_path: Path, state: str, version: int,
                                                         needle: str) -> None:
    data = _registry_with_state(tmp_path, "fedau", version, state)
    with pytest.raises(StorageError, match="saved state of aggregator 'fedau'") as err:
        create_server(ServerConfig(data_dir=data, port=0, aggregator="fedau"))
    assert needle in str(err.value)
    create_server(ServerConfig(data_dir=data, port=0)).stop()  # fedavg keeps no state: that row is not read


def test_a_corrupt_dp_ledger_stops_start_up(tmp_path: Path) -> None:
    data = _registry_with_state(tmp_path, "dp_fedavg", 1, json.dumps({"orders": [2, 3], "rdp": [0.0, 0.0],
                                                                      "rounds": 1, "rng": {}}))
    with pytest.raises(StorageError, match="kept at RDP orders"):
        create_server(ServerConfig(data_dir=data, port=0, aggregator="dp_fedavg"))


def test_unfinished_rounds_are_settled_at_start_up(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg.sqlite3")
    state = ServerState(reg, BlobStore(tmp_path / "blobs"), UpdateBroker(0), Limits(), update_encoding="f32")
    bundle_id = handlers.publish_bundle(state, make_bundle_files()).bundle_id
    handlers.register_device(state, "dev-1", {}, "onnx")
    ids = [updates.submit_update(state, "dev-1", bundle_id, 0, 1, _params(float(i))) for i in range(4)]
    published = reg.create_round("fedbuff", 0)  # crashed after publishing, before marking its inputs used
    reg.save_round(replace(published, state="running"))
    reg.claim_submissions(published.round_id, ids[:2])
    updates.publish_update(state, bundle_id, "fedavg", initial_params(), round_id=published.round_id)
    lost = reg.create_round("fedbuff", 0)  # crashed before publishing
    reg.claim_submissions(lost.round_id, ids[2:])

    runner = RoundRunner(state)
    runner.shutdown()
    done, failed = reg.get_round(published.round_id), reg.get_round(lost.round_id)
    assert done.state == "done" and done.update_version == 1 and done.metrics["recovered"] == 1.0
    assert failed.state == "failed" and "interrupted" in failed.error
    assert [s.id for s in reg.unused_submissions(bundle_id)] == ids[2:]  # the lost round's inputs stay
    assert reg.unfinished_rounds() == []
    reg.close()


def test_a_schema_2_registry_gains_submission_cohorts(tmp_path: Path) -> None:
    path = tmp_path / "reg.sqlite3"
    reg = Registry(path)
    reg.upsert_device("cam", {"cohort": "cams"}, "onnx", 0)
    reg.upsert_device("plain", {}, "onnx", 0)
    reg.put_bundle(BundleRecord("b" * 64, {}, {}, 0), True)
    reg.close()
    with sqlite3.connect(path) as raw:  # back to schema 2: submissions without a cohort column
        raw.execute("DROP INDEX submissions_by_cohort")
        raw.execute("ALTER TABLE submissions DROP COLUMN cohort")
        raw.execute("UPDATE schema_version SET version = 2")
        for device in ("cam", "plain"):
            raw.execute("INSERT INTO submissions (device_id, bundle_id, base_version, num_samples, blob, received_ms) "
                        "VALUES (?, ?, 0, 1, 'x', 0)", (device, "b" * 64))
    reg = Registry(path)
    try:
        assert reg.schema_version() == SCHEMA_VERSION == 3
        assert [(s.device_id, s.cohort) for s in reg.unused_submissions("b" * 64)] == [("cam", "cams"),
                                                                                        ("plain", "default")]
        new = reg.insert_submission(SubmissionRecord("cam", "b" * 64, 0, 1, "y", 0))
        assert reg.get_submission(new).cohort == "cams"
        assert reg.unused_submission_groups() == [("b" * 64, "cams", 2), ("b" * 64, "default", 1)]
    finally:
        reg.close()
