"""Asynchronous FedBuff on a real server: every K submissions over gRPC publish one version by themselves,
weighted by staleness, safely under concurrent devices, and a half-full buffer survives a restart."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from runtime.params import params_digest
from server.app import EdgeloopServer, ServerConfig, create_server
from server.codec import decode_arrays
from server.config import load_config
from server.records import SubmissionRecord
from server.updates import current_params
from tests.server.server_testkit import (
    RPC_TIMEOUT,
    bundle_chunks,
    initial_params,
    make_bundle_files,
    start_server_process,
)

K = 4
ROOT = Path(__file__).resolve().parents[2]


class Fleet:
    """A started server (``aggregator = "fedbuff"``) with the test bundle published, and its stubs."""

    def __init__(self, data_dir: Path, buffer_size: int = K, **options: Any) -> None:
        self.config = ServerConfig(data_dir=data_dir, port=0, max_workers=16, grace_seconds=1.0,
                                   update_encoding="f32", aggregator="fedbuff",
                                   aggregator_options={"buffer_size": buffer_size, **options})
        self.server: EdgeloopServer = create_server(self.config)
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.device = device_pb2_grpc.DeviceServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.bundle_id = self.admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id

    def submit(self, device_id: str, params: dict[str, np.ndarray], base_version: int = 0, n: int = 10) -> int:
        """Register ``device_id`` and submit ``params`` over gRPC; return the submission id."""
        self.device.Register(device_pb2.RegisterRequest(device_id=device_id), timeout=RPC_TIMEOUT)
        return self.device.SubmitUpdate(device_pb2.FederatedUpdate(
            device_id=device_id, bundle_id=self.bundle_id, base_version=base_version, num_samples=n,
            tensors=tensors_to_proto(params)), timeout=RPC_TIMEOUT).submission_id

    @property
    def storage(self) -> Any:
        """The server's registry."""
        return self.server.state.storage

    def versions(self) -> list[int]:
        """Published versions of the default cohort."""
        return [u.version for u in self.storage.updates_since(self.bundle_id, 0)]

    def stop(self) -> None:
        """Close the channel and stop the server."""
        self.channel.close()
        self.server.stop(grace=1.0)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A FedBuff server with K = 4."""
    f = Fleet(tmp_path / "data")
    yield f
    f.stop()


def _params(value: float) -> dict[str, np.ndarray]:
    return {k: v + np.float32(value) for k, v in initial_params().items() if k.startswith("bn1.")}


def _expected_step(before: dict[str, np.ndarray], version: int, subs: list[tuple[dict[str, np.ndarray], int]],
                   held: dict[int, dict[str, np.ndarray]], lr: float = 1.0) -> dict[str, np.ndarray]:
    """x_v = x_{v-1} + lr/K Σ (p_i - x_{b_i}) / sqrt(1 + (v - 1 - b_i)), per parameter over its carriers."""
    out = {}
    for name, value in before.items():
        carriers = [(p, b) for p, b in subs if name in p]
        step = sum((p[name].astype(np.float64) - held[b][name]) / np.sqrt(1.0 + (version - 1 - b)) for p, b in carriers)
        out[name] = (value.astype(np.float64) + lr * step / len(subs)) if carriers else value
    return out


def test_every_k_submissions_publish_a_version_with_staleness_weights(fleet: Fleet) -> None:
    ids = [fleet.submit(f"dev-{i}", _params(0.1 * (i + 1))) for i in range(K - 1)]
    assert fleet.versions() == [] and len(fleet.storage.unused_submissions(fleet.bundle_id, "default")) == K - 1
    fleet.submit("dev-3", _params(0.4))  # the K-th: the server aggregates without any StartRound
    assert fleet.server.runner.wait_idle(10.0)
    assert fleet.versions() == [1]
    v1 = current_params(fleet.server.state, fleet.bundle_id)[0]
    init = {k: v.astype(np.float64) for k, v in initial_params().items()}
    expected = _expected_step(init, 1, [(_params(0.1 * (i + 1)), 0) for i in range(K)], {0: init})
    for k in init:  # bn1.* moved by the mean of 0.1..0.4 = 0.25; bn2.* (never submitted) kept
        np.testing.assert_allclose(v1[k], expected[k], rtol=0, atol=1e-6)
    update = fleet.storage.latest_update(fleet.bundle_id)
    assert update.kind == "fedavg" and update.round_id is not None
    assert fleet.storage.round_inputs(update.round_id) == sorted([*ids, ids[-1] + 1])

    # two devices still on v0 (staleness 1) and two on v1 (staleness 0): weights 1/sqrt(2) and 1
    late = [(_params(1.0), 0), (_params(2.0), 1), (_params(-1.0), 0), (_params(0.5), 1)]
    for i, (p, base) in enumerate(late):
        fleet.submit(f"dev-{i}", p, base_version=base)
    assert fleet.server.runner.wait_idle(10.0)
    assert fleet.versions() == [1, 2]
    v2 = current_params(fleet.server.state, fleet.bundle_id)[0]
    expected2 = _expected_step({k: v.astype(np.float64) for k, v in v1.items()}, 2, late,
                               {0: init, 1: {k: v.astype(np.float64) for k, v in v1.items()}})
    for k in init:
        np.testing.assert_allclose(v2[k], expected2[k], rtol=0, atol=1e-5)
    status = fleet.admin.GetRound(admin_pb2.GetRoundRequest(
        round_id=fleet.storage.latest_update(fleet.bundle_id).round_id), timeout=RPC_TIMEOUT)
    assert status.kind == "fedbuff" and status.state == "done" and status.update_version == 2
    assert status.metrics["submissions"] == K and status.metrics["max_staleness"] == 1.0
    assert status.metrics["mean_staleness"] == 0.5 and status.samples_used == 10 * K
    assert fleet.storage.unused_submissions(fleet.bundle_id) == []


def test_concurrent_devices_publish_exactly_one_version_per_k_and_lose_nothing(fleet: Fleet) -> None:
    """16 device threads × 3 submissions (each on the version its device last heard of) → exactly 12 versions;
    every submission is used by exactly one round, and replaying each round's recorded inputs through the
    FedBuff formula reproduces every published version."""
    devices, each = 16, 3
    errors: list[BaseException] = []
    start = threading.Barrier(devices)

    def device(i: int) -> None:
        try:
            start.wait(10.0)
            for j in range(each):
                base = fleet.storage.latest_version("default")
                fleet.submit(f"dev-{i}", _params(0.01 * (i + 1) * (j + 1)), base_version=base)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    assert not errors, errors
    assert fleet.server.runner.wait_idle(30.0)
    total = devices * each
    assert fleet.versions() == list(range(1, total // K + 1))
    assert fleet.storage.unused_submissions(fleet.bundle_id) == []

    held = {0: {k: v.astype(np.float64) for k, v in initial_params().items()}}
    seen: set[int] = set()
    for update in fleet.storage.updates_since(fleet.bundle_id, 0):
        inputs = fleet.storage.round_inputs(update.round_id)
        assert len(inputs) == K and not seen & set(inputs)
        seen |= set(inputs)
        subs = [fleet.storage.get_submission(i) for i in inputs]
        assert all(s.used_in_round == update.round_id for s in subs)
        given = [(decode_arrays(fleet.server.blobs.get(s.blob)), s.base_version) for s in subs]
        expected = _expected_step(held[update.version - 1], update.version, given, held)
        got = decode_arrays(fleet.server.blobs.get(update.blob))
        for k in expected:
            np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-5)
        held[update.version] = {k: v.astype(np.float64) for k, v in got.items()}
        assert params_digest(got) == update.sha256
    assert len(seen) == total


def test_a_half_full_buffer_survives_a_restart(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "data", buffer_size=3)
    first = [fleet.submit("dev-a", _params(1.0)), fleet.submit("dev-b", _params(2.0))]
    assert fleet.server.runner.wait_idle(10.0) and fleet.versions() == []
    fleet.stop()

    again = Fleet(tmp_path / "data", buffer_size=3)  # the same registry: the two submissions are the buffer
    try:
        assert again.server.runner.wait_idle(10.0) and again.versions() == []
        assert [s.id for s in again.storage.unused_submissions(again.bundle_id, "default")] == first
        third = again.submit("dev-c", _params(3.0))
        assert again.server.runner.wait_idle(10.0) and again.versions() == [1]
        update = again.storage.latest_update(again.bundle_id)
        assert again.storage.round_inputs(update.round_id) == [*first, third]
        bn1 = current_params(again.server.state, again.bundle_id)[0]["bn1.bias"]
        np.testing.assert_allclose(bn1, initial_params()["bn1.bias"] + 2.0, rtol=0, atol=1e-6)
    finally:
        again.stop()


def test_a_restart_with_a_full_buffer_aggregates_it_at_start_up(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "data", buffer_size=2)
    for i in range(3):
        fleet.submit(f"dev-{i}", _params(float(i)))
    assert fleet.server.runner.wait_idle(10.0) and fleet.versions() == [1]
    fleet.stop()
    again = Fleet(tmp_path / "data", buffer_size=1)  # K lowered: the leftover submission is a full buffer now
    try:
        assert again.server.runner.wait_idle(10.0) and again.versions() == [1, 2]
    finally:
        again.stop()


def test_start_round_flushes_a_partial_buffer_and_cohorts_buffer_apart(fleet: Fleet) -> None:
    fleet.device.Register(device_pb2.RegisterRequest(device_id="cam-1", labels={"cohort": "cams"}),
                          timeout=RPC_TIMEOUT)
    for i in range(K - 1):
        fleet.submit(f"dev-{i}", _params(1.0))
    cam = fleet.device.SubmitUpdate(device_pb2.FederatedUpdate(
        device_id="cam-1", bundle_id=fleet.bundle_id, base_version=0, num_samples=5,
        tensors=tensors_to_proto(_params(5.0))),
        timeout=RPC_TIMEOUT).submission_id
    assert fleet.server.runner.wait_idle(10.0)
    assert fleet.versions() == [] and fleet.storage.get_submission(cam).cohort == "cams"
    assert fleet.storage.unused_submission_groups() == [(fleet.bundle_id, "cams", 1), (fleet.bundle_id, "default", 3)]
    rid = fleet.admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT).round_id
    record = fleet.server.runner.wait(rid, 10.0)
    assert record.state == "done" and record.metrics["submissions"] == K - 1 and fleet.versions() == [1]
    np.testing.assert_allclose(current_params(fleet.server.state, fleet.bundle_id)[0]["bn1.bias"],
                               initial_params()["bn1.bias"] + 1.0, rtol=0, atol=1e-6)
    assert [s.id for s in fleet.storage.unused_submissions(fleet.bundle_id)] == [cam]  # the cams' buffer waits


def test_synchronous_strategies_never_aggregate_by_themselves(tmp_path: Path) -> None:
    server = create_server(ServerConfig(data_dir=tmp_path / "d", port=0, grace_seconds=1.0))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            admin = admin_pb2_grpc.AdminServiceStub(ch)
            bundle_id = admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id
        for i in range(12):
            server.state.storage.upsert_device(f"d{i}", {}, "onnx", 0)
            server.state.storage.insert_submission(SubmissionRecord(f"d{i}", bundle_id, 0, 1, "0" * 64, 0))
        assert server.runner.wait_idle(10.0) and server.state.storage.latest_version() == 0
    finally:
        server.stop(grace=1.0)


def test_buffer_size_is_validated_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="buffer_size 0 must be >= 1"):
        ServerConfig(data_dir=tmp_path, aggregator="fedbuff", aggregator_options={"buffer_size": 0})
    path = tmp_path / "s.toml"
    path.write_text('data_dir = "d"\naggregator = "fedbuff"\n[aggregator_options]\nbuffer_size = 8\n'
                    'server_lr = 0.5\n')
    cfg = load_config(path)
    agg = cfg.create_aggregator()
    assert agg.asynchronous and agg.buffer_size == 8 and agg.config.server_lr == 0.5
    path.write_text('data_dir = "d"\naggregator = "fedbuff"\n[aggregator_options]\nbuffer = 8\n')
    with pytest.raises(ValueError, match="bad options for aggregator 'fedbuff'"):
        load_config(path)


def test_kill9_while_aggregating_loses_no_acknowledged_submission(tmp_path: Path) -> None:
    """``kill -9`` while devices submit and the server aggregates; after a restart every acknowledged submission
    is in exactly one round that published a version, or still waits in the buffer, and no round is left open."""
    data, k = tmp_path / "data", 3
    proc, port = start_server_process(
        data, f"update_encoding='f32', aggregator='fedbuff', aggregator_options={{'buffer_size': {k}}}")
    target = f"127.0.0.1:{port}"
    acked: list[int] = []
    try:
        with grpc.insecure_channel(target) as ch:
            bundle_id = admin_pb2_grpc.AdminServiceStub(ch).PublishBundle(bundle_chunks(make_bundle_files()),
                                                                          timeout=RPC_TIMEOUT).bundle_id

        def submit_until_failure(worker: int) -> None:
            with grpc.insecure_channel(target) as ch:
                stub = device_pb2_grpc.DeviceServiceStub(ch)
                try:
                    stub.Register(device_pb2.RegisterRequest(device_id=f"w{worker}"), timeout=RPC_TIMEOUT)
                    for j in range(10_000):
                        acked.append(stub.SubmitUpdate(device_pb2.FederatedUpdate(
                            device_id=f"w{worker}", bundle_id=bundle_id, base_version=0, num_samples=1,
                            tensors=tensors_to_proto(_params(0.001 * j))), timeout=5).submission_id)
                except grpc.RpcError:
                    return

        workers = [threading.Thread(target=submit_until_failure, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 15
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        for w in workers:
            w.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 60

    config = ServerConfig(data_dir=data, port=0, grace_seconds=1.0, update_encoding="f32", aggregator="fedbuff",
                          aggregator_options={"buffer_size": k})
    with create_server(config) as srv:
        assert srv.runner.wait_idle(30.0)
        storage = srv.state.storage
        assert storage.unfinished_rounds() == []
        published = {u.round_id: u.version for u in storage.updates_since(bundle_id, 0)}
        assert sorted(published.values()) == list(range(1, len(published) + 1))
        for submission_id in acked:
            s = storage.get_submission(submission_id)
            assert s is not None, f"acknowledged submission {submission_id} is missing after kill -9"
            assert s.used_in_round is None or s.used_in_round in published, s
        for round_id in published:
            assert len(storage.round_inputs(round_id)) == k
        assert len(storage.unused_submissions(bundle_id)) < k  # every full buffer was aggregated at start-up


def test_an_unreadable_submission_is_quarantined_and_the_buffer_waits_for_k_readable_ones(tmp_path: Path) -> None:
    """K = 2 over gRPC. The first submission's blob rots on disk: when the second fills the buffer, the rotten one is
    quarantined (a failed round naming it) and nothing is published from one readable submission; the third
    completes the buffer and the version is the FedBuff step over exactly K = 2 readable submissions."""
    fleet = Fleet(tmp_path / "data", buffer_size=2)
    try:
        rotten = fleet.submit("dev-a", _params(0.1))
        fleet.server.blobs.path(fleet.storage.get_submission(rotten).blob).write_bytes(b"rot")
        kept = fleet.submit("dev-b", _params(0.2))
        assert fleet.server.runner.wait_idle(10.0)
        assert fleet.versions() == []
        quarantine = fleet.admin.GetRound(admin_pb2.GetRoundRequest(
            round_id=fleet.storage.get_submission(rotten).used_in_round), timeout=RPC_TIMEOUT)
        assert quarantine.kind == "fedbuff" and quarantine.state == "failed"
        assert f"unreadable (quarantined: {rotten})" in quarantine.error
        assert "1 readable one(s) stay buffered until 2 are readable" in quarantine.error
        assert dict(quarantine.metrics) == {"unreadable_submissions": 1.0, "buffer_size": 2.0,
                                            "buffered_submissions": 1.0}
        assert fleet.storage.get_submission(kept).used_in_round is None

        last = fleet.submit("dev-c", _params(0.3))
        assert fleet.server.runner.wait_idle(10.0)
        assert fleet.versions() == [1]
        step = fleet.admin.GetRound(admin_pb2.GetRoundRequest(
            round_id=fleet.storage.get_submission(last).used_in_round), timeout=RPC_TIMEOUT)
        assert step.state == "done" and step.update_version == 1, step.error
        assert step.metrics["submissions"] == 2.0 and step.metrics["unreadable_submissions"] == 0.0
        assert fleet.storage.round_inputs(step.round_id) == [kept, last]
        init = initial_params()
        current, _ = current_params(fleet.server.state, fleet.bundle_id)
        for name in _params(0):  # both on v0, staleness 0: x1 = x0 + (0.2 + 0.3) / 2
            np.testing.assert_allclose(current[name], init[name].astype(np.float64) + 0.25, rtol=0, atol=1e-5)
    finally:
        fleet.stop()
