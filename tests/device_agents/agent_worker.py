"""A device agent as its own process, for the delivery tests (``python -m tests.device_agents.agent_worker``).

It registers with ``--server``, fetches and verifies the bundle, then runs a real :class:`Agent` (source
model, every sample selected, no byte budget) over ``--batches`` batches of the digits test set starting at
stream position ``--start``, syncing after every batch. After each batch it appends the ids the outbox stored
durably (acknowledged locally) to ``--journal`` and fsyncs it. At the end it syncs until the outbox is empty
(at most ``--drain-seconds``); exit status 0 when it is, 3 when samples are still pending. Restarted on the
same ``--work-dir`` it reuses the outbox file, so what a killed run left pending is sent by the next one.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from device_agents.agent import Agent, AgentConfig
from device_agents.client import DeviceClient
from device_agents.drift import PageHinkley
from device_agents.outbox import BackoffPolicy, SqliteOutbox
from device_agents.selection import EntropyBandSelector, SelectorConfig
from device_agents.tta import SourceModel
from edgeloop.data import load_dataset
from runtime import AdaptableModel, load_bundle


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True)
    p.add_argument("--device-id", required=True)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--journal", type=Path, required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--upload-batch", type=int, default=16)
    p.add_argument("--drain-seconds", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_agent(args: argparse.Namespace) -> Agent:
    """Register, fetch the bundle and assemble the agent over the outbox file in ``--work-dir``."""
    client = DeviceClient(args.server, args.device_id, timeout=5.0, reconnect_backoff_ms=(50, 500))
    info = client.register({"role": "delivery-test"})
    model = AdaptableModel(load_bundle(client.fetch_bundle(info.bundle_id, args.work_dir / "bundles"), threads=1))
    outbox = SqliteOutbox(args.work_dir / "outbox.sqlite3", max_bytes=64 << 20,
                          backoff=BackoffPolicy(base_ms=50, max_ms=500, jitter=0.2), rng=random.Random(args.seed))
    selector = EntropyBandSelector(SelectorConfig(low=0.0, high=1.0, min_band=0.0, bytes_per_window=None))
    config = AgentConfig(device_id=args.device_id, bundle_id=info.bundle_id, upload_batch=args.upload_batch,
                         report_drift=False, sync_wait_seconds=0.01)
    return Agent(model, SourceModel(), PageHinkley(threshold=1e6), selector, outbox, client, config,
                 version=info.latest_update_version)


def main(argv: list[str] | None = None) -> int:
    """Run the batches, journaling locally acknowledged ids; drain; report on stdout."""
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    agent = build_agent(args)
    x = load_dataset("digits", "test").x
    with open(args.journal, "a") as journal:
        for b in range(args.batches):
            lo = (args.start + b * args.batch_size) % (len(x) - args.batch_size)
            result = agent.process_batch(x[lo : lo + args.batch_size], position=args.start + b * args.batch_size)
            journal.write("".join(f"{i}\n" for i in result.queued_ids))
            journal.flush()
            os.fsync(journal.fileno())
            print(f"batch {b} queued {len(result.queued_ids)}", flush=True)
            agent.sync()
    deadline = time.monotonic() + args.drain_seconds
    while agent.outbox.pending_count and time.monotonic() < deadline:
        agent.sync()
        time.sleep(0.05)
    pending = agent.outbox.pending_count
    print(f"done: {pending} pending", flush=True)
    return 0 if pending == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
