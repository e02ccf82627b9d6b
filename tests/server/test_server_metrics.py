"""Prometheus metrics of a real server, scraped over HTTP: RPCs by code, uploads, devices, rounds, versions."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import ServerConfig, create_server
from tests.server.server_testkit import (
    RPC_TIMEOUT,
    FakeDistiller,
    bundle_chunks,
    initial_params,
    make_bundle_files,
    sample_msg,
    wait_round,
)

pytest.importorskip("prometheus_client")


def _scrape(port: int) -> dict[str, float]:
    """``name{labels}`` → value for every sample line of ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        found = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if found:
            out[found.group(1)] = float(found.group(2))
    return out


def test_metrics_count_rpcs_uploads_devices_rounds_and_versions(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path, port=0, max_workers=4, grace_seconds=1, metrics_port=0)
    with create_server(cfg, FakeDistiller()) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        assert srv.metrics is not None and srv.metrics.port > 0
        admin, device = admin_pb2_grpc.AdminServiceStub(ch), device_pb2_grpc.DeviceServiceStub(ch)
        bundle_id = admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id
        device.Register(device_pb2.RegisterRequest(device_id="cam-1"), timeout=RPC_TIMEOUT)
        msgs = [sample_msg(f"s{i}", bundle_id, device_id="cam-1", seed=i) for i in range(3)]
        device.UploadSamples(iter(msgs), timeout=RPC_TIMEOUT)
        device.UploadSamples(iter(msgs[:1]), timeout=RPC_TIMEOUT)  # a retried sample: a duplicate
        with pytest.raises(grpc.RpcError):
            device.ReportDrift(device_pb2.DriftReport(device_id="ghost", detector="ph"), timeout=RPC_TIMEOUT)
        device.SubmitUpdate(device_pb2.FederatedUpdate(
            device_id="cam-1", bundle_id=bundle_id, num_samples=3,
            tensors=tensors_to_proto({k: v + np.float32(1) for k, v in initial_params().items()})), timeout=RPC_TIMEOUT)
        round_id = admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT).round_id
        assert wait_round(admin, round_id).state == "done"
        m = _scrape(srv.metrics.port)

    dev = 'service="edgeloop.v1.DeviceService"'
    assert m[f'edgeloop_rpc_requests_total{{code="OK",method="Register",{dev}}}'] == 1
    assert m[f'edgeloop_rpc_requests_total{{code="OK",method="UploadSamples",{dev}}}'] == 2
    assert m[f'edgeloop_rpc_requests_total{{code="FAILED_PRECONDITION",method="ReportDrift",{dev}}}'] == 1
    assert m[f'edgeloop_rpc_latency_seconds_count{{method="UploadSamples",{dev}}}'] == 2
    assert m['edgeloop_uploaded_samples_total{outcome="stored"}'] == 3
    assert m['edgeloop_uploaded_samples_total{outcome="duplicate"}'] == 1
    assert m["edgeloop_upload_bytes_total"] == sum(x.ByteSize() for x in msgs) + msgs[0].ByteSize()
    assert m["edgeloop_devices_registered"] == 1 and m["edgeloop_devices_online"] == 1
    assert m['edgeloop_rounds_total{kind="fedavg",state="queued"}'] == 1
    assert m['edgeloop_rounds_total{kind="fedavg",state="done"}'] == 1
    assert m['edgeloop_round_seconds_count{kind="fedavg"}'] == 1
    assert m["edgeloop_update_version"] == 1


def test_metrics_record_guard_rejections(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path, port=0, max_workers=4, grace_seconds=1, metrics_port=0,
                       enrollment_secret="enroll-secret-0123456789", admin_token="admin-token-0123456789")
    with create_server(cfg, FakeDistiller()) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        with pytest.raises(grpc.RpcError):
            device_pb2_grpc.DeviceServiceStub(ch).Register(device_pb2.RegisterRequest(device_id="x"), timeout=5)
        with pytest.raises(grpc.RpcError):
            admin_pb2_grpc.AdminServiceStub(ch).ListDevices(admin_pb2.ListDevicesRequest(), timeout=5)
        assert srv.metrics is not None
        m = _scrape(srv.metrics.port)
    assert m['edgeloop_rpc_requests_total{code="UNAUTHENTICATED",method="Register",'
             'service="edgeloop.v1.DeviceService"}'] == 1
    assert m['edgeloop_rpc_requests_total{code="UNAUTHENTICATED",method="ListDevices",'
             'service="edgeloop.v1.AdminService"}'] == 1
    assert m["edgeloop_devices_online"] == 0
