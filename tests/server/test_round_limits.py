"""StartRound's ``steps`` and ``max_samples`` are bounded by the server's config (``max_distill_steps``,
``round_max_samples``): a request beyond a limit is INVALID_ARGUMENT naming the field, its value and the limit,
and queues nothing; the samples and submissions already stored stay unused for the next round.

A real server on 127.0.0.1:0 with a real SQLite registry (the conftest fixtures), with a fake distiller."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import EdgeloopServer, ServerConfig
from server.config import load_config
from tests.server.server_testkit import RPC_TIMEOUT, FakeDistiller, initial_params, rpc_error, sample_msg, wait_round

Stub = device_pb2_grpc.DeviceServiceStub
Admin = admin_pb2_grpc.AdminServiceStub


@pytest.fixture
def config(tmp_path: Path) -> ServerConfig:
    """The conftest's server, with small round limits (5 samples, 50 steps) so that tests can reach them."""
    return ServerConfig(data_dir=tmp_path / "data", port=0, chunk_size=1000, max_workers=8, grace_seconds=2.0,
                        distill_steps=3, max_distill_steps=50, round_max_samples=5)


def _start(admin: Admin, kind: str = "distill", **fields: int) -> int:
    return admin.StartRound(admin_pb2.StartRoundRequest(kind=kind, **fields), timeout=RPC_TIMEOUT).round_id


def test_steps_beyond_the_limit_are_refused_naming_the_value_and_limit_and_nothing_is_lost(
        device: Stub, admin: Admin, published: Callable[..., str], running: EdgeloopServer,
        fake_distiller: FakeDistiller) -> None:
    bundle_id = published()
    device.UploadSamples(iter([sample_msg(f"s{i}", bundle_id, seed=i) for i in range(3)]), timeout=RPC_TIMEOUT)
    for steps in (10**9, 2**31 - 1, 51):
        code, details = rpc_error(lambda s=steps: _start(admin, steps=s))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"steps {steps} exceeds" in details and "50" in details and "max_distill_steps" in details
    assert running.registry.get_round(1) is None  # nothing was queued or recorded
    assert len(running.registry.unused_samples(bundle_id, None, True)) == 3 and fake_distiller.calls == []

    status = wait_round(admin, _start(admin, steps=50))  # exactly the limit is fine
    assert status.state == "done" and status.samples_used == 3, status.error
    assert fake_distiller.calls == [((3, 1, 8, 8), 50)]


def test_max_samples_beyond_the_limit_is_refused_not_silently_clamped(
        device: Stub, admin: Admin, published: Callable[..., str], running: EdgeloopServer,
        fake_distiller: FakeDistiller) -> None:
    bundle_id = published()
    device.UploadSamples(iter([sample_msg(f"s{i}", bundle_id, seed=i) for i in range(7)]), timeout=RPC_TIMEOUT)
    code, details = rpc_error(lambda: _start(admin, max_samples=10**9))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_samples 1000000000 exceeds" in details and "5 samples" in details and "round_max_samples" in details
    code, details = rpc_error(lambda: _start(admin, max_samples=6))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_samples 6" in details
    assert running.registry.get_round(1) is None and len(running.registry.unused_samples(bundle_id, None, True)) == 7

    first = wait_round(admin, _start(admin, max_samples=5))
    assert first.state == "done" and first.samples_used == 5, first.error
    default = wait_round(admin, _start(admin))  # 0: the server's default (round_max_samples), the 2 left
    assert default.state == "done" and default.samples_used == 2, default.error
    assert [c[0][0] for c in fake_distiller.calls] == [5, 2] and [c[1] for c in fake_distiller.calls] == [3, 3]


def test_the_limits_apply_to_federated_rounds_too_and_keep_their_submissions(
        device: Stub, admin: Admin, published: Callable[..., str], running: EdgeloopServer) -> None:
    bundle_id = published()
    device.SubmitUpdate(device_pb2.FederatedUpdate(device_id="dev-1", bundle_id=bundle_id, num_samples=2,
                                                   tensors=tensors_to_proto(initial_params())), timeout=RPC_TIMEOUT)
    code, details = rpc_error(lambda: _start(admin, "fedavg", steps=10**6))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "steps 1000000 exceeds" in details
    assert len(running.registry.unused_submissions(bundle_id)) == 1
    status = wait_round(admin, _start(admin, "fedavg"))
    assert status.state == "done" and status.samples_used == 2, status.error


def test_the_limits_are_configurable_and_checked_at_start_up(tmp_path: Path) -> None:
    default = ServerConfig(data_dir=tmp_path)
    assert (default.distill_steps, default.max_distill_steps, default.round_max_samples) == (100, 10_000, 4096)
    path = tmp_path / "server.toml"
    path.write_text('data_dir = "d"\nmax_distill_steps = 20000\ndistill_steps = 15000\nround_max_samples = 64\n')
    cfg = load_config(path)
    assert (cfg.distill_steps, cfg.max_distill_steps, cfg.round_max_samples) == (15_000, 20_000, 64)
    with pytest.raises(ValueError, match="distill_steps 20000 exceeds max_distill_steps 10000"):
        ServerConfig(data_dir=tmp_path, distill_steps=20_000)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_distill_steps must be positive, got {bad}"):
            ServerConfig(data_dir=tmp_path, max_distill_steps=bad, distill_steps=1)
    path.write_text('max_distill_steps = "lots"\n')
    with pytest.raises(ValueError, match="'max_distill_steps' must be int"):
        load_config(path)
