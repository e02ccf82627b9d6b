"""Finite parameters near the float32 limit (a byzantine or broken device may submit them): every round still
publishes, and every update a device receives (watched or pulled) decodes to finite parameters equal to the
published ones. A delta between such values overflows float32, and an int8 delta near the limit decodes past it:
those updates go in full. Before, the first round published an int8 delta that devices decoded to inf, the
server kept inf as what the cohort held, and every later round of the cohort failed ("delta ... contains NaN or
infinite values").

A real server on 127.0.0.1:0 (default int8_delta updates) with a real SQLite registry (the conftest fixtures)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from runtime.params import params_digest
from server.app import EdgeloopServer
from server.updates import current_params
from tests.server.server_testkit import RPC_TIMEOUT, initial_params, update_params, wait_round

Stub = device_pb2_grpc.DeviceServiceStub
Admin = admin_pb2_grpc.AdminServiceStub
BIG = np.finfo(np.float32).max


def _round(device: Stub, admin: Admin, bundle_id: str, value: float) -> admin_pb2.RoundStatus:
    device.SubmitUpdate(device_pb2.FederatedUpdate(
        device_id="dev-1", bundle_id=bundle_id, num_samples=3,
        tensors=tensors_to_proto({"bn1.weight": np.full(4, value, np.float32)})), timeout=RPC_TIMEOUT)
    round_id = admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT).round_id
    return wait_round(admin, round_id)


def test_parameters_near_the_float32_limit_publish_finite_updates_and_never_block_the_cohort(
        device: Stub, admin: Admin, published: Callable[..., str], running: EdgeloopServer) -> None:
    bundle_id = published()
    values = (BIG, -BIG, BIG, 0.0, BIG)
    for version, value in enumerate(values, start=1):
        status = _round(device, admin, bundle_id, value)
        assert (status.state, status.update_version) == ("done", version), status.error
    exact, version = current_params(running.state, bundle_id)
    assert version == len(values) and np.all(exact["bn1.weight"] == BIG)

    held = initial_params()  # a device applying every update from version 0, as watched
    watched = list(device.WatchUpdates(device_pb2.WatchRequest(device_id="dev-1", bundle_id=bundle_id,
                                                               max_wait_seconds=0.2), timeout=RPC_TIMEOUT))
    assert [m.version for m in watched] == [1, 2, 3, 4, 5]
    for msg, value in zip(watched, values, strict=True):
        held = update_params(msg, held)
        assert all(np.all(np.isfinite(v)) for v in held.values()), (msg.version, msg.encoding)
        assert params_digest(held) == msg.sha256
        np.testing.assert_allclose(held["bn1.weight"], value, rtol=0, atol=BIG / 127)  # one int8 step

    for held_version, value in enumerate((None, *values[:-1])):  # pulls from the exact parameters of each version
        before = initial_params() if value is None else {**exact, "bn1.weight": np.full(4, value, np.float32)}
        msg = device.PullUpdate(device_pb2.PullRequest(device_id="dev-1", bundle_id=bundle_id,
                                                       held_version=held_version, held_sha256=params_digest(before)),
                                timeout=RPC_TIMEOUT)
        after = update_params(msg, before)
        assert msg.version == 5 and all(np.all(np.isfinite(v)) for v in after.values()), (held_version, msg.encoding)
        assert params_digest(after) == msg.sha256
        np.testing.assert_allclose(after["bn1.weight"], BIG, rtol=0, atol=BIG / 127)
