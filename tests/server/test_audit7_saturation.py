"""An aggregate beyond the float32 range (finite submissions near its limit, a server learning rate > 1) is set
to the limit and counted in the round's metrics. Before, the round failed ("aggregated parameter 'bn1.weight' is
not finite") and, as a failure leaves its inputs unused, FedBuff took the same oldest submission again at every
later submission: the cohort never published another version.

A real server on 127.0.0.1:0 (FedBuff, K = 1, η = 2) with a real SQLite registry, over gRPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import ServerConfig, create_server
from server.updates import current_params
from tests.server.server_testkit import RPC_TIMEOUT, bundle_chunks, make_bundle_files

BIG = float(np.finfo(np.float32).max)


def test_an_aggregate_beyond_float32_saturates_and_the_buffer_keeps_draining(tmp_path: Path) -> None:
    srv = create_server(ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, grace_seconds=1.0,
                                     aggregator="fedbuff", aggregator_options={"buffer_size": 1, "server_lr": 2.0}))
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            device = device_pb2_grpc.DeviceServiceStub(channel)
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            bundle_id = admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id
            device.Register(device_pb2.RegisterRequest(device_id="dev-1"), timeout=RPC_TIMEOUT)
            for value in (BIG / 1.5, 1.0):  # η · Δ of the first: 4/3 of the float32 limit
                device.SubmitUpdate(device_pb2.FederatedUpdate(
                    device_id="dev-1", bundle_id=bundle_id, num_samples=2, base_version=0,
                    tensors=tensors_to_proto({"bn1.weight": np.full(4, value, np.float32)})), timeout=RPC_TIMEOUT)
                assert srv.runner.wait_idle(timeout=10)
        assert srv.registry.unused_submissions(bundle_id) == []
        first, second = srv.registry.get_round(1), srv.registry.get_round(2)
        assert first is not None and second is not None
        assert (first.state, first.update_version, first.metrics.get("fedbuff_saturated")) == ("done", 1, 4.0), \
            first.error
        assert (second.state, second.update_version) == ("done", 2), second.error
        exact, version = current_params(srv.state, bundle_id)
        assert version == 2 and all(np.all(np.isfinite(v)) for v in exact.values())
    finally:
        srv.stop(grace=1.0)
