"""Security of a real server on 127.0.0.1:0: TLS and mutual TLS, enrollment and device tokens, the admin
credential, per-device rate limits, reflection and health without tokens; every rejection stores nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from device_agents.channel import TlsOptions, open_channel
from device_agents.client import DeviceClient
from device_agents.errors import TransportError
from edgeloop.admin import AdminClient
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import ADMIN_SERVICE, DEVICE_SERVICE, EdgeloopServer, ServerConfig, create_server
from server.auth import token_digest
from server.errors import RateLimitedError
from server.ratelimit import RateLimiter
from tests.server.certs import TestCA
from tests.server.server_testkit import (
    RPC_TIMEOUT,
    FakeDistiller,
    bundle_chunks,
    make_bundle_files,
    rpc_error,
    sample_msg,
)

Device = device_pb2_grpc.DeviceServiceStub
Admin = admin_pb2_grpc.AdminServiceStub
ENROLL = "enroll-secret-0123456789"
ADMIN = "admin-token-0123456789abcdef"


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _blob_count(srv: EdgeloopServer) -> int:
    return sum(1 for p in srv.blobs.root.rglob("*") if p.is_file())


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[EdgeloopServer]:
    """A server with device tokens and an admin token (plaintext, loopback), a bundle published."""
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, grace_seconds=1,
                       enrollment_secret=ENROLL, admin_token=ADMIN)
    with create_server(cfg, FakeDistiller()) as srv:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            admin_pb2_grpc.AdminServiceStub(ch).PublishBundle(bundle_chunks(make_bundle_files()),
                                                              metadata=_bearer(ADMIN), timeout=RPC_TIMEOUT)
        yield srv


@pytest.fixture
def stubs(secured: EdgeloopServer) -> Iterator[tuple[Device, Admin]]:
    """Device and admin stubs on a plaintext channel to ``secured`` (no credentials attached)."""
    with grpc.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        yield device_pb2_grpc.DeviceServiceStub(ch), admin_pb2_grpc.AdminServiceStub(ch)


def _enroll(device: device_pb2_grpc.DeviceServiceStub, device_id: str, secret: str = ENROLL) -> str:
    resp = device.Enroll(device_pb2.EnrollRequest(device_id=device_id, enrollment_secret=secret), timeout=RPC_TIMEOUT)
    assert resp.device_id == device_id and resp.device_token
    return resp.device_token


def test_device_calls_need_the_token_of_the_device_they_name(secured: EdgeloopServer, stubs) -> None:  # type: ignore[no-untyped-def]
    device, _ = stubs
    register = device_pb2.RegisterRequest(device_id="cam-1")
    code, msg = rpc_error(lambda: device.Register(register, timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Enroll" in msg
    code, _ = rpc_error(lambda: device.Register(register, metadata=_bearer("eld_forged"), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, msg = rpc_error(lambda: _enroll(device, "cam-1", secret="wrong-secret-0123456789"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "enrollment secret" in msg

    token = _enroll(device, "cam-1")
    assert device.Register(register, metadata=_bearer(token), timeout=RPC_TIMEOUT).bundle_id
    other = device_pb2.RegisterRequest(device_id="cam-2")
    code, msg = rpc_error(lambda: device.Register(other, metadata=_bearer(token), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "cam-1" in msg and "cam-2" in msg
    code, _ = rpc_error(lambda: device.Register(register, metadata=_bearer(ADMIN), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.PERMISSION_DENIED  # the admin credential is not a device
    assert secured.registry.get_device("cam-2") is None


def test_reenrolling_revokes_the_old_token_and_tokens_survive_a_restart(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path, port=0, max_workers=4, grace_seconds=1, enrollment_secret=ENROLL,
                       admin_token=ADMIN)
    register = device_pb2.RegisterRequest(device_id="cam-1")
    with create_server(cfg, FakeDistiller()) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        device = device_pb2_grpc.DeviceServiceStub(ch)
        old = _enroll(device, "cam-1")
        new = _enroll(device, "cam-1")
        code, _ = rpc_error(lambda: device.Register(register, metadata=_bearer(old), timeout=RPC_TIMEOUT))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        device.Register(register, metadata=_bearer(new), timeout=RPC_TIMEOUT)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("auth.sqlite3*"))
    assert new.encode() not in stored and old.encode() not in stored  # only hashes are kept
    assert token_digest(new).encode() in stored
    with create_server(cfg, FakeDistiller()) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        device_pb2_grpc.DeviceServiceStub(ch).Register(register, metadata=_bearer(new), timeout=RPC_TIMEOUT)


def test_admin_service_needs_the_admin_token(stubs) -> None:  # type: ignore[no-untyped-def]
    device, admin = stubs
    request = admin_pb2.ListDevicesRequest()
    code, _ = rpc_error(lambda: admin.ListDevices(request, timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = rpc_error(lambda: admin.ListDevices(request, metadata=_bearer("not-the-admin-token"),
                                                  timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    token = _enroll(device, "cam-1")
    code, _ = rpc_error(lambda: admin.ListDevices(request, metadata=_bearer(token), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = rpc_error(lambda: admin.PublishBundle(bundle_chunks(make_bundle_files("other")), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert admin.ListDevices(request, metadata=_bearer(ADMIN), timeout=RPC_TIMEOUT).devices == []


def test_rejected_uploads_store_nothing(secured: EdgeloopServer, stubs) -> None:  # type: ignore[no-untyped-def]
    device, _ = stubs
    bundle_id = secured.registry.current_bundle().bundle_id  # type: ignore[union-attr]
    token = _enroll(device, "cam-1")
    device.Register(device_pb2.RegisterRequest(device_id="cam-1"), metadata=_bearer(token), timeout=RPC_TIMEOUT)
    before = _blob_count(secured)
    mine = [sample_msg(f"s{i}", bundle_id, device_id="cam-1", seed=i) for i in range(3)]
    foreign = [*mine[:2], sample_msg("x", bundle_id, device_id="cam-2")]  # the last message names another device
    code, _ = rpc_error(lambda: device.UploadSamples(iter(mine), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = rpc_error(lambda: device.UploadSamples(iter(foreign), metadata=_bearer(token), timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert _blob_count(secured) == before
    assert all(secured.registry.get_sample(s) is None for s in ("s0", "s1", "s2", "x"))
    ack = device.UploadSamples(iter(mine), metadata=_bearer(token), timeout=RPC_TIMEOUT)
    assert list(ack.stored_ids) == ["s0", "s1", "s2"]


def test_enroll_without_a_configured_secret_is_failed_precondition(channel: grpc.Channel) -> None:
    device = device_pb2_grpc.DeviceServiceStub(channel)
    code, _ = rpc_error(lambda: _enroll(device, "cam-1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_per_device_rate_limit_is_resource_exhausted_and_stores_nothing(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path, port=0, max_workers=4, grace_seconds=1, rate_limit_per_second=0.01,
                       rate_limit_burst=3)
    with create_server(cfg, FakeDistiller()) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        bundle_id = admin_pb2_grpc.AdminServiceStub(ch).PublishBundle(bundle_chunks(make_bundle_files()),
                                                                      timeout=RPC_TIMEOUT).bundle_id
        device = device_pb2_grpc.DeviceServiceStub(ch)
        for _ in range(2):
            device.Register(device_pb2.RegisterRequest(device_id="cam-1"), timeout=RPC_TIMEOUT)
        device.UploadSamples(iter([sample_msg("a", bundle_id, device_id="cam-1")]), timeout=RPC_TIMEOUT)
        code, msg = rpc_error(lambda: device.UploadSamples(iter([sample_msg("b", bundle_id, device_id="cam-1")]),
                                                      timeout=RPC_TIMEOUT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cam-1" in msg and "retry in" in msg
        assert srv.registry.get_sample("b") is None and srv.registry.get_sample("a") is not None
        device.Register(device_pb2.RegisterRequest(device_id="cam-2"), timeout=RPC_TIMEOUT)  # its own bucket


def test_rate_limiter_refills_and_forgets_idle_buckets() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0], max_keys=2)
    limiter.acquire("a")
    limiter.acquire("a")
    with pytest.raises(RateLimitedError, match=r"retry in 0\.50 s"):
        limiter.acquire("a")
    now[0] = 0.5  # one token back
    limiter.acquire("a")
    now[0] = 10.0
    for key in ("b", "c", "d"):
        limiter.acquire(key)
    assert len(limiter) <= 2


def test_health_and_reflection_need_no_token(secured: EdgeloopServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=DEVICE_SERVICE),
                                                      timeout=RPC_TIMEOUT)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=RPC_TIMEOUT)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {DEVICE_SERVICE, ADMIN_SERVICE, "grpc.health.v1.Health"} <= names


# -- TLS --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A CA with a server and a client certificate, and a rogue CA with its own client certificate."""
    root = tmp_path_factory.mktemp("pki")
    ca, rogue = TestCA(root / "ca"), TestCA(root / "rogue", name="rogue CA")
    return {"ca": ca, "server": ca.issue("localhost", server=True), "client": ca.issue("cam-1", server=False),
            "rogue_client": rogue.issue("intruder", server=False)}


