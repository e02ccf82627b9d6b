"""Delivery guarantees of the durable outbox against a real server on loopback.

* ``kill -9`` of the agent process while an upload is in flight (the server has stored the batch, its ack has
  not reached the device), then a restart on the same outbox file: every sample the outbox acknowledged
  locally is stored by the server exactly once, and the re-sent batch is answered as duplicates.
* The server goes down for a while, then comes back on the same port: the backlog drains, the drift reports
  made while it was down arrive, and every locally acknowledged sample is either stored exactly once or was
  dropped by the outbox's byte bound, a count the server holds from the device's ``ReportOutbox``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agents.agent import Agent, AgentConfig
from device_agents.client import DeviceClient
from device_agents.drift import PageHinkley
from device_agents.outbox import BackoffPolicy, OutboxSample, SqliteOutbox
from device_agents.selection import EntropyBandSelector, SelectorConfig
from device_agents.tta import SourceModel
from runtime import AdaptableModel, load_bundle

ROOT = Path(__file__).resolve().parents[2]


def _server_ids(data_dir: Path, device_id: str) -> dict[str, int]:
    """sample_id → number of rows the server's registry holds for it, for one device."""
    with sqlite3.connect(f"file:{data_dir / 'registry.sqlite3'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT sample_id, COUNT(*) FROM samples WHERE device_id = ? GROUP BY sample_id",
                            (device_id,)).fetchall()
    return dict(rows)


