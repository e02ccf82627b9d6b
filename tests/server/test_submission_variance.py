"""A device submission carrying a negative variance (``<layer>.var``, the manifest's ``variance_params``) is refused
at SubmitUpdate with INVALID_ARGUMENT naming the parameter and its most negative value — given as tensors or as an
encoded payload — and nothing is stored; the projection of a round's result onto >= 0 stays as defence in depth.

A real server on 127.0.0.1:0 with a real SQLite registry (the conftest fixtures)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from runtime.update_codec import compress_delta, decode_delta, encode_full
from server.app import EdgeloopServer, ServerConfig, create_server
from server.codec import decode_arrays
from server.updates import current_params
from tests.server.server_testkit import (
    RPC_TIMEOUT,
    bundle_chunks,
    initial_params,
    make_bundle_files,
    rpc_error,
    wait_round,
)

Stub = device_pb2_grpc.DeviceServiceStub
Admin = admin_pb2_grpc.AdminServiceStub
VARIANCE_REASON = "is negative (the most negative of 2 negative values): a variance is never negative"


def _update(bundle_id: str, n: int = 1, **fields: object) -> device_pb2.FederatedUpdate:
    return device_pb2.FederatedUpdate(device_id="dev-1", bundle_id=bundle_id, base_version=0, num_samples=n,
                                      **fields)  # type: ignore[arg-type]


def _with_bad_variance() -> dict[str, np.ndarray]:
    params = initial_params()
    params["bn2.var"] = np.array([1.0, -0.25, 1.0, 1.0, -3.5, 1.0, 1.0, 1.0], np.float32)
    return params


def test_a_negative_variance_in_submitted_tensors_is_refused_naming_it_and_nothing_is_stored(
        device: Stub, admin: Admin, published: Callable[..., str], running: EdgeloopServer) -> None:
    bundle_id = published()
    good = initial_params()
    good["bn1.var"] = np.array([0.0, 0.5, 2.0, 0.0], np.float32)  # 0 is a variance (a constant channel)
    kept = device.SubmitUpdate(_update(bundle_id, 2, tensors=tensors_to_proto(good)), timeout=RPC_TIMEOUT)

    code, details = rpc_error(lambda: device.SubmitUpdate(
        _update(bundle_id, tensors=tensors_to_proto(_with_bad_variance())), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"bn2.var[4] = -3.5 {VARIANCE_REASON}" in details
    only = {"bn1.var": np.array([1.0, 1.0, -1e-6, 1.0], np.float32)}  # a partial submission, one tiny negative
    code, details = rpc_error(lambda: device.SubmitUpdate(_update(bundle_id, tensors=tensors_to_proto(only)),
                                                          timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bn1.var[2] = -1e-06 is negative: a variance" in details
    nan = {"bn1.var": np.array([1.0, np.nan, 1.0, 1.0], np.float32)}  # refused as before, by the same check
    code, details = rpc_error(lambda: device.SubmitUpdate(_update(bundle_id, tensors=tensors_to_proto(nan)),
                                                          timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'bn1.var': contains NaN" in details

    assert [s.id for s in running.registry.unused_submissions(bundle_id)] == [kept.submission_id]
    status = wait_round(admin, admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"),
                                                timeout=RPC_TIMEOUT).round_id)
    assert status.state == "done" and status.samples_used == 2, status.error  # what was accepted is not lost
    np.testing.assert_array_equal(current_params(running.state, bundle_id)[0]["bn1.var"], good["bn1.var"])


def test_a_negative_variance_in_an_encoded_payload_is_refused_naming_it(
        device: Stub, published: Callable[..., str], running: EdgeloopServer) -> None:
    init = initial_params()
    init["bn1.var"] = np.array([0.006, 1.0, 1.0, 1.0], np.float32)  # a channel with a variance near 0
    bundle_id = published(make_bundle_files(initial=init))
    code, details = rpc_error(lambda: device.SubmitUpdate(
        _update(bundle_id, encoding="f32", payload=encode_full(_with_bad_variance())), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"bn2.var[4] = -3.5 {VARIANCE_REASON}" in details and "decoded from the f32 payload" in details

    # a delta that takes bn1.var[1] to -2 (the delta itself may have any sign): refused, whatever the encoding
    payload = compress_delta({"bn1.var": np.array([0.0, -3.0, 0.5, 0.0], np.float32)}, None, "int8_delta").payload
    code, details = rpc_error(lambda: device.SubmitUpdate(
        _update(bundle_id, encoding="int8_delta", payload=payload), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bn1.var[1] = -2 is negative: a variance" in details
    assert "decoded from the int8_delta payload on base_version 0" in details and "quantisation step" in details
    assert running.registry.unused_submissions(bundle_id) == []

    # an honest device takes bn1.var[0] from 0.006 to 0.001 and bn1.var[1] from 1 to 2: with one int8 scale
    # (1/127) for the tensor, 0.001 decodes to 0.006 - 1/127 = -0.0019, rounding: taken as 0, not refused
    honest = np.array([0.001, 2.0, 1.0, 1.0], np.float32)
    payload = compress_delta({"bn1.var": honest - init["bn1.var"]}, None, "int8_delta").payload
    decoded = init["bn1.var"] + decode_delta(payload, "int8_delta", {"bn1.var": (4,)})["bn1.var"]
    assert -1 / 127 <= decoded[0] < 0  # what the server decodes, before the check
    ack = device.SubmitUpdate(_update(bundle_id, encoding="int8_delta", payload=payload), timeout=RPC_TIMEOUT)
    stored = decode_arrays(running.blobs.get(running.registry.get_submission(ack.submission_id).blob))
    np.testing.assert_allclose(stored["bn1.var"], [0.0, 2.0, 1.0, 1.0], rtol=0, atol=1e-6)


def test_a_round_that_overshoots_below_zero_still_publishes_a_nonnegative_variance(tmp_path: Path) -> None:
    """Defence in depth: every submission is >= 0, but FedBuff's server learning rate (2) extrapolates past 0;
    the published version is projected onto >= 0."""
    config = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=4, grace_seconds=1.0,
                          update_encoding="f32", aggregator="fedbuff",
                          aggregator_options={"buffer_size": 1, "server_lr": 2.0})
    server = create_server(config)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            admin, device = admin_pb2_grpc.AdminServiceStub(channel), device_pb2_grpc.DeviceServiceStub(channel)
            bundle_id = admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id
            device.Register(device_pb2.RegisterRequest(device_id="dev-1"), timeout=RPC_TIMEOUT)
            low = {"bn1.var": np.array([0.1, 0.0, 2.0, 1.0], np.float32)}
            device.SubmitUpdate(_update(bundle_id, tensors=tensors_to_proto(low)), timeout=RPC_TIMEOUT)
            assert server.runner.wait_idle(10.0)
        var = current_params(server.state, bundle_id)[0]["bn1.var"]
        init = initial_params()["bn1.var"].astype(np.float64)
        expected = np.maximum(init + 2.0 * (low["bn1.var"] - init), 0.0)  # x + η Δ, then >= 0
        assert (expected[:2] == 0).all() and (var >= 0).all()
        np.testing.assert_allclose(var, expected, rtol=0, atol=1e-5)
    finally:
        server.stop(grace=1.0)
