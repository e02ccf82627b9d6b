"""The closed loop end to end: a real server on 127.0.0.1:0, two agents on corrupted streams, a real
distillation round, updates pushed back, and a tampered bundle refused."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from device_agents.tta import create_tta_method
from edgeloop import pipeline
from edgeloop.admin import AdminClient
from edgeloop.data import Domain, build_stream, load_dataset
from runtime import AdaptableModel, BundleIntegrityError, load_bundle
from server.app import EdgeloopServer, ServerConfig, create_server
from server.storage import Registry

BATCH = 16
STREAMS = {
    "cam-a": (Domain("contrast", 4), Domain("gaussian_noise", 5)),
    "cam-b": (Domain("brightness", 5), Domain("impulse_noise", 5)),
}


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corruption-augmented wide_cnn teacher on digits (a few epochs, single-threaded)."""
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    pipeline.train_checkpoint(arch="wide_cnn", dataset="digits", out=out, epochs=6, seed=0, augment=True)
    return out


@pytest.fixture
def server(tmp_path: Path, digits_checkpoint: tuple[Path, str], teacher_checkpoint: Path) -> Iterator[EdgeloopServer]:
    """A started server with the torch distiller, data in ``tmp_path``."""
    config = ServerConfig(data_dir=tmp_path / "server", port=0, teacher_ckpt=teacher_checkpoint,
                          student_ckpt=digits_checkpoint[0], distill_alpha=pipeline.LOOP_ALPHA, distill_steps=40,
                          grace_seconds=2.0)
    srv = create_server(config)
    srv.start()
    yield srv
    srv.stop(grace=2.0)


def _run(agent: Any, x: np.ndarray, y: np.ndarray, offset: int = 0) -> float:
    correct = 0
    for start in range(0, len(y), BATCH):
        result = agent.process_batch(x[start : start + BATCH], y[start : start + BATCH], position=offset + start)
        correct += int((result.pred == y[start : start + BATCH]).sum())
    return correct / len(y)


def _offline(bundle: Path, tta: str, x: np.ndarray, y: np.ndarray) -> float:
    model, method = AdaptableModel(load_bundle(bundle)), create_tta_method(tta)
    preds = [method.adapt_and_predict(model, x[s : s + BATCH]).logits.argmax(1) for s in range(0, len(y), BATCH)]
    return float((np.concatenate(preds) == y).mean())


def test_closed_loop(server: EdgeloopServer, digits_bundle: Path, tmp_path: Path) -> None:
    address = f"127.0.0.1:{server.port}"
    with AdminClient(address) as admin:
        bundle_id = admin.publish_bundle(digits_bundle)
    test = load_dataset("digits", "test")
    streams = {dev: build_stream(test, doms, 96, seed=i) for i, (dev, doms) in enumerate(STREAMS.items())}
    agents = {dev: pipeline.connect_agent(address, dev, tmp_path / dev) for dev in STREAMS}
    try:
        # (a) forward-only adaptation beats the source model on the corrupted streams
        half = {dev: len(s.y) // 2 for dev, s in streams.items()}
        for dev, agent in agents.items():
            s = streams[dev]
            live = _run(agent, s.x[: half[dev]], s.y[: half[dev]])
            source = _offline(digits_bundle, "source", s.x[: half[dev]], s.y[: half[dev]])
            assert live > source + 0.02, f"{dev}: adapted {live:.3f} vs source {source:.3f}"
            assert agent.sync(wait_seconds=0.1).upload is not None
        # (b) every acknowledged upload is durably stored on the server
        uploaded = {dev: agent.stats.uploaded_samples for dev, agent in agents.items()}
        assert all(n > 0 for n in uploaded.values()), uploaded
        registry = Registry(Path(server.config.data_dir) / "registry.sqlite3")
        try:
            for dev, n in uploaded.items():
                stored = [r for r in registry.unused_samples(bundle_id, None, with_input=True) if r.device_id == dev]
                assert len(stored) == n
                assert all(r.input_blob for r in stored)
        finally:
            registry.close()
        # (c) a distilled update reaches both agents and changes their outputs
        probe = streams["cam-a"].x[half["cam-a"] : half["cam-a"] + BATCH]
        before = {dev: agent.model.forward(probe, alpha=0.6).logits for dev, agent in agents.items()}
        with AdminClient(address) as admin:
            info = admin.wait_round(admin.start_round("distill", steps=40), timeout=120)
        assert info.update_version == 1 and info.samples_used == sum(uploaded.values())
        assert info.metrics["kl_after"] < info.metrics["kl_before"]
        for dev, agent in agents.items():
            assert agent.sync(wait_seconds=0.5).applied_versions == (1,)
            after = agent.model.forward(probe, alpha=0.6).logits
            assert np.abs(after - before[dev]).max() > 1e-3, f"{dev}: update did not change outputs"
            s = streams[dev]
            _run(agent, s.x[half[dev] :], s.y[half[dev] :], offset=half[dev])
            assert agent.stats.update_versions == (1,)
    finally:
        for agent in agents.values():
            pipeline.close_agent(agent)


def test_tampered_bundle_is_refused(server: EdgeloopServer, digits_bundle: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(digits_bundle, tampered)
    model_file = tampered / "model_fp32.onnx"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    # (d) the device runtime refuses it, naming the file …
    with pytest.raises(BundleIntegrityError, match=r"model_fp32\.onnx"):
        load_bundle(tampered)
    # … and so does the server's publish path, storing nothing
    with AdminClient(f"127.0.0.1:{server.port}") as admin, pytest.raises(grpc.RpcError) as err:
        admin.publish_bundle(tampered)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_fp32.onnx" in (err.value.details() or "")
    assert server.registry.current_bundle() is None
