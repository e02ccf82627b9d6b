"""TorchDistiller on tiny real checkpoints, and a distillation round through the gRPC server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("exporter.adaptable")
pytest.importorskip("exporter.checkpoint")

import grpc
import torch

from exporter.adaptable import source_params
from exporter.checkpoint import save_checkpoint
from exporter.models import ModelSpec, build_model
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import ServerConfig, create_server
from server.distill import TorchDistiller
from server.errors import InvalidTensorError
from tests.server.server_testkit import RPC_TIMEOUT, sample_msg, wait_round

SPEC = ModelSpec(in_channels=1, num_classes=10, image_size=8, mean=(0.5,), std=(0.25,))
ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(path: Path, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    torch.manual_seed(seed)
    model = build_model("small_cnn", SPEC)
    with torch.no_grad():  # non-trivial BN statistics and affine values
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    save_checkpoint(model, "small_cnn", SPEC, path, {"dataset": "test"})
    return path, {k: v.numpy().astype(np.float32) for k, v in source_params(model).items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Teacher and student checkpoints (both small_cnn, different seeds) and the student's BN params."""
    d = tmp_path_factory.mktemp("ckpt")
    teacher, _ = _checkpoint(d / "teacher.pt", seed=1)
    student, params = _checkpoint(d / "student.pt", seed=2)
    return teacher, student, params


def _inputs(n: int = 48) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def test_distill_moves_only_affine_and_reduces_kl(ckpts: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    teacher, student, params = ckpts
    distiller = TorchDistiller(teacher, student, alpha=0.5, device="cpu", batch_size=16)
    result = distiller.distill(_inputs(), params, steps=25)
    assert sorted(result.params) == sorted(params)
    for k, v in params.items():
        new = result.params[k]
        assert new.dtype == np.float32 and new.shape == v.shape and np.all(np.isfinite(new))
        if k.endswith((".mean", ".var")):
            np.testing.assert_array_equal(new, v)
    assert any(not np.allclose(result.params[k], params[k]) for k in params if k.endswith(".weight"))
    m = result.metrics
    for key in ("teacher_entropy_before", "teacher_entropy_after", "kl_before", "kl_after", "agreement_before",
                "agreement_after", "seconds", "samples_per_s"):
        assert np.isfinite(m[key]), key
    assert m["kl_after"] < 0.8 * m["kl_before"]
    assert m["agreement_after"] >= m["agreement_before"]
    assert m["teacher_entropy_after"] <= m["teacher_entropy_before"] + 1e-6  # Tent lowers entropy


def test_distill_is_deterministic_and_validates(ckpts: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    teacher, student, params = ckpts
    distiller = TorchDistiller(teacher, student, alpha=1.0, device="cpu", batch_size=8)
    a = distiller.distill(_inputs(16), params, steps=3)
    b = distiller.distill(_inputs(16), params, steps=3)
    for k in params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    with pytest.raises(InvalidTensorError, match="shape"):
        distiller.distill(np.zeros((4, 1, 9, 9), np.float32), params, steps=1)
    with pytest.raises(ValueError, match="alpha"):
        TorchDistiller(teacher, student, alpha=1.5, device="cpu")


def test_server_import_does_not_import_torch() -> None:
    code = "import sys, server.app, server.servicers, server.rounds; sys.exit('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr or "torch was imported by server.app"


def test_distill_round_over_grpc_with_torch_distiller(
    tmp_path: Path, ckpts: tuple[Path, Path, dict[str, np.ndarray]]
) -> None:
    from tests.server.server_testkit import bundle_chunks, make_bundle_files

    teacher, student, _ = ckpts
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, teacher_ckpt=teacher, student_ckpt=student,
                       device="cpu", distill_steps=4, max_workers=4, grace_seconds=1)
    # the test bundle's layers differ from small_cnn's, so publish one whose initial params fit the student
    files = make_bundle_files(initial=ckpts[2])
    with create_server(cfg) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        admin, device = admin_pb2_grpc.AdminServiceStub(ch), device_pb2_grpc.DeviceServiceStub(ch)
        bundle_id = admin.PublishBundle(bundle_chunks(files), timeout=RPC_TIMEOUT).bundle_id
        device.Register(device_pb2.RegisterRequest(device_id="dev-1"), timeout=RPC_TIMEOUT)
        device.UploadSamples(iter([sample_msg(f"s{i}", bundle_id, seed=i) for i in range(12)]), timeout=RPC_TIMEOUT)
        rid = admin.StartRound(admin_pb2.StartRoundRequest(kind="distill"), timeout=RPC_TIMEOUT).round_id
        status = wait_round(admin, rid, timeout=60)
    assert status.state == "done", status.error
    assert status.samples_used == 12 and status.update_version == 1
    assert status.metrics["kl_after"] <= status.metrics["kl_before"]
