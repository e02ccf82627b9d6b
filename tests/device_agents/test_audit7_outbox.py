"""Outbox edge cases from an audit: a database damaged under SQLite after it was opened (a page overwritten),
a lock held by another writer, a byte bound below one sample's size; the agent around them keeps serving
predictions and applying updates."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from device_agents.agent import Agent, AgentConfig
from device_agents.client import DeviceClient
from device_agents.drift import PageHinkley
from device_agents.errors import OutboxError
from device_agents.outbox import OutboxSample, SqliteOutbox
from device_agents.selection import EntropyBandSelector, SelectorConfig
from device_agents.tta import AlphaBN, SourceModel
from runtime import AdaptableModel, load_bundle


def _sample(i: int) -> OutboxSample:
    x = np.random.default_rng(i).random((1, 8, 8), dtype=np.float32)
    return OutboxSample(f"dev:s:{i}", "b" * 64, x, None, 0.5, 1, i, 0)


def _damaged_outbox(path: Path, n: int = 300) -> None:
    """An outbox of ``n`` samples whose table pages (past the schema) are overwritten: SQLite opens it (its header
    and schema are intact) and fails on the first read of the samples."""
    with SqliteOutbox(path, max_bytes=1 << 22) as box:
        box.put([_sample(i) for i in range(n)], now_ms=0)
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(4 * page, len(data) - page, 3 * page):
        data[start:start + page] = bytes(range(256)) * (page // 256)
    path.write_bytes(bytes(data))


def test_a_damaged_outbox_raises_outbox_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _damaged_outbox(path)
    with SqliteOutbox(path, max_bytes=1 << 22) as box:
        for read in (lambda: box.peek_batch(1000, now_ms=10), lambda: box.stats, lambda: box.bytes_created_after(0)):
            with pytest.raises(OutboxError, match=r"outbox .*outbox\.sqlite3: could not"):
                read()


def test_a_write_lock_held_by_another_writer_is_an_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with SqliteOutbox(path, max_bytes=1 << 20) as box:
        box.put([_sample(i) for i in range(3)], now_ms=0)
        box._conn.execute("PRAGMA busy_timeout = 50")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(OutboxError, match=r"could not remove delivered samples .*locked"):
                box.ack(["dev:s:0"])
            with pytest.raises(OutboxError, match=r"could not record a failed upload .*locked"):
                box.nack(["dev:s:1"], now_ms=0)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert box.pending_count == 3  # nothing was lost
        assert box.ack(["dev:s:0"]) == 1


def test_an_outbox_smaller_than_one_sample_loses_the_samples_not_the_batch(tiny_model, tiny_batch,
                                                                             tmp_path: Path) -> None:
    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=None))
    agent = Agent(tiny_model, AlphaBN(), PageHinkley(), selector, SqliteOutbox(tmp_path / "o.db", max_bytes=64),
                  None, AgentConfig(device_id="dev-1", bundle_id="a" * 64))
    result = agent.process_batch(tiny_batch)  # each sample takes ~400 bytes: none fits
    assert result.pred.shape == (32,) and result.queued_ids == ()
    stats = agent.stats
    assert stats.samples_seen == 32 and stats.samples_not_queued == 32
    assert agent.outbox.pending_count == 0


def test_a_damaged_outbox_does_not_stop_sync_from_applying_updates(edge_server, tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _damaged_outbox(path)
    client = DeviceClient(edge_server.target, "dev-audit", timeout=5.0)
    try:
        info = client.register({})
        model = AdaptableModel(load_bundle(client.fetch_bundle(info.bundle_id, tmp_path / "bundles"), threads=1))
        outbox = SqliteOutbox(path, max_bytes=1 << 22)
        agent = Agent(model, SourceModel(), PageHinkley(), None, outbox, client,
                      AgentConfig(device_id="dev-audit", bundle_id=info.bundle_id, cohort=info.cohort,
                                  update_keys=(info.update_public_key,), health=None),
                      version=info.latest_update_version)
        params = model.params
        params["bn1.bias"] = params["bn1.bias"] + 0.1
        version = edge_server.publish_update(params)
        result = agent.sync()
        assert result.applied_versions == (version,) and agent.version == version
        assert result.upload is None
        assert any("outbox.sqlite3" in e and "could not" in e for e in result.errors)
        assert agent.stats.sync_failures == 1
        outbox.close()
    finally:
        client.close()
