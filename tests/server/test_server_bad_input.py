"""Bad input found by an audit: each gets a clear error naming the problem, and nothing accepted is lost."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from edgeloop.cli import main as cli_main
from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc
from server.app import EdgeloopServer, ServerConfig, create_server
from server.errors import StorageError
from server.updates import MAX_NUM_SAMPLES
from tests.server.server_testkit import RPC_TIMEOUT, initial_params, rpc_error, sample_msg, wait_round

Stub = device_pb2_grpc.DeviceServiceStub
Admin = admin_pb2_grpc.AdminServiceStub


def test_a_tensor_shape_whose_element_count_overflows_int64_is_invalid_argument(
        device: Stub, published: Callable[..., str], running: EdgeloopServer) -> None:
    bundle_id = published()  # 2**31 cubed wraps to 0 in an int64 product: it used to pass the size check, then fail
    huge = common_pb2.Tensor(name="input", dtype=common_pb2.DTYPE_FLOAT32, shape=[2**31] * 3, data=b"")
    sample = device_pb2.Sample(device_id="dev-1", sample_id="huge", bundle_id=bundle_id, input=huge)
    code, details = rpc_error(lambda: device.UploadSamples(iter([sample]), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'input'" in details and "limit" in details
    assert running.registry.get_sample("huge") is None
    wide = common_pb2.Tensor(name="bn1.weight", dtype=common_pb2.DTYPE_FLOAT32, shape=[2**32, 2**32], data=b"")
    code, details = rpc_error(lambda: device.SubmitUpdate(device_pb2.FederatedUpdate(
        device_id="dev-1", bundle_id=bundle_id, num_samples=1, tensors=[wide]), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'bn1.weight'" in details


def test_num_samples_beyond_the_limit_is_refused_so_rounds_can_record_their_totals(
        device: Stub, admin: Admin, published: Callable[..., str], running: EdgeloopServer) -> None:
    bundle_id = published()  # two submissions of 2**63-1 used to overflow the round's sample total in SQLite:
    params = tensors_to_proto(initial_params())  # the round stayed "running" after publishing its update

    def submit(device_id: str, n: int) -> object:
        device.Register(device_pb2.RegisterRequest(device_id=device_id), timeout=RPC_TIMEOUT)
        return device.SubmitUpdate(device_pb2.FederatedUpdate(device_id=device_id, bundle_id=bundle_id,
                                                              num_samples=n, tensors=params), timeout=RPC_TIMEOUT)

    code, details = rpc_error(lambda: submit("big", 2**63 - 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "num_samples" in details
    submit("a", MAX_NUM_SAMPLES)
    submit("b", MAX_NUM_SAMPLES)
    round_id = admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT).round_id
    status = wait_round(admin, round_id)
    assert (status.state, status.samples_used) == ("done", 2 * MAX_NUM_SAMPLES), status.error
    assert running.registry.unused_submissions(bundle_id) == []


def test_a_sample_id_stored_for_another_device_is_refused_not_acknowledged_as_a_duplicate(
        device: Stub, published: Callable[..., str], running: EdgeloopServer) -> None:
    bundle_id = published()
    device.Register(device_pb2.RegisterRequest(device_id="dev-2"), timeout=RPC_TIMEOUT)
    device.UploadSamples(iter([sample_msg("s1", bundle_id, device_id="dev-1")]), timeout=RPC_TIMEOUT)
    batch = [sample_msg("fresh", bundle_id, device_id="dev-2"), sample_msg("s1", bundle_id, device_id="dev-2")]
    code, details = rpc_error(lambda: device.UploadSamples(iter(batch), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'s1'" in details and "another device" in details
    assert running.registry.get_sample("fresh") is None  # the upload is refused whole
    assert running.registry.get_sample("s1").device_id == "dev-1"  # type: ignore[union-attr]
    retry = device.UploadSamples(iter([sample_msg("s1", bundle_id, device_id="dev-1")]), timeout=RPC_TIMEOUT)
    assert list(retry.duplicate_ids) == ["s1"]  # the owner's retry is still an idempotent duplicate


def test_oversized_optional_fields_of_reports_are_refused(device: Stub, published: Callable[..., str]) -> None:
    published()
    code, details = rpc_error(lambda: device.ReportDrift(device_pb2.DriftReport(
        device_id="dev-1", detector="page_hinkley", signal="x" * 100_000), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "signal" in details
    for field in ("bundle_id", "cohort"):
        report = device_pb2.RollbackReport(device_id="dev-1", version=2, restored_version=1, **{field: "y" * 100_000})
        code, details = rpc_error(lambda r=report: device.ReportRollback(r, timeout=RPC_TIMEOUT))  # type: ignore[misc]
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details
    assert device.ReportDrift(device_pb2.DriftReport(device_id="dev-1", detector="adwin", signal="entropy"),
                              timeout=RPC_TIMEOUT).event_id > 0


@pytest.mark.parametrize(("name", "options", "key"), [
    ("fedbuff", {"buffer_size": 4.5}, "buffer_size"),  # used to be accepted and never fill
    ("fedbuff", {"buffer_size": True}, "buffer_size"),
    ("krum", {"byzantine": 1.5}, "byzantine"),  # used to fail every round with a TypeError
    ("fedau", {"num_devices": 2.5}, "num_devices"),
    ("dp_fedavg", {"seed": 1.5}, "seed"),  # used to raise numpy's TypeError, naming nothing
    ("dp_fedavg", {"seed": -1}, "seed"),
    ("trimmed_mean", {"beta": "0.1"}, "beta"),
])
def test_aggregator_options_of_the_wrong_type_are_refused_at_start_up_naming_them(
        tmp_path: Path, name: str, options: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=f"{name}.*{key}|{key}.*{name}|dp {key}"):
        ServerConfig(data_dir=tmp_path, aggregator=name, aggregator_options=options)
    ServerConfig(data_dir=tmp_path, aggregator="fedbuff", aggregator_options={"buffer_size": 3, "server_lr": 1})


@pytest.mark.parametrize(("settings", "key"), [
    ({"grace_seconds": math.nan}, "grace_seconds"),
    ({"online_window_seconds": math.nan}, "online_window_seconds"),
    ({"rate_limit_per_second": math.nan}, "rate_limit_per_second"),  # NaN used to turn the limiter off silently
    ({"rate_limit_per_second": math.inf}, "rate_limit_per_second"),  # used to be a bare OverflowError
    ({"max_message_bytes": 2**31}, "max_message_bytes"),  # used to fail in start() with a bare OverflowError
    ({"device": "cuda:x"}, "device"),
])
def test_non_finite_or_out_of_range_settings_are_refused_naming_them(
        tmp_path: Path, settings: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ServerConfig(data_dir=tmp_path, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("store", ["registry.sqlite3", "auth.sqlite3"])
def test_a_corrupt_sqlite_store_stops_start_up_with_an_error_naming_the_file(
        tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / store).write_bytes(b"not a database, whatever it once was " * 200)
    secrets = {"enrollment_secret": "enroll-secret-0123456789", "admin_token": "admin-token-0123456789"}
    config = ServerConfig(data_dir=data, port=0, max_workers=4, **secrets)
    with pytest.raises(StorageError, match=f"{store}.*not a usable SQLite database"):
        create_server(config)
    if store == "registry.sqlite3":  # the command line prints it as an error, not a traceback
        assert cli_main(["serve", "--data-dir", str(data), "--port", "0"]) == 2
        assert f"edgeloop serve: error: {data / store}" in capsys.readouterr().err
    assert (data / store).read_bytes().startswith(b"not a database")  # left as it was, for the operator


def test_an_error_echoing_a_huge_request_field_still_reaches_the_client_with_its_code(
        device: Stub, published: Callable[..., str]) -> None:
    published()  # a 100 KB status message used to exceed the client's metadata limit: RESOURCE_EXHAUSTED, no text
    huge = "z" * 100_000
    code, details = rpc_error(lambda: list(device.FetchBundle(device_pb2.FetchBundleRequest(
        device_id="dev-1", bundle_id=huge), timeout=RPC_TIMEOUT)))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("unknown bundle 'zzz") and len(details) < 3000
    code, details = rpc_error(lambda: device.Register(device_pb2.RegisterRequest(device_id=huge), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "device_id" in details and "100000 characters" in details


def test_a_deeply_nested_manifest_is_an_invalid_bundle_not_a_recursion_error() -> None:
    from server.errors import InvalidBundleError
    from server.manifest import parse_manifest

    with pytest.raises(InvalidBundleError, match="not valid UTF-8 JSON"):
        parse_manifest(b"[" * 100_000 + b"]" * 100_000)
