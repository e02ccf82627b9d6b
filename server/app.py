"""Wiring: configuration, the gRPC server with both services and health checking, start/stop, ``serve``.

``create_server(config)`` builds an :class:`EdgeloopServer`; ``start()`` binds and returns the actual port
(bind port 0 in tests). torch is imported only when a distillation round first needs the distiller.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from runtime.signing import load_public_key
from server.broker import UpdateBroker
from server.rounds import Distiller, RoundRunner
from server.servicers import AdminServicer, DeviceServicer
from server.state import Limits, ServerState
from server.storage import BlobStore, Registry

logger = logging.getLogger(__name__)
DEVICE_SERVICE = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
_MESSAGE_OVERHEAD = 4096  # room for a chunk's other fields within max_message_bytes


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server is configured with; validated at construction.

    Each open ``WatchUpdates`` stream holds one of the ``max_workers`` RPC threads, so at most
    ``max_watchers`` (0: three quarters of ``max_workers``) may be open; more are refused with
    RESOURCE_EXHAUSTED. Sizes are bytes; ``device`` is where distillation runs ("auto": CUDA if present).
    """

    data_dir: Path = Path("edgeloop_data")
    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 32
    max_watchers: int = 0
    max_message_bytes: int = 16 << 20
    chunk_size: int = 64 << 10
    max_upload_bytes: int = 64 << 20
    max_samples_per_upload: int = 4096
    max_bundle_bytes: int = 512 << 20
    distill_steps: int = 50
    round_max_samples: int = 4096
    teacher_ckpt: Path | None = None
    student_ckpt: Path | None = None
    distill_alpha: float = 0.5
    device: str = "auto"
    grace_seconds: float = 5.0
    trusted_publisher_keys: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        """Coerce paths and reject out-of-range values, naming the field."""
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "trusted_publisher_keys", tuple(Path(p) for p in self.trusted_publisher_keys))
        for name in ("teacher_ckpt", "student_ckpt"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.max_watchers == 0:  # default: leave a quarter of the RPC threads for non-watch calls
            object.__setattr__(self, "max_watchers", max(1, self.max_workers * 3 // 4))
        if not 0 < self.max_watchers < self.max_workers:
            raise ValueError(f"max_watchers {self.max_watchers} must be in 1..max_workers-1 ({self.max_workers - 1})"
                             " so that watchers cannot take every RPC thread")
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        for name in ("max_workers", "max_message_bytes", "chunk_size", "max_upload_bytes",
                     "max_samples_per_upload", "max_bundle_bytes", "distill_steps", "round_max_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.chunk_size > self.max_message_bytes - _MESSAGE_OVERHEAD:
            raise ValueError(f"chunk_size {self.chunk_size} does not fit in max_message_bytes "
                             f"{self.max_message_bytes} (minus {_MESSAGE_OVERHEAD} bytes overhead)")
        if (self.teacher_ckpt is None) != (self.student_ckpt is None):
            raise ValueError("teacher_ckpt and student_ckpt must be given together")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha {self.distill_alpha} is outside [0, 1]")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")


class EdgeloopServer:
    """The running server: registry, blob store, broker, round runner and the gRPC server around them."""

    def __init__(self, config: ServerConfig, distiller: Distiller | None = None) -> None:
        """Open storage under ``config.data_dir``; ``distiller`` overrides the torch distiller."""
        self.config = config
        self.registry = Registry(config.data_dir / "registry.sqlite3")
        self.blobs = BlobStore(config.data_dir / "blobs")
        limits = Limits(config.max_upload_bytes, config.max_samples_per_upload, config.max_bundle_bytes)
        broker = UpdateBroker(self.registry.latest_version(), max_watchers=config.max_watchers)
        trusted = tuple(load_public_key(p) for p in config.trusted_publisher_keys) or None
        self.state = ServerState(self.registry, self.blobs, broker, limits, trusted_publishers=trusted)
        factory = self._load_torch_distiller if config.teacher_ckpt is not None else None
        self.runner = RoundRunner(self.state, distiller=distiller, distiller_factory=factory,
                                  default_steps=config.distill_steps, max_samples=config.round_max_samples)
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._stopped = False
        self.port = 0

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
        server = grpc.server(ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="edgeloop-rpc"),
                             options=options)
        max_chunk = cfg.max_message_bytes - _MESSAGE_OVERHEAD
        device_pb2_grpc.add_DeviceServiceServicer_to_server(
            DeviceServicer(self.state, cfg.chunk_size, max_chunk), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.state, self.runner), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if port == 0:
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        server.start()
        for service in ("", DEVICE_SERVICE, ADMIN_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server, self.port = server, port
        logger.info("edgeloop server listening on %s:%d (data in %s)", cfg.host, port, cfg.data_dir)
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
        self.runner.shutdown(wait=True)
        self.registry.close()
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


def create_server(config: ServerConfig, distiller: Distiller | None = None) -> EdgeloopServer:
    """Build (but do not start) a server for ``config``; ``distiller`` replaces the torch distiller."""
    return EdgeloopServer(config, distiller)


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
