"""TorchDistiller on tiny real checkpoints, and a distillation round through the gRPC server.

The gRPC pieces are imported inside the test that needs them, so the distiller tests also run on a machine
with torch (and CUDA) but without the server's other dependencies:
``pytest --noconftest tests/server/test_server_distill.py -k "not grpc and not import"``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("exporter.adaptable")
pytest.importorskip("exporter.checkpoint")

import torch

from exporter.adaptable import source_params
from exporter.checkpoint import save_checkpoint
from exporter.models import ModelSpec, build_model
from server.distill import TorchDistiller, use_channels_last
from server.errors import InvalidTensorError

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


def test_distill_keeps_nonnegative_params_at_or_above_zero(ckpts: tuple[Path, Path, dict[str, np.ndarray]]
                                                          ) -> None:
    """Projected steps: scales named ``nonnegative`` (a bundle's nonnegative_params) end >= 0 where the same
    unconstrained run drives some below 0; the other parameters may still go negative."""
    teacher, student, params = ckpts
    start = {**params, "bn1.weight": np.full_like(params["bn1.weight"], 1e-3),
             "bn2.weight": np.full_like(params["bn2.weight"], 1e-3)}
    distiller = TorchDistiller(teacher, student, alpha=0.5, device="cpu", batch_size=16, lr=0.2)
    free = distiller.distill(_inputs(), start, steps=10)
    kept = distiller.distill(_inputs(), start, steps=10, nonnegative=frozenset({"bn1.weight"}))
    assert (free.params["bn1.weight"] < 0).any(), "the unconstrained run should overshoot below 0"
    assert (kept.params["bn1.weight"] >= 0).all() and (kept.params["bn1.weight"] == 0).any()
    assert (kept.params["bn2.weight"] < 0).any()  # not named: unconstrained
    assert np.isfinite(kept.metrics["kl_after"])


def test_distill_restores_the_global_rng(ckpts: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    teacher, student, params = ckpts
    distiller = TorchDistiller(teacher, student, alpha=0.5, device="cpu", batch_size=8, seed=3)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    distiller.distill(_inputs(16), params, steps=2)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_use_channels_last_only_for_conv_models_on_cuda() -> None:
    conv = build_model("small_cnn", SPEC)
    assert use_channels_last(conv, torch.device("cuda"))
    assert use_channels_last(conv, torch.device("cuda:0"))
    assert not use_channels_last(conv, torch.device("cpu"))
    assert not use_channels_last(torch.nn.Sequential(torch.nn.Linear(4, 2)), torch.device("cuda"))


def test_cpu_defaults_and_explicit_gpu_style_options(ckpts: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    """On CPU both options default off; channels-last alone changes nothing beyond rounding; bf16 autocast
    (the CUDA path's arithmetic, here on the CPU) still distils."""
    teacher, student, params = ckpts
    plain = TorchDistiller(teacher, student, alpha=0.5, device="cpu", batch_size=16)
    assert not plain.channels_last and not plain._amp and not plain.cuda_graph
    with pytest.raises(ValueError, match="cuda_graph"):
        TorchDistiller(teacher, student, alpha=0.5, device="cpu", cuda_graph=True)
    nhwc = TorchDistiller(teacher, student, alpha=0.5, device="cpu", batch_size=16, channels_last=True)
    assert nhwc.channels_last
    assert nhwc.student.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = plain.distill(_inputs(), params, steps=10), nhwc.distill(_inputs(), params, steps=10)
    for k in params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-4, atol=1e-4)
    bf16 = TorchDistiller(teacher, student, alpha=0.5, device="cpu", batch_size=16, autocast=True,
                          channels_last=True).distill(_inputs(), params, steps=25)
    assert all(np.all(np.isfinite(v)) for v in bf16.params.values())
    assert bf16.metrics["kl_after"] < 0.8 * bf16.metrics["kl_before"]
    np.testing.assert_allclose(bf16.metrics["kl_before"], a.metrics["kl_before"], rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_distill_on_cuda_bf16_channels_last(ckpts: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    """The CUDA path (bf16 autocast, channels-last, fused Adam, CUDA graph): same contract as on CPU, close to
    the CPU numbers and to eager steps, reproducible and leaving the global RNGs as they were."""
    teacher, student, params = ckpts
    gpu = TorchDistiller(teacher, student, alpha=0.5, device="cuda", batch_size=16)
    assert gpu.device.type == "cuda" and gpu._amp and gpu.channels_last and gpu.cuda_graph
    assert gpu.student.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    cpu = TorchDistiller(teacher, student, alpha=0.5, device="cpu", batch_size=16).distill(_inputs(), params, 25)
    torch.cuda.manual_seed(7)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(7)
    a = gpu.distill(_inputs(), params, steps=25)
    torch.testing.assert_close(torch.rand(4, device="cuda"), expected, rtol=0, atol=0)
    b = gpu.distill(_inputs(), params, steps=25)
    assert gpu.cuda_graph, "the CUDA graph capture failed and fell back to eager steps"
    eager = TorchDistiller(teacher, student, alpha=0.5, device="cuda", batch_size=16, cuda_graph=False)
    c = eager.distill(_inputs(), params, steps=25)
    assert sorted(a.params) == sorted(params)
    for k, v in params.items():
        assert a.params[k].dtype == np.float32 and a.params[k].shape == v.shape
        assert np.all(np.isfinite(a.params[k])), k
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-5, atol=1e-6)  # reproducible
        np.testing.assert_allclose(c.params[k], a.params[k], rtol=1e-3, atol=1e-4)  # graph replay = eager steps
        if k.endswith((".mean", ".var")):
            np.testing.assert_array_equal(a.params[k], v)
    m = a.metrics
    assert m["kl_after"] < 0.8 * m["kl_before"]
    assert m["teacher_entropy_after"] <= m["teacher_entropy_before"] + 1e-3
    for key in ("kl_before", "teacher_entropy_before", "teacher_entropy_after"):
        np.testing.assert_allclose(m[key], cpu.metrics[key], rtol=0.05, err_msg=key)
    assert m["samples_per_s"] > 0 and m["seconds"] > 0


def test_server_import_does_not_import_torch() -> None:
    code = "import sys, server.app, server.servicers, server.rounds; sys.exit('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr or "torch was imported by server.app"


def test_distill_round_over_grpc_with_torch_distiller(
    tmp_path: Path, ckpts: tuple[Path, Path, dict[str, np.ndarray]]
) -> None:
    import grpc

    from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
    from server.app import ServerConfig, create_server
    from tests.server.server_testkit import RPC_TIMEOUT, bundle_chunks, make_bundle_files, sample_msg, wait_round

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