def _worker(server: str, work: Path, journal: Path, start: int, batches: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.device_agents.agent_worker", "--server", server, "--device-id", "dev-k9",
           "--work-dir", str(work), "--journal", str(journal), "--start", str(start), "--batches", str(batches)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill9_mid_upload_then_restart_delivers_each_acknowledged_sample_once(
    edge_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import handlers

    calls: list[handlers.UploadResult] = []
    held, release = threading.Event(), threading.Event()
    store = handlers.store_samples

    def store_then_hold(state, samples):  # type: ignore[no-untyped-def]
        result = store(state, samples)
        calls.append(result)
        if len(calls) == 3:  # the third upload is durable on the server; hold its ack back
            held.set()
            release.wait(20)
        return result

    monkeypatch.setattr(handlers, "store_samples", store_then_hold)
    work, journal = tmp_path / "device", tmp_path / "journal.txt"
    first = _worker(edge_server.target, work, journal, start=0, batches=12)
    try:
        assert held.wait(30), f"the worker never reached a third upload: {first.communicate(timeout=5)[0]}"
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        release.set()
        if first.poll() is None:
            first.kill()
            first.wait(10)
    in_flight = set(calls[2].stored_ids)
    assert in_flight, "the held upload stored nothing"
    with SqliteOutbox(work / "outbox.sqlite3", max_bytes=64 << 20) as box:  # it survived the kill
        pending = {s.sample_id for s in box.peek_batch(10_000, now_ms=10**13)}
    assert in_flight <= pending  # stored on the server, not yet acknowledged on the device

    second = _worker(edge_server.target, work, journal, start=100_000, batches=2)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out

    acknowledged = set(journal.read_text().split())
    on_server = _server_ids(edge_server.server.config.data_dir, "dev-k9")
    assert acknowledged and acknowledged <= set(on_server)
    assert set(on_server.values()) == {1}  # exactly once: one row per id
    stored = [i for c in calls for i in c.stored_ids]
    assert len(stored) == len(set(stored)) == len(on_server)  # no id was newly stored twice
    duplicates = {i for c in calls[3:] for i in c.duplicate_ids}
    assert in_flight <= duplicates  # the re-sent batch was recognised, not stored again
    assert set(on_server) <= acknowledged | pending  # nothing the outbox never held


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample_nbytes(tmp_path: Path, feature_dim: int) -> int:
    one = OutboxSample("probe", "b", np.zeros((1, 8, 8), np.float32), np.zeros(feature_dim, np.float32), 0.5, 0, 0, 0)
    with SqliteOutbox(tmp_path / "probe.sqlite3", max_bytes=1 << 20) as probe:
        probe.put([one])
        return probe.pending_bytes


def test_server_down_then_up_backlog_drains_and_drops_are_reported(
    tmp_path: Path, bundle_dir: Path, digits_test: tuple[np.ndarray, np.ndarray]
) -> None:
    from edgeloop.admin import AdminClient
    from edgeloop.data import corrupt
    from server.app import ServerConfig, create_server

    config = ServerConfig(data_dir=tmp_path / "server", port=_free_port(), max_workers=8, grace_seconds=0.2)
    target = f"127.0.0.1:{config.port}"
    server = create_server(config)
    server.start()
    with AdminClient(target) as admin:
        admin.publish_bundle(bundle_dir)
    client = DeviceClient(target, "dev-down", timeout=2.0, reconnect_backoff_ms=(50, 200))
    info = client.register()
    model = AdaptableModel(load_bundle(client.fetch_bundle(info.bundle_id, tmp_path / "bundles"), threads=1))
    feature_dim = model.forward(digits_test[0][:2]).features.shape[1]
    outbox = SqliteOutbox(tmp_path / "outbox.sqlite3", max_bytes=150 * _sample_nbytes(tmp_path, feature_dim),
                          backoff=BackoffPolicy(base_ms=50, max_ms=400, jitter=0.5), rng=random.Random(7))
    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=None))
    agent = Agent(model, SourceModel(), PageHinkley(threshold=1.0, mode="up"), selector, outbox, client,
                  AgentConfig(device_id="dev-down", bundle_id=info.bundle_id, upload_batch=32,
                              sync_wait_seconds=0.01))
    x, _ = digits_test
    stream = np.concatenate([x[:96], corrupt(x[96:384], "contrast", 5, seed=0)])
    queued: list[str] = []
    try:
        for i in range(0, 96, 32):
            queued += agent.process_batch(stream[i : i + 32], position=i).queued_ids
        assert agent.sync().errors == () and outbox.pending_count == 0

        server.stop(grace=0.2)  # down: the device keeps working and queueing
        for i in range(96, 384, 32):
            queued += agent.process_batch(stream[i : i + 32], position=i).queued_ids
            result = agent.sync()
            assert result.errors and result.upload is None
        for _ in range(8):  # each failed sync reschedules the batch it tried, with backoff
            assert agent.sync().errors
            time.sleep(0.1)
        down = agent.stats
        assert down.drift_reports_pending >= 1  # the shift was noticed while the server was away
        assert outbox.dropped > 0 and outbox.pending_count == 150  # the bound held: the oldest went
        attempts = [s.attempts for s in outbox.peek_batch(1000, now_ms=10**13)]
        assert max(attempts) >= 2  # retried with backoff, not dropped

        server = create_server(config)  # back, same port and data
        server.start()
        deadline = time.monotonic() + 20.0
        while (outbox.pending_count or agent.stats.drift_reports_pending) and time.monotonic() < deadline:
            agent.sync()
            time.sleep(0.05)
        assert outbox.pending_count == 0 and agent.stats.drift_reports_pending == 0

        on_server = _server_ids(config.data_dir, "dev-down")
        assert set(on_server.values()) == {1} and set(on_server) <= set(queued)
        missing = set(queued) - set(on_server)
        assert len(missing) == outbox.dropped  # every acknowledged sample: delivered once, or counted
        assert all(int(i.rsplit(":", 1)[1]) >= 96 for i in missing)  # the dropped ones are the oldest backlog
        reported = server.state.storage.get_outbox("dev-down")
        assert reported is not None and reported.dropped_samples == outbox.dropped
        assert reported.dropped_bytes == outbox.dropped_bytes and reported.eviction_policy == "drop_oldest"
        drift = {e.stream_position for e in server.state.storage.list_drift("dev-down")}
        assert set(agent.stats.drift_positions) == drift
    finally:
        agent.close()
        outbox.close()
        client.close()
        server.stop(grace=0.2)
