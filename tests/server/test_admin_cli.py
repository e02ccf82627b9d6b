"""``edgeloop admin`` against a real server on 127.0.0.1:0: publish a real bundle, list devices, start and follow
a real distillation round (torch distiller), and every error path named in one line."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgeloop.cli import main
from proto.convert import tensor_to_proto
from proto.edgeloop.v1 import device_pb2, device_pb2_grpc
from server.app import EdgeloopServer, ServerConfig, create_server
from tests.server.server_testkit import RPC_TIMEOUT

pytest.importorskip("exporter.bundle")

ADMIN_TOKEN = "admin-token-for-the-cli-test"
ENROLL = "enrollment-secret-of-this-test"


@pytest.fixture
def server(tmp_path: Path, digits_checkpoint: tuple[Path, str]) -> Iterator[EdgeloopServer]:
    """A server with the torch distiller; its teacher is a copy in tmp_path (a test may damage it)."""
    teacher = tmp_path / "teacher.pt"
    shutil.copyfile(digits_checkpoint[0], teacher)
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, teacher_ckpt=teacher, student_ckpt=digits_checkpoint[0],
                       device="cpu", distill_steps=5, max_workers=4, grace_seconds=1)
    with create_server(cfg) as srv:
        yield srv


def admin(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``edgeloop admin ARGV``: (exit status, stdout, stderr)."""
    code = main(["admin", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def upload_samples(port: int, bundle_id: str, x: np.ndarray, feature_dim: int) -> None:
    """Register ``cam-1`` and upload ``x`` as its samples, through the device service."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        device = device_pb2_grpc.DeviceServiceStub(ch)
        device.Register(device_pb2.RegisterRequest(device_id="cam-1", labels={"site": "north"}), timeout=RPC_TIMEOUT)
        samples = [device_pb2.Sample(
            device_id="cam-1", sample_id=f"s{i}", bundle_id=bundle_id, entropy=0.5,
            input=tensor_to_proto("input", x[i : i + 1]),
            features=tensor_to_proto("features", np.zeros(feature_dim, np.float32))) for i in range(len(x))]
        assert len(device.UploadSamples(iter(samples), timeout=RPC_TIMEOUT).stored_ids) == len(x)


def test_publish_devices_and_a_followed_round(
    server: EdgeloopServer, digits_bundle: Path, digits_arrays: tuple[np.ndarray, ...], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = f"127.0.0.1:{server.port}"
    code, out, _ = admin(capsys, "devices", "--server", target)
    assert (code, out.strip()) == (0, "no devices registered")

    code, out, _ = admin(capsys, "--server", target, "publish", str(digits_bundle), "--json", str(tmp_path / "p.json"))
    published = json.loads((tmp_path / "p.json").read_text())
    files = [p for p in digits_bundle.rglob("*") if p.is_file()]
    assert code == 0 and published["bundle_id"] in out
    assert published["files"] == len(files) and published["bytes"] == sum(p.stat().st_size for p in files)

    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    upload_samples(server.port, published["bundle_id"], digits_arrays[2][:24],
                   manifest["source_statistics"]["features"]["dim"])
    code, out, _ = admin(capsys, "devices", "--server", target, "--json", str(tmp_path / "d.json"))
    (row,) = json.loads((tmp_path / "d.json").read_text())["devices"]
    assert code == 0
    assert (row["device_id"], row["cohort"], row["samples_stored"], row["labels"]) == ("cam-1", "default", 24,
                                                                                      {"site": "north"})
    line = next(x for x in out.splitlines() if x.startswith("cam-1"))
    assert line.split()[:4] == ["cam-1", "default", "0s", "ago"] and "site=north" in line and "24" in line.split()

    code, out, _ = admin(capsys, "round", "start", "distill", "--steps", "4", "--max-samples", "16", "--wait",
                         "--server", target, "--json", str(tmp_path / "r.json"))
    done = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, out
    assert (done["state"], done["kind"], done["update_version"], done["samples_used"]) == ("done", "distill", 1, 16)
    assert done["metrics"]["steps"] == 4
    assert f"round {done['round_id']} (distill): done" in out and "update version 1, 16 samples" in out

    code, out, _ = admin(capsys, "--server", target, "round", "status", str(done["round_id"]))
    assert code == 0 and out.startswith(f"round {done['round_id']} (distill): done")
    # the rest of the samples, for another cohort; followed afterwards with `round status --wait`
    code, out, _ = admin(capsys, "--server", target, "round", "start", "distill", "--cohort", "north")
    assert code == 0 and out.strip() == f"round {done['round_id'] + 1} (distill) queued"
    code, out, _ = admin(capsys, "--server", target, "round", "status", str(done["round_id"] + 1), "--wait")
    assert code == 0 and "done" in out.splitlines()[0] and "8 samples" in out
    north = server.state.storage.latest_update(published["bundle_id"], "north")
    assert north is not None and north.version == 1  # the cohort's own version sequence
    assert server.state.storage.latest_update(published["bundle_id"]).version == 1  # default cohort: round 1 only


def test_a_failed_round_exits_1_with_the_servers_reason(
    server: EdgeloopServer, digits_bundle: Path, digits_arrays: tuple[np.ndarray, ...], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = f"127.0.0.1:{server.port}"
    code, out, _ = admin(capsys, "publish", str(digits_bundle), "--server", target)
    bundle_id = out.split()[-1]
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    upload_samples(server.port, bundle_id, digits_arrays[2][:8], manifest["source_statistics"]["features"]["dim"])
    (tmp_path / "teacher.pt").write_bytes(b"not a checkpoint")  # the distiller loads it at the first round
    code, out, _ = admin(capsys, "round", "start", "distill", "--wait", "--server", target)
    assert code == 1
    assert "(distill): failed" in out and "error:" in out
    round_id = out.split()[1]
    code, again, _ = admin(capsys, "round", "status", round_id, "--server", target)
    assert code == 1 and "failed" in again


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("argv", "message"), [
    (["devices"], "--server HOST:PORT is required"),
    (["devices", "--server", "127.0.0.1:1", "--timeout", "0"], "--timeout must be a positive number, got 0.0"),
    (["devices", "--server", "127.0.0.1:1", "--timeout", "nan"], "--timeout must be a positive number, got nan"),
    (["round", "start", "distill", "--steps", "-1", "--server", "127.0.0.1:1"], "--steps must be an integer in"),
    (["round", "start", "fedavg", "--max-samples", "3000000000", "--server", "127.0.0.1:1"],
     "--max-samples must be an integer in"),
    (["round", "status", "0", "--server", "127.0.0.1:1"], "round_id must be a positive integer, got 0"),
    (["round", "status", "3", "--wait", "--wait-timeout", "-5", "--server", "127.0.0.1:1"],
     "--wait-timeout must be a positive number"),
])
def test_bad_arguments_are_named_before_anything_is_sent(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = admin(capsys, *argv)
    assert (code, out) == (2, "")
    assert message in err and "Traceback" not in err


def test_unusable_inputs_and_servers_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = admin(capsys, "publish", str(tmp_path), "--server", "127.0.0.1:1")
    assert code == 2 and f"{tmp_path} is not a bundle" in err
    (tmp_path / "empty").write_text("\n")
    code, _, err = admin(capsys, "devices", "--server", "127.0.0.1:1", "--admin-token-file", str(tmp_path / "empty"))
    assert code == 2 and "is empty" in err
    code, _, err = admin(capsys, "devices", "--server", "127.0.0.1:1", "--admin-token-file", str(tmp_path / "nope"))
    assert code == 2 and "cannot read --admin-token-file" in err
    port = _closed_port()
    code, _, err = admin(capsys, "devices", "--server", f"127.0.0.1:{port}", "--timeout", "5")
    assert code == 2 and f"cannot reach the server at 127.0.0.1:{port} (UNAVAILABLE)" in err
    assert len(err.strip().splitlines()) == 1


def test_the_admin_token_and_server_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=4, grace_seconds=1,
                       enrollment_secret=ENROLL, admin_token=ADMIN_TOKEN)
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "wrong.token").write_text("wrong-token-of-some-length\n")
    with create_server(cfg) as srv:
        target = f"127.0.0.1:{srv.port}"
        code, _, err = admin(capsys, "devices", "--server", target)
        assert code == 2 and "refused the admin credential (UNAUTHENTICATED)" in err and "--admin-token-file" in err
        code, _, err = admin(capsys, "devices", "--server", target, "--admin-token-file", str(tmp_path / "wrong.token"))
        assert code == 2 and "(UNAUTHENTICATED)" in err
        token = ["--admin-token-file", str(tmp_path / "admin.token")]
        code, out, _ = admin(capsys, "devices", "--server", target, *token)
        assert (code, out.strip()) == (0, "no devices registered")
        code, _, err = admin(capsys, "round", "status", "7", "--server", target, *token)
        assert code == 2 and "refused the call (NOT_FOUND): unknown round 7" in err
        code, _, err = admin(capsys, "round", "start", "distill", "--server", target, *token)
        assert code == 2 and "(FAILED_PRECONDITION)" in err
        code, _, err = admin(capsys, "round", "start", "distill", "--steps", "20000", "--server", target, *token)
        assert code == 2 and "(INVALID_ARGUMENT)" in err and "max_distill_steps" in err
