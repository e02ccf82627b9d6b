"""Fixtures of the device-agent tests: a tiny numpy model with the adaptable graph's exact BN math."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.errors import InputError
from runtime.model import ForwardResult
from runtime.params import validate_params


def check_digit_batch(x: np.ndarray) -> np.ndarray:
    """What the fake models accept: a finite float (N >= 1, 1, 8, 8) batch, as float32; else InputError."""
    arr = np.asarray(x)
    if arr.ndim != 4 or arr.shape[1:] != (1, 8, 8) or arr.shape[0] == 0 or arr.dtype.kind != "f":
        raise InputError(f"input {arr.dtype} {arr.shape} is not a (N >= 1, 1, 8, 8) float batch")
    if not np.all(np.isfinite(arr)):
        raise InputError("input holds NaN or inf")
    return arr.astype(np.float32)


class TinyAdaptableModel:
    """x (N,1,8,8) → per-channel affine (4 ch) → α-mixed BN "bn1" → ReLU → GAP → linear (3 classes).

    Implements the same ``params``/``set_params``/``forward`` surface as ``runtime.AdaptableModel`` so
    TTA and agent logic can be tested in milliseconds; the real bundle is exercised separately.
    """

    channels = 4
    num_classes = 3

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w_in = rng.normal(1.0, 0.5, self.channels).astype(np.float32)
        self.b_in = rng.normal(0.0, 0.5, self.channels).astype(np.float32)
        self.head = rng.normal(0.0, 1.0, (self.channels, self.num_classes)).astype(np.float32)
        self._shapes = {f"bn1.{k}": (self.channels,) for k in ("weight", "bias", "mean", "var")}
        self._params = {
            "bn1.weight": np.ones(self.channels, np.float32),
            "bn1.bias": np.zeros(self.channels, np.float32),
            "bn1.mean": (self.w_in * 0.5 + self.b_in).astype(np.float32),
            "bn1.var": (self.w_in**2 / 12).astype(np.float32),
        }
        self.calls: list[tuple[int, float]] = []

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._params.items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        self._params = {**self._params, **validate_params(params, self._shapes)}

    def forward(
        self, x: np.ndarray, alpha: float = 0.0, params: Mapping[str, np.ndarray] | None = None
    ) -> ForwardResult:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
            raise InputError(f"input has shape {x.shape}, expected (N, 1, 8, 8)")
        p = self.params
        if params:
            p.update(validate_params(params, self._shapes))
        self.calls.append((x.shape[0], float(alpha)))
        z = x * self.w_in.reshape(1, -1, 1, 1) + self.b_in.reshape(1, -1, 1, 1)
        mu_b = z.mean(axis=(0, 2, 3))
        var_b = ((z - mu_b.reshape(1, -1, 1, 1)) ** 2).mean(axis=(0, 2, 3))
        mu = (1 - alpha) * p["bn1.mean"] + alpha * mu_b
        var = (1 - alpha) * p["bn1.var"] + alpha * var_b
        scale = p["bn1.weight"] / np.sqrt(var + 1e-5)
        y = np.maximum(z * scale.reshape(1, -1, 1, 1) + (p["bn1.bias"] - mu * scale).reshape(1, -1, 1, 1), 0)
        features = y.mean(axis=(2, 3)).astype(np.float32)
        logits = (features @ self.head).astype(np.float32)
        return ForwardResult(logits, features, {"bn1": (mu_b.astype(np.float32), var_b.astype(np.float32))})


@pytest.fixture
def tiny_model() -> TinyAdaptableModel:
    """A fresh tiny model."""
    return TinyAdaptableModel()


@pytest.fixture
def tiny_batch() -> np.ndarray:
    """A seeded batch of 32 inputs in [0, 1] shifted away from the source statistics."""
    rng = np.random.default_rng(1)
    return np.clip(rng.random((32, 1, 8, 8), dtype=np.float32) * 0.5 + 0.4, 0, 1).astype(np.float32)


@pytest.fixture(scope="session")
def bundle_dir(request: pytest.FixtureRequest) -> Path:
    """The exporter's real digits bundle (``digits_bundle``); the test skips when that fixture is missing."""
    try:
        return Path(request.getfixturevalue("digits_bundle"))
    except pytest.FixtureLookupError:
        pytest.skip("the digits_bundle fixture (exporter) is not available")


@pytest.fixture(scope="session")
def digits_test(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray]:
    """``(x_test, y_test)`` of the split the bundle was trained against; skips without the fixture."""
    try:
        _, _, x_test, y_test = request.getfixturevalue("digits_arrays")
    except pytest.FixtureLookupError:
        pytest.skip("the digits_arrays fixture is not available")
    return x_test, y_test


def _chunks(root: Path, chunk_size: int = 4096) -> Iterator[object]:
    from proto.edgeloop.v1 import common_pb2

    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        rel = path.relative_to(root).as_posix()
        for off in range(0, max(len(data), 1), chunk_size):
            yield common_pb2.BundleChunk(path=rel, offset=off, data=data[off : off + chunk_size],
                                         file_size=len(data), file_sha256=digest)


@dataclass
class RunningServer:
    """A started edgeloop server on 127.0.0.1 with the digits bundle published."""

    server: Any
    target: str
    bundle_id: str

    def publish_update(self, params: Mapping[str, np.ndarray], kind: str = "distill", cohort: str = "default") -> int:
        """Publish a full parameter set through the server's handler (sent as the server's encoding, int8
        deltas by default); return its version within ``cohort``."""
        from server.updates import publish_update

        return int(publish_update(self.server.state, self.bundle_id, kind, params, cohort=cohort).version)

    def samples_stored(self, device_id: str) -> int:
        """How many samples the server holds from ``device_id``."""
        record = self.server.state.storage.get_device(device_id)
        return 0 if record is None else int(record.samples_stored)


@pytest.fixture
def edge_server(tmp_path: Path, bundle_dir: Path) -> Iterator[RunningServer]:
    """A real server on 127.0.0.1:0 (data in tmp_path) with the digits bundle published over AdminService."""
    with start_edge_server(tmp_path / "server", bundle_dir) as running:
        yield running


@contextlib.contextmanager
def start_edge_server(data_dir: Path, bundle_dir: Path) -> Iterator[RunningServer]:
    """Start a real server on 127.0.0.1:0 keeping its data in ``data_dir``, publish ``bundle_dir`` over
    AdminService, and stop it on exit."""
    app = pytest.importorskip("server.app")
    import grpc

    from proto.edgeloop.v1 import admin_pb2_grpc

    srv = app.create_server(app.ServerConfig(data_dir=data_dir, port=0, max_workers=8, grace_seconds=1.0))
    port = srv.start()
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            resp = admin_pb2_grpc.AdminServiceStub(channel).PublishBundle(_chunks(bundle_dir), timeout=30)
        yield RunningServer(srv, target, resp.bundle_id)
    finally:
        srv.stop(grace=1.0)
