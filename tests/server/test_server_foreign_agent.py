"""The device agent on a foreign bundle served by a real server: ``connect_agent`` (what ``edgeloop agent`` runs)
registers, fetches and verifies the wrapped model, runs it through a :class:`Predictor` with an output-only TTA
method and a drift detector, uploads what it selects, syncs without asking for updates, and refuses what needs
adaptable parameters (learn, contribute, the update watcher) with an error naming the bundle. ``run_agent`` on
the ONNX Model Zoo MNIST over a corrupted MNIST stream, and the CLI (export, serve, agent) end to end (skipped
when ``../shared/data`` is absent).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from device_agents.errors import UpdateRejectedError
from device_agents.messages import ParameterUpdate
from device_agents.tta import ModelCapabilityError
from edgeloop.admin import AdminClient
from edgeloop.cli import main
from edgeloop.pipeline import close_agent, connect_agent, run_agent
from runtime.predictor import Predictor
from server.app import EdgeloopServer, ServerConfig, create_server
from tests.server.server_testkit import REPO_ROOT
from tests.server.test_server_foreign import (  # noqa: F401 (module fixtures)
    MNIST,
    REFUSED,
    ZOO,
    _tiny_inputs,
    key,
    tiny_bundle,
    zoo_bundle,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EdgeloopServer]:
    """A real server on 127.0.0.1:0 with its registry in ``tmp_path``."""
    srv = create_server(ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, grace_seconds=1.0))
    srv.start()
    yield srv
    srv.stop(grace=1.0)


def test_agent_runs_a_foreign_bundle(server: EdgeloopServer, tiny_bundle: Path,  # noqa: F811 (fixture)
                                     tmp_path: Path) -> None:
    target = f"127.0.0.1:{server.port}"
    with AdminClient(target) as admin:
        bundle_id = admin.publish_bundle(tiny_bundle)
    with pytest.raises(ModelCapabilityError, match="needs an adaptable graph"):
        connect_agent(target, "cam-a", tmp_path / "a", tta="alpha_bn")  # the default: named, not a crash
    agent = connect_agent(target, "cam-t", tmp_path / "t", tta="t3a", detector="mahalanobis")
    try:
        assert isinstance(agent.model, Predictor) and not agent.adaptable
        assert agent.config.bundle_id == bundle_id
        for i in range(6):
            result = agent.process_batch(_tiny_inputs(16, 20 + i), np.arange(16) % 3)
            assert result.probs.shape == (16, 3)
        sync = agent.sync()
        assert sync.errors == () and sync.applied_versions == ()
        assert sync.upload is not None and sync.upload.stored == agent.stats.selected > 0
        stats = agent.stats
        assert stats.samples_seen == 96 and stats.sync_failures == 0 and stats.update_versions == ()
        stored = server.state.storage.unused_samples(bundle_id, limit=1000, with_input=True)
        assert len(stored) == stats.selected and all(s.features_blob for s in stored)
        for call in (agent.contribute, lambda: agent.learn(_tiny_inputs(4, 1), np.zeros(4, np.int64)),
                     agent.start_watcher):
            with pytest.raises(ModelCapabilityError, match=REFUSED) as exc:
                call()
            assert bundle_id in str(exc.value)
        with pytest.raises(UpdateRejectedError, match="no adaptable parameters"):
            agent.apply_update(ParameterUpdate(1, bundle_id, "fedavg", {}, "0" * 64))
        assert agent.stats.samples_seen == 96  # the refusals changed nothing
    finally:
        close_agent(agent)
        agent.client.close()
        agent.outbox.close()


def test_agent_tta_settings_reach_the_method(server: EdgeloopServer, tiny_bundle: Path,  # noqa: F811 (fixture)
                                            tmp_path: Path) -> None:
    """``edgeloop agent --tta lame --tta-set knn=3``: the agent's method runs with the setting; a bad setting is
    refused by name before the agent registers."""
    target = f"127.0.0.1:{server.port}"
    with AdminClient(target) as admin:
        admin.publish_bundle(tiny_bundle)
    agent = connect_agent(target, "cam-k", tmp_path / "k", tta="lame", tta_settings={"knn": "3"})
    try:
        assert agent.tta.config.knn == 3
        assert agent.process_batch(_tiny_inputs(16, 3), np.arange(16) % 3).probs.shape == (16, 3)
    finally:
        close_agent(agent)
        agent.client.close()
        agent.outbox.close()
    with pytest.raises(ValueError, match="TTA setting 'knn': 'x' is not an integer"):
        run_agent(server=target, device_id="cam-x", work_dir=tmp_path / "x", tta="lame", tta_settings={"knn": "x"})
    assert [d.device_id for d in AdminClient(target).list_devices()] == ["cam-k"]


def test_run_agent_on_the_zoo_mnist(server: EdgeloopServer,
                                    zoo_bundle: tuple[Path, np.ndarray],  # noqa: F811 (fixture)
                                    tmp_path: Path) -> None:
    """``edgeloop agent --dataset mnist --tta lame`` against a server serving the wrapped zoo model: the stream
    ([0, 1] images) is fed in the model's own value range (0–255), and the model keeps its accuracy (96 % here
    over clean and gaussian_noise:5 images)."""
    target = f"127.0.0.1:{server.port}"
    with AdminClient(target) as admin:
        admin.publish_bundle(zoo_bundle[0])
    report = run_agent(server=target, device_id="zoo-1", work_dir=tmp_path / "zoo", dataset="mnist",
                       domains="clean:0,gaussian_noise:5", samples_per_domain=128, batch_size=32, tta="lame")
    assert report["samples"] == 256 and report["accuracy"] >= 0.9, report
    assert report["update_versions"] == [] and report["bytes_down"] < 40_000, report  # the lean download
    # the zoo model's raw logits are large (inputs 0-255): nearly every sample is below the selector's entropy
    # floor (uninformative), so few or none are uploaded; whatever was is stored
    (device,) = AdminClient(target).list_devices()
    assert device.device_id == "zoo-1" and device.samples_stored == report["uploaded_samples"]


def test_cli_export_serve_agent_with_the_zoo_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The commands a user runs: ``edgeloop export --from-onnx``, ``edgeloop serve --bundle`` (a real process,
    stopped with SIGTERM) and ``edgeloop agent --tta lame --detector mahalanobis`` against it."""
    if not (ZOO.is_file() and MNIST.is_file()):
        pytest.skip(f"shared data absent (see ../shared/data/README.md): {ZOO}, {MNIST}")
    bundle = tmp_path / "zoo"
    assert main(["keygen", "--out", str(tmp_path / "k.pem")]) == 0
    assert main(["export", "--from-onnx", str(ZOO), "--dataset", "mnist", "--value-range", "0,255", "--out",
                 str(bundle), "--signing-key", str(tmp_path / "k.pem")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop.cli", "serve", "--data-dir", str(tmp_path / "srv"),
                             "--port", "0", "--bundle", str(bundle)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if found := re.search(r"listening on [\d.]+:(\d+)", line):
                break
        else:
            pytest.fail(f"server exited with {proc.wait()}: {''.join(lines)}")
        published = re.search(r"published bundle ([0-9a-f]{64})", "".join(lines))
        assert published is not None, lines
        target = f"127.0.0.1:{found.group(1)}"
        # the default --tta alpha_bn cannot run on a foreign model: a named error, exit status 2
        assert main(["agent", "--server", target, "--device-id", "cam-0", "--work-dir", str(tmp_path / "cam0"),
                     "--dataset", "mnist"]) == 2
        assert "needs an adaptable graph" in capsys.readouterr().err
        report = tmp_path / "cam.json"
        assert main(["agent", "--server", target, "--device-id", "cam-1", "--work-dir", str(tmp_path / "cam"),
                     "--dataset", "mnist", "--domains", "clean:0,gaussian_noise:5", "--samples-per-domain", "64",
                     "--tta", "lame", "--detector", "mahalanobis", "--json", str(report)]) == 0
        stats = json.loads(report.read_text())
        assert stats["samples"] == 128 and stats["accuracy"] >= 0.9 and stats["update_versions"] == [], stats
        with AdminClient(target) as admin:
            (device,) = [d for d in admin.list_devices() if d.device_id == "cam-1"]
            assert device.samples_stored == stats["uploaded_samples"] and device.acked_update_version == 0
            with pytest.raises(grpc.RpcError) as rpc:
                admin.start_round("fedavg")
            assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert published.group(1) in rpc.value.details()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
