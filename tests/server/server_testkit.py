"""Helpers shared by the server tests: a bundle-like file set, chunk/sample builders, a fake distiller."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exporter.signing import signature_document
from proto.convert import tensor_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2
from server.rounds import DistillResult

INPUT_SHAPE = (1, 8, 8)
FEATURE_DIM = 8
LAYERS = {"bn1": 4, "bn2": 8}
RPC_TIMEOUT = 10.0


def initial_params() -> dict[str, np.ndarray]:
    """Deterministic adaptable parameters for :data:`LAYERS` (weight, bias, mean, var per layer)."""
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for name, c in LAYERS.items():
        out[f"{name}.weight"] = (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        out[f"{name}.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        out[f"{name}.mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        out[f"{name}.var"] = (1.0 + 0.1 * rng.random(c)).astype(np.float32)
    return out


TEST_SIGNING_KEY = Ed25519PrivateKey.generate()


def make_bundle_files(name: str = "tiny", initial: dict[str, np.ndarray] | None = None,
                      nonnegative: tuple[str, ...] = ()) -> dict[str, bytes]:
    """A bundle as path → bytes: a schema-1 manifest (docs/CONTRACT.md) and small stand-in model files.

    ``initial`` replaces the adaptable parameters (default :func:`initial_params`); layers follow its names.
    ``nonnegative``: the model entry's ``nonnegative_params`` (parameters its graph needs >= 0).
    """
    models = {"model_fp32.onnx": b"fake-onnx-fp32-" + name.encode() * 50, "model_int8.onnx": bytes(range(256)) * 3,
              "golden.npz": b"fake-golden"}
    init = initial_params() if initial is None else initial
    layers = {k.rsplit(".", 1)[0]: int(v.shape[0]) for k, v in init.items() if k.endswith(".weight")}
    manifest = {
        "schema_version": 1, "name": name, "arch": "small_cnn", "created_unix_ms": 1,
        "source_checkpoint_sha256": "0" * 64,
        "input": {"name": "input", "shape": [-1, *INPUT_SHAPE], "dtype": "float32", "layout": "NCHW",
                  "value_range": [0.0, 1.0], "normalization": {"mean": [0.5], "std": [0.25], "in_graph": True}},
        "labels": [str(i) for i in range(10)],
        "outputs": {"logits": "logits", "features": "features"},
        "adaptable": {
            "alpha_input": "alpha", "eps": 1e-5,
            "layers": [{"name": n, "channels": c, **{k: f"{n}.{k}" for k in ("weight", "bias", "mean", "var")},
                        "batch_mean": f"{n}.batch_mean", "batch_var": f"{n}.batch_var"} for n, c in layers.items()],
            "initial": {k: v.tolist() for k, v in init.items()},
        },
        "source_statistics": {"layers": {}, "features": {"mean": [0.0] * FEATURE_DIM, "var": [1.0] * FEATURE_DIM},
                              "entropy": {"mean": 0.5, "std": 0.2}, "accuracy": 0.9},
        "models": [{"name": "fp32", "file": "model_fp32.onnx", "format": "onnx", "precision": "fp32",
                    "graph": "adaptable", **({"nonnegative_params": list(nonnegative)} if nonnegative else {})}],
        "default_model": "fp32",
        "files": {p: hashlib.sha256(b).hexdigest() for p, b in models.items()},
        "golden": {"file": "golden.npz", "alpha": 0.5, "models": {"fp32": {"atol": 1e-4, "rtol": 1e-3}}},
    }
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    signature = signature_document(manifest_bytes, TEST_SIGNING_KEY)
    return {"manifest.json": manifest_bytes, "manifest.sig": signature, **models}


def bundle_chunks(files: dict[str, bytes], chunk_size: int = 100) -> Iterator[common_pb2.BundleChunk]:
    """Stream ``files`` as publish chunks (manifest last, to show order does not matter)."""
    for path in sorted(files, key=lambda p: p == "manifest.json"):
        data = files[path]
        digest = hashlib.sha256(data).hexdigest()
        for off in range(0, max(len(data), 1), chunk_size):
            yield common_pb2.BundleChunk(path=path, offset=off, data=data[off : off + chunk_size],
                                         file_size=len(data), file_sha256=digest)


def sample_msg(sample_id: str, bundle_id: str, device_id: str = "dev-1", seed: int = 0,
               input_array: np.ndarray | None = None) -> device_pb2.Sample:
    """A valid sample with a (1, 1, 8, 8) input and (8,) features."""
    rng = np.random.default_rng(seed)
    x = rng.random((1, *INPUT_SHAPE), dtype=np.float32) if input_array is None else input_array
    return device_pb2.Sample(
        device_id=device_id, sample_id=sample_id, bundle_id=bundle_id, input=tensor_to_proto("input", x),
        features=tensor_to_proto("features", rng.standard_normal(FEATURE_DIM).astype(np.float32)),
        entropy=0.7, prediction=3, stream_position=seed, captured_unix_ms=1000 + seed,
    )


class FakeDistiller:
    """Adds ``steps * 0.01`` to every weight/bias and records its calls; mean/var are kept."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], int]] = []
        self.nonnegative: list[frozenset[str]] = []

    def distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int,
                nonnegative: frozenset[str] = frozenset()) -> DistillResult:
        self.calls.append((samples_x.shape, steps))
        self.nonnegative.append(nonnegative)
        new = {k: (v + 0.01 * steps if k.endswith((".weight", ".bias")) else v).astype(np.float32)
               for k, v in current_params.items()}
        return DistillResult(new, {"kl_after": 0.1})


def wait_round(admin: admin_pb2_grpc.AdminServiceStub, round_id: int, timeout: float = 10.0
               ) -> admin_pb2.RoundStatus:
    """Poll GetRound until the round is done or failed (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        status = admin.GetRound(admin_pb2.GetRoundRequest(round_id=round_id), timeout=RPC_TIMEOUT)
        if status.state in ("done", "failed") or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def update_params(msg: common_pb2.ParameterUpdate, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parameters a ``ParameterUpdate`` message yields on a device holding ``base`` (its delta's base)."""
    from runtime.update_codec import decode_update

    base32 = {k: np.asarray(v, dtype=np.float32) for k, v in base.items()}
    return decode_update(msg.payload, msg.encoding, base32, {k: v.shape for k, v in base32.items()})


REPO_ROOT = Path(__file__).resolve().parents[2]


def start_server_process(data_dir: Path, config: str = "", setup: str = "") -> tuple[subprocess.Popen[str], int]:
    """A real server in a child process (so a test can ``kill -9`` or signal it) on 127.0.0.1:0 with its registry
    in ``data_dir``; ``config`` is extra ``ServerConfig`` keyword source, e.g. ``"aggregator='fedbuff'"``;
    ``setup`` is Python source run first in the child (e.g. logging to stdout). Returns the process and its port
    once it listens (stdout, merged with stderr, stays readable)."""
    extra = f", {config}" if config else ""
    code = (
        f"{setup}; " if setup else ""
    ) + (
        "from pathlib import Path; from server.app import ServerConfig, serve; "
        f"serve(ServerConfig(data_dir=Path({str(data_dir)!r}), port=0, max_workers=8, grace_seconds=1{extra}), "
        "on_started=lambda srv: print('port', srv.port, flush=True))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        if found := re.match(r"port (\d+)", line):
            return proc, int(found.group(1))
    proc.kill()
    raise RuntimeError(f"server process exited with {proc.wait()} before listening")


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of the ``grpc.RpcError`` that ``call`` raises (the test fails if none)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()
