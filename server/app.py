"""Wiring: the gRPC server with both services, health checking, reflection, TLS, the guard and metrics
interceptors; start/stop, ``serve``.

``create_server(config)`` builds an :class:`EdgeloopServer`; ``start()`` binds and returns the actual port
(bind port 0 in tests). torch is imported only when a distillation round first needs the distiller.
:class:`ServerConfig` lives in :mod:`server.config` (re-exported here).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType, TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from runtime.signing import load_public_key
from server.auth import Authenticator, SqliteTokenStore
from server.broker import UpdateBroker
from server.config import MESSAGE_OVERHEAD, ServerConfig
from server.interceptors import GuardInterceptor
from server.metrics import ServerMetrics
from server.ratelimit import RateLimiter
from server.rounds import Distiller, RoundRunner
from server.servicers import AdminServicer, DeviceServicer
from server.state import Limits, ServerState
from server.storage import BlobStore, Registry
from server.update_signer import load_or_create_signer

__all__ = ["ADMIN_SERVICE", "DEVICE_SERVICE", "EdgeloopServer", "ServerConfig", "create_server", "serve"]
logger = logging.getLogger(__name__)
DEVICE_SERVICE = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


class EdgeloopServer:
    """The running server: registry, blob store, broker, round runner and the gRPC server around them."""

    def __init__(self, config: ServerConfig, distiller: Distiller | None = None,
                 interceptors: Sequence[grpc.ServerInterceptor] = ()) -> None:
        """Open storage under ``config.data_dir``; ``distiller`` overrides the torch distiller.

        ``interceptors`` run after the metrics and guard interceptors (innermost), e.g. fault injection in tests.
        """
        self.config = config
        self.registry = Registry(config.data_dir / "registry.sqlite3")
        self.blobs = BlobStore(config.data_dir / "blobs")
        limits = Limits(config.max_upload_bytes, config.max_samples_per_upload, config.max_bundle_bytes)
        broker = UpdateBroker(self.registry.latest_version(), max_watchers=config.max_watchers)
        trusted = tuple(load_public_key(p) for p in config.trusted_publisher_keys) or None
        signer = load_or_create_signer(config.update_signing_key, config.data_dir)
        self.state = ServerState(self.registry, self.blobs, broker, limits, trusted_publishers=trusted, signer=signer,
                                 update_encoding=config.update_encoding,
                                 update_topk_fraction=config.update_topk_fraction)
        self.metrics = self._create_metrics()
        factory = self._load_torch_distiller if config.teacher_ckpt is not None else None
        try:  # restores the strategy's saved state: a corrupt one stops start-up (StorageError)
            self.runner = RoundRunner(self.state, distiller=distiller, distiller_factory=factory,
                                      default_steps=config.distill_steps, max_samples=config.round_max_samples,
                                      max_steps=config.max_distill_steps,
                                      on_change=self.metrics.observe_round if self.metrics else None,
                                      aggregator=config.create_aggregator())
        except BaseException:
            self.registry.close()
            raise
        self.authenticator = (Authenticator(SqliteTokenStore(config.data_dir / "auth.sqlite3"),
                                            config.enrollment_secret, config.admin_token) if config.auth else None)
        self.limiter = (RateLimiter(config.rate_limit_per_second, config.rate_limit_burst)
                        if config.rate_limit_per_second > 0 else None)
        self.health = health.HealthServicer()
        self._extra_interceptors = tuple(interceptors)
        self._executor: ThreadPoolExecutor | None = None
        self._server: grpc.Server | None = None
        self._stopped = False
        self.port = 0

    def _create_metrics(self) -> ServerMetrics | None:
        if self.config.metrics_port is None:
            return None
        return ServerMetrics(self.state, self.config.online_window_seconds)

    def _interceptors(self) -> list[grpc.ServerInterceptor]:
        guard = GuardInterceptor(DEVICE_SERVICE, ADMIN_SERVICE, self.authenticator, self.limiter)
        first = [self.metrics.interceptor()] if self.metrics else []
        return [*first, guard, *self._extra_interceptors]

    def _load_torch_distiller(self) -> Distiller:
        from server.distill import TorchDistiller  # torch is imported here, on the first distill round

        cfg = self.config
        if cfg.teacher_ckpt is None or cfg.student_ckpt is None:
            raise ValueError("teacher_ckpt and student_ckpt are not configured")
        return TorchDistiller(cfg.teacher_ckpt, cfg.student_ckpt, cfg.distill_alpha, device=cfg.device)

    def start(self) -> int:
        """Bind ``host:port``, start serving and mark both services SERVING; return the bound port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        cfg = self.config
        options = [("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.max_receive_message_length", cfg.max_message_bytes)]
        self._executor = ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="edgeloop-rpc")
        server = grpc.server(self._executor, options=options, interceptors=self._interceptors())
        max_chunk = cfg.max_message_bytes - MESSAGE_OVERHEAD
        device_pb2_grpc.add_DeviceServiceServicer_to_server(
            DeviceServicer(self.state, cfg.chunk_size, max_chunk, self.authenticator), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.state, self.runner), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            _enable_reflection(server)
        address = f"{cfg.host}:{cfg.port}"
        port = server.add_secure_port(address, _credentials(cfg)) if cfg.tls else server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        server.start()
        if self.metrics is not None and cfg.metrics_port is not None:
            self.metrics.start_http(cfg.metrics_host or cfg.host, cfg.metrics_port)
        for service in ("", DEVICE_SERVICE, ADMIN_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server, self.port = server, port
        logger.info("edgeloop server listening on %s:%d (%s, %s; data in %s)", cfg.host, port,
                    "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls else "plaintext",
                    "device tokens required" if cfg.auth else "no tokens", cfg.data_dir)
        return port

    def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: health NOT_SERVING, wake watchers, let in-flight RPCs and queued rounds finish."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.state.broker.shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self._executor is not None:  # handlers still running after the grace finish before storage closes
            self._executor.shutdown(wait=True)
        if self.metrics is not None:
            self.metrics.stop_http()
        self.runner.shutdown(wait=True)
        self.registry.close()
        if self.authenticator is not None:
            self.authenticator.close()
        logger.info("edgeloop server stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the gRPC server terminates (or ``timeout``); return whether it did."""
        if self._server is None:
            return True
        return bool(self._server.wait_for_termination(timeout))

    def __enter__(self) -> EdgeloopServer:
        """Start if not started; return self."""
        if self._server is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop with the configured grace."""
        self.stop()


def _credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    """TLS server credentials; with ``tls_client_ca``, clients must present a certificate it signed."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise ValueError("TLS needs tls_cert and tls_key")
    ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca is not None else None
    return grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def _enable_reflection(server: grpc.Server) -> None:
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError as exc:
        raise RuntimeError("server reflection needs grpcio-reflection: pip install 'edgeloop[server]', "
                           "or set reflection = false") from exc
    reflection.enable_server_reflection((DEVICE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)


def create_server(config: ServerConfig, distiller: Distiller | None = None,
                  interceptors: Sequence[grpc.ServerInterceptor] = ()) -> EdgeloopServer:
    """Build (but do not start) a server for ``config``; ``distiller`` replaces the torch distiller."""
    return EdgeloopServer(config, distiller, interceptors)


def serve(
    config: ServerConfig, distiller: Distiller | None = None,
    on_started: Callable[[EdgeloopServer], None] | None = None,
) -> None:
    """Run a server until SIGINT or SIGTERM, then stop it gracefully. Call from the main thread.

    ``on_started`` is called with the running server (e.g. to publish a bundle or print the port).
    """
    server = create_server(config, distiller)
    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received signal %d, stopping", signum)
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if on_started is not None:
            on_started(server)
        stop_requested.wait()
    finally:
        server.stop(config.grace_seconds)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
