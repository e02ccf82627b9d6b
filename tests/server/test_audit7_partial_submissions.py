"""Rules over the whole parameter vector (krum, dp_fedavg) with devices that submit different parameter sets: a
forward-only device submits only what it adapted (e.g. the normalisation statistics), another its scale/shift too.
The round completes each submission with the current values of what it leaves out (it proposes no change there).
Before, such a round failed ("krum needs every contribution to carry …") and, since a failed round leaves its
submissions unused, so did every later round for as long as that device's submission stayed its newest unused one.

A real server on 127.0.0.1:0 with a real SQLite registry, over gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import EdgeloopServer, ServerConfig, create_server
from server.updates import current_params
from tests.server.server_testkit import RPC_TIMEOUT, bundle_chunks, initial_params, make_bundle_files, wait_round

DEVICES = [f"d{i}" for i in range(6)]


@pytest.fixture(params=[("krum", {"byzantine": 1}), ("dp_fedavg", {"clip_norm": 10.0, "noise_multiplier": 1e-6,
                                                                   "seed": 0})], ids=["krum", "dp_fedavg"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path
          ) -> Iterator[tuple[EdgeloopServer, device_pb2_grpc.DeviceServiceStub, admin_pb2_grpc.AdminServiceStub, str]]:
    name, options = request.param
    srv = create_server(ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, grace_seconds=1.0,
                                     aggregator=name, aggregator_options=options))
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            device, admin = device_pb2_grpc.DeviceServiceStub(channel), admin_pb2_grpc.AdminServiceStub(channel)
            bundle_id = admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id
            for d in DEVICES:
                device.Register(device_pb2.RegisterRequest(device_id=d), timeout=RPC_TIMEOUT)
            yield srv, device, admin, bundle_id
    finally:
        srv.stop(grace=1.0)


def _submit(device: device_pb2_grpc.DeviceServiceStub, bundle_id: str, device_id: str,
            params: dict[str, Any]) -> None:
    device.SubmitUpdate(device_pb2.FederatedUpdate(device_id=device_id, bundle_id=bundle_id, num_samples=4,
                                                   tensors=tensors_to_proto(params)), timeout=RPC_TIMEOUT)


def test_whole_vector_rules_aggregate_devices_that_submit_different_parameter_sets(
        fleet: tuple[EdgeloopServer, device_pb2_grpc.DeviceServiceStub, admin_pb2_grpc.AdminServiceStub, str]
) -> None:
    srv, device, admin, bundle_id = fleet
    p = initial_params()
    stats = sorted(k for k in p if k.endswith((".mean", ".var")))
    for rnd in (1, 2):
        shift = np.float32(0.01 * rnd)
        for d in DEVICES[:5]:  # every parameter (weight and bias adapted too)
            _submit(device, bundle_id, d, {k: v + shift for k, v in p.items()})
        _submit(device, bundle_id, DEVICES[5], {k: p[k] + shift for k in stats})  # statistics only
        round_id = admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT).round_id
        status = wait_round(admin, round_id)
        assert (status.state, status.update_version, status.metrics["submissions"]) == ("done", rnd, 6.0), status.error
        assert srv.registry.unused_submissions(bundle_id) == []
        exact, version = current_params(srv.state, bundle_id)
        assert version == rnd
        for k in stats:  # every device moved the statistics by the same shift from the version they held
            np.testing.assert_allclose(exact[k], p[k] + shift, atol=1e-4)
