"""Hypothesis sends malformed, random and oversized messages to every RPC of both services of a real server;
each gets a deliberate status code (never UNKNOWN or INTERNAL), and the server keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.edgeloop.v1 import admin_pb2, common_pb2, device_pb2, device_pb2_grpc
from server.app import EdgeloopServer, ServerConfig, create_server
from tests.server.server_testkit import RPC_TIMEOUT, FakeDistiller, bundle_chunks, make_bundle_files, sample_msg

F = pb_descriptor.FieldDescriptor
MAX_MESSAGE = 256 << 10
DEVICE = "fuzz-dev"
ENROLL, ADMIN = "enroll-secret-0123456789", "admin-token-0123456789"
# Every answer must be a decision; UNKNOWN / INTERNAL would mean an exception nobody mapped.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.PERMISSION_DENIED}


@dataclass(frozen=True)
class Rpc:
    """One method of one service, with what the wire needs to call it with raw bytes."""

    path: str
    request: type
    request_streaming: bool
    response_streaming: bool


RPCS = [
    Rpc(f"/{svc.full_name}/{m.name}", message_factory.GetMessageClass(m.input_type), m.client_streaming,
        m.server_streaming)
    for svc in (device_pb2.DESCRIPTOR.services_by_name["DeviceService"],
                admin_pb2.DESCRIPTOR.services_by_name["AdminService"])
    for m in svc.methods
]
_INT_RANGES = {F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_INT64: (-(2**63), 2**63 - 1),
               F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_ENUM: (-3, 9)}
_IDS = st.sampled_from([DEVICE, "", "ghost", "a" * 200, "f" * 64, "manifest.json", "../x", "distill", "fedavg"])


@st.composite
def tensors(draw: st.DrawFn) -> common_pb2.Tensor:
    """Tensors near the valid ones: odd dtypes, shapes (negative, huge, empty) and data (NaN, wrong size)."""
    dtype = draw(st.integers(0, 8))
    shape = draw(st.lists(st.one_of(st.integers(0, 9), st.integers(-2, 2**40)), max_size=4))
    n = int(np.prod([max(d, 0) for d in shape], dtype=np.float64)) if shape else 1
    size = n * 4 if n < 4096 else 0
    data = draw(st.one_of(st.binary(max_size=64), st.just(np.full(size // 4, np.nan, np.float32).tobytes()),
                          st.binary(min_size=size, max_size=size)))
    return common_pb2.Tensor(name=draw(st.sampled_from(["input", "features", "bn1.weight", ""])), dtype=dtype,
                             shape=shape, data=data)


def _value(draw: st.DrawFn, field: pb_descriptor.FieldDescriptor, depth: int) -> object:
    t = field.type
    if t == F.TYPE_STRING:
        return draw(st.one_of(_IDS, st.text(max_size=24)))
    if t == F.TYPE_BYTES:
        return draw(st.binary(max_size=96))
    if t == F.TYPE_BOOL:
        return draw(st.booleans())
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return draw(st.floats(width=32 if t == F.TYPE_FLOAT else 64))
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        return draw(st.one_of(st.integers(-1, 3), st.integers(lo, hi)))
    if field.message_type.full_name == "edgeloop.v1.Tensor":
        return draw(tensors())
    return draw(messages(field.message_type, depth + 1))


@st.composite
def messages(draw: st.DrawFn, desc: pb_descriptor.Descriptor, depth: int = 0) -> object:
    """A message of type ``desc`` with a random subset of its fields set to random, often hostile values."""
    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        if depth > 2 or not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                getattr(msg, field.name)[_value(draw, key, depth)] = _value(draw, value, depth)
        elif field.is_repeated:
            for _ in range(draw(st.integers(0, 3))):
                item = _value(draw, field, depth)
                container = getattr(msg, field.name)
                container.add().CopyFrom(item) if field.message_type is not None else container.append(item)
        elif field.message_type is not None:
            getattr(msg, field.name).CopyFrom(_value(draw, field, depth))
        else:
            setattr(msg, field.name, _value(draw, field, depth))
    return msg


@st.composite
def payloads(draw: st.DrawFn, rpc: Rpc) -> bytes:
    """Raw request bytes: a random message of the right type, garbage, or a truncated message."""
    good = draw(messages(rpc.request.DESCRIPTOR)).SerializeToString()
    return draw(st.sampled_from([good, good[: len(good) // 2], b"\xff" + good]) | st.binary(max_size=200))


def call_raw(channel: grpc.Channel, rpc: Rpc, frames: list[bytes], metadata: tuple = (),
             timeout: float | None = None) -> grpc.StatusCode:
    """Send raw frames to ``rpc`` and return the status code it ends with (streams are read to the end).

    A valid watch waits for updates until its deadline (default: short for watches), which counts as OK.
    """
    kind = ("stream" if rpc.request_streaming else "unary") + "_" + ("stream" if rpc.response_streaming else "unary")
    method = getattr(channel, kind)(rpc.path)  # no serializers: bytes go out as they are
    request = iter(frames) if rpc.request_streaming else frames[0]
    try:
        watch = rpc.path.endswith("/WatchUpdates")
        result = method(request, timeout=timeout or (0.3 if watch else 5.0), metadata=metadata)
        if rpc.response_streaming:
            for _ in result:
                pass
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and rpc.path.endswith("/WatchUpdates") and timeout is None:
            return grpc.StatusCode.OK
        return code
    return grpc.StatusCode.OK


@pytest.fixture(scope="module", params=["open", "tokens"])
def fuzz_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[EdgeloopServer, grpc.Channel, dict[str, tuple]]]:
    """A server with small message limits (``open``: no tokens; ``tokens``: valid credentials attached)."""
    secured = request.param == "tokens"
    cfg = ServerConfig(data_dir=tmp_path_factory.mktemp("fuzz") / "data", port=0, max_workers=8, max_watchers=4,
                       grace_seconds=1, max_message_bytes=MAX_MESSAGE, chunk_size=16 << 10,
                       max_upload_bytes=64 << 10, max_bundle_bytes=256 << 10,
                       **({"enrollment_secret": ENROLL, "admin_token": ADMIN} if secured else {}))
    with create_server(cfg, FakeDistiller()) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        device = device_pb2_grpc.DeviceServiceStub(ch)
        metadata = {"device": (), "admin": ()}
        if secured:
            token = device.Enroll(device_pb2.EnrollRequest(device_id=DEVICE, enrollment_secret=ENROLL)).device_token
            metadata = {"device": (("authorization", f"Bearer {token}"),),
                        "admin": (("authorization", f"Bearer {ADMIN}"),)}
        admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
        publish = ch.stream_unary(f"/{admin}/PublishBundle", request_serializer=lambda m: m.SerializeToString())
        publish(bundle_chunks(make_bundle_files()), metadata=metadata["admin"], timeout=RPC_TIMEOUT)
        device.Register(device_pb2.RegisterRequest(device_id=DEVICE), metadata=metadata["device"], timeout=RPC_TIMEOUT)
        yield srv, ch, metadata


def _metadata(rpc: Rpc, metadata: dict[str, tuple]) -> tuple:
    return metadata["admin" if "AdminService" in rpc.path else "device"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_every_rpc_answers_hostile_messages_with_a_deliberate_code(fuzz_target, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    _, channel, metadata = fuzz_target
    rpc = data.draw(st.sampled_from(RPCS), label="rpc")
    frames = data.draw(st.lists(payloads(rpc), min_size=1, max_size=3 if rpc.request_streaming else 1),
                       label="frames")
    code = call_raw(channel, rpc, frames, _metadata(rpc, metadata))
    assert code in ALLOWED, f"{rpc.path} answered {code}"


def test_oversized_messages_to_every_rpc_are_resource_exhausted(fuzz_target) -> None:  # type: ignore[no-untyped-def]
    srv, channel, metadata = fuzz_target
    huge = device_pb2.Sample(device_id=DEVICE, sample_id="huge", input=common_pb2.Tensor(data=b"\0" * MAX_MESSAGE))
    frame = huge.SerializeToString()
    codes = {rpc.path: call_raw(channel, rpc, [frame], _metadata(rpc, metadata), timeout=20) for rpc in RPCS}
    assert set(codes.values()) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert srv.registry.get_sample("huge") is None


def test_the_server_still_serves_after_the_fuzzing(fuzz_target) -> None:  # type: ignore[no-untyped-def]
    srv, channel, metadata = fuzz_target
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    device = device_pb2_grpc.DeviceServiceStub(channel)
    bundle_id = device.Register(device_pb2.RegisterRequest(device_id=DEVICE), metadata=metadata["device"],
                                timeout=RPC_TIMEOUT).bundle_id
    ack = device.UploadSamples(iter([sample_msg("after-fuzz", bundle_id, device_id=DEVICE)]),
                               metadata=metadata["device"], timeout=RPC_TIMEOUT)
    assert list(ack.stored_ids) == ["after-fuzz"] or list(ack.duplicate_ids) == ["after-fuzz"]
    assert srv.registry.get_sample("after-fuzz") is not None


def test_rpc_table_covers_both_services() -> None:
    names = {r.path.rsplit("/", 1)[1] for r in RPCS}
    assert {"Enroll", "Register", "UploadSamples", "FetchBundle", "WatchUpdates", "PublishBundle",
            "StartRound"} <= names
    assert Path(__file__).name.startswith("test_")


def test_a_watch_with_an_astronomical_max_wait_waits_instead_of_failing(fuzz_target) -> None:  # type: ignore[no-untyped-def]
    _, channel, metadata = fuzz_target  # found by the fuzzing above: a timed wait of 1e300 s overflowed
    stream = device_pb2_grpc.DeviceServiceStub(channel).WatchUpdates(
        device_pb2.WatchRequest(device_id=DEVICE, since_version=10**6, max_wait_seconds=1e300),
        metadata=metadata["device"], timeout=0.5)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