def _tls_server(tmp_path: Path, pki: dict[str, object], mutual: bool) -> EdgeloopServer:
    server, ca = pki["server"], pki["ca"]
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=4, grace_seconds=1,
                       tls_cert=server.cert, tls_key=server.key,  # type: ignore[attr-defined]
                       tls_client_ca=ca.pem if mutual else None,  # type: ignore[attr-defined]
                       enrollment_secret=ENROLL, admin_token=ADMIN)
    return create_server(cfg, FakeDistiller())


def test_tls_server_with_tokens(tmp_path: Path, pki: dict[str, object]) -> None:
    tls = TlsOptions(root_ca=pki["ca"].pem, server_name="localhost")  # type: ignore[attr-defined]
    with _tls_server(tmp_path, pki, mutual=False) as srv:
        target = f"127.0.0.1:{srv.port}"
        with AdminClient(target, admin_token=ADMIN, tls=tls) as admin:
            assert admin.list_devices() == []
        with DeviceClient(target, "cam-1", timeout=5, tls=tls) as client:
            client.enroll(ENROLL)
            assert client.register().bundle_id == ""
        with DeviceClient(target, "cam-1", timeout=2, token=client.token) as plain:
            with pytest.raises(TransportError) as info:
                plain.register()  # plaintext to a TLS port never gets an answer
            assert info.value.code == "UNAVAILABLE"


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tmp_path: Path, pki: dict[str, object]) -> None:
    ca, client, rogue = pki["ca"], pki["client"], pki["rogue_client"]
    with _tls_server(tmp_path, pki, mutual=True) as srv:
        target = f"127.0.0.1:{srv.port}"
        good = TlsOptions(root_ca=ca.pem, client_cert=client.cert, client_key=client.key)  # type: ignore[attr-defined]
        with DeviceClient(target, "cam-1", timeout=5, tls=good) as c:
            c.enroll(ENROLL)
            c.register()
        for tls in (TlsOptions(root_ca=ca.pem),  # type: ignore[attr-defined]
                    TlsOptions(root_ca=ca.pem, client_cert=rogue.cert, client_key=rogue.key)):  # type: ignore[attr-defined]
            with open_channel(target, (), tls) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                code, _ = rpc_error(lambda h=health: h.Check(health_pb2.HealthCheckRequest(), timeout=2))
                assert code == grpc.StatusCode.UNAVAILABLE
        assert srv.registry.list_devices()[0].device_id == "cam-1"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"host": "0.0.0.0"}, "insecure"),
        ({"host": "0.0.0.0", "enrollment_secret": ENROLL, "admin_token": ADMIN}, "no TLS"),
        ({"enrollment_secret": ENROLL}, "admin_token"),
        ({"enrollment_secret": "short", "admin_token": ADMIN}, "at least 16"),
        ({"enrollment_secret": ENROLL, "admin_token": ENROLL}, "differ"),
        ({"tls_cert": "a.crt"}, "tls_key"),
        ({"tls_client_ca": "ca.crt"}, "tls_cert"),
        ({"rate_limit_per_second": -1.0}, "rate_limit"),
        ({"metrics_port": 70000}, "metrics_port"),
    ],
)
def test_config_refuses_unsafe_settings(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ServerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_allows_exposure_when_secured_or_explicitly_insecure() -> None:
    ServerConfig(host="0.0.0.0", insecure=True)
    cfg = ServerConfig(host="0.0.0.0", tls_cert="s.crt", tls_key="s.key", enrollment_secret=ENROLL,
                       admin_token=ADMIN)
    assert cfg.tls and cfg.auth and ENROLL not in repr(cfg) and ADMIN not in repr(cfg)


def test_agent_enrolls_once_over_mutual_tls_and_reuses_its_token(tmp_path: Path, pki: dict[str, object],
                                                                 digits_bundle: Path) -> None:
    from edgeloop.pipeline import close_agent, connect_agent

    ca, client = pki["ca"], pki["client"]
    tls = TlsOptions(root_ca=ca.pem, client_cert=client.cert, client_key=client.key)  # type: ignore[attr-defined]
    with _tls_server(tmp_path, pki, mutual=True) as srv:
        target = f"127.0.0.1:{srv.port}"
        with AdminClient(target, admin_token=ADMIN, tls=tls) as admin:
            admin.publish_bundle(digits_bundle)
        work = tmp_path / "cam-1"
        close_agent(connect_agent(target, "cam-1", work, enrollment_secret=ENROLL, tls=tls))
        token = (work / "device.token").read_text()
        assert (work / "device.token").stat().st_mode & 0o077 == 0
        close_agent(connect_agent(target, "cam-1", work, enrollment_secret=ENROLL, tls=tls))
        assert (work / "device.token").read_text() == token  # enrolled once, the token is reused
        assert srv.authenticator is not None and srv.authenticator.device_for(token) == "cam-1"
        (work / "device.token").write_text("")  # what a kill during Enroll used to leave: the device enrolls again
        close_agent(connect_agent(target, "cam-1", work, enrollment_secret=ENROLL, tls=tls))
        renewed = (work / "device.token").read_text()
        assert renewed and srv.authenticator.device_for(renewed) == "cam-1"
        assert (work / "device.token").stat().st_mode & 0o077 == 0 and not list(work.glob(".*.tmp"))
