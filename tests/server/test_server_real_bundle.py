"""The server with a real exported bundle (tests/conftest.py's digits bundle) and the torch distiller."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from proto.convert import tensor_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc
from runtime.blocks import decode_block
from server.app import ServerConfig, create_server
from tests.server.server_testkit import RPC_TIMEOUT, update_params, wait_round

pytest.importorskip("exporter.bundle")


def _chunks(bundle_dir: Path, size: int = 4096) -> Iterator[common_pb2.BundleChunk]:
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for off in range(0, max(len(data), 1), size):
            yield common_pb2.BundleChunk(path=path.relative_to(bundle_dir).as_posix(), offset=off,
                                         data=data[off : off + size], file_size=len(data))


def test_real_bundle_publish_fetch_and_distill(
    tmp_path: Path, digits_bundle: Path, digits_checkpoint: tuple[Path, str],
    digits_arrays: tuple[np.ndarray, ...],
) -> None:
    manifest_bytes = (digits_bundle / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    ckpt = digits_checkpoint[0]
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, teacher_ckpt=ckpt, student_ckpt=ckpt, device="cpu",
                       distill_steps=5, max_workers=4, grace_seconds=1)
    x_test = digits_arrays[2]
    feature_dim = manifest["source_statistics"]["features"]["dim"]
    with create_server(cfg) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        admin, device = admin_pb2_grpc.AdminServiceStub(ch), device_pb2_grpc.DeviceServiceStub(ch)
        bundle_id = admin.PublishBundle(_chunks(digits_bundle), timeout=RPC_TIMEOUT).bundle_id
        assert bundle_id == hashlib.sha256(manifest_bytes).hexdigest()
        reg = device.Register(device_pb2.RegisterRequest(device_id="cam"), timeout=RPC_TIMEOUT)
        assert sorted(reg.bundle_files) == sorted(["manifest.json", "manifest.sig", *manifest["files"]])
        got: dict[str, bytearray] = {}
        for c in device.FetchBundle(device_pb2.FetchBundleRequest(device_id="cam"), timeout=RPC_TIMEOUT):
            got.setdefault(c.path, bytearray()).extend(c.data)
        for path, data in got.items():
            assert bytes(data) == (digits_bundle / path).read_bytes(), path

        samples = [device_pb2.Sample(
            device_id="cam", sample_id=f"s{i}", bundle_id=bundle_id, entropy=0.5,
            input=tensor_to_proto("input", x_test[i : i + 1]),
            features=tensor_to_proto("features", np.zeros(feature_dim, np.float32))) for i in range(32)]
        assert len(device.UploadSamples(iter(samples), timeout=RPC_TIMEOUT).stored_ids) == 32
        rid = admin.StartRound(admin_pb2.StartRoundRequest(kind="distill"), timeout=RPC_TIMEOUT).round_id
        status = wait_round(admin, rid, timeout=60)
        assert status.state == "done", status.error
        update = next(iter(device.WatchUpdates(device_pb2.WatchRequest(device_id="cam", max_wait_seconds=0.1),
                                               timeout=RPC_TIMEOUT)))
    initial = decode_block((digits_bundle / manifest["adaptable"]["initial"]["file"]).read_bytes())
    params = update_params(update, {k: np.asarray(v, np.float32) for k, v in initial.items()})
    assert sorted(params) == sorted(initial)
    for name, values in initial.items():
        if name.endswith((".mean", ".var")):
            np.testing.assert_array_equal(params[name], np.asarray(values, np.float32))
