"""Crash durability of a synchronous federated round on a real server process: ``kill -9`` while the round
worker is just before, or just after, publishing its update; a restart on the same data directory settles the
round as documented (docs/SERVER.md, "State across restarts"): published → done, its submissions used by it
and never aggregated again; not published → failed, its submissions left for the next round, which publishes
them exactly once."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from proto.convert import tensors_to_proto
from proto.edgeloop.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.app import ServerConfig, create_server
from tests.server.server_testkit import (
    RPC_TIMEOUT,
    FakeDistiller,
    bundle_chunks,
    initial_params,
    make_bundle_files,
    sample_msg,
    start_server_process,
)

DEVICES = ("dev-a", "dev-b", "dev-c")
# Run first in the server's child process: the round worker stops at the chosen point, prints a marker and
# waits there for the test's SIGKILL (nothing after that point runs).
_HOLD = ("import os, time, server.rounds as r; _publish = r.publish_update\n"
         "def _held(*a, **k):\n"
         "    if os.environ['CRASH_POINT'] == 'after_publish':\n"
         "        _publish(*a, **k)\n"
         "    print('CRASH-POINT-REACHED', flush=True); time.sleep(60)\n"
         "r.publish_update = _held")


def _wait_for_marker(proc: subprocess.Popen[str], timeout: float = 30.0) -> bool:
    """Read the child's output (on a thread, so the wait is bounded) until the crash-point marker shows."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            return False
        if line is None:
            return False
        if "CRASH-POINT-REACHED" in line:
            return True


@contextmanager
def _killed_at_crash_point(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Run the block (the requests that lead the server to its crash point), then ``kill -9`` the server once its
    round worker reports the crash point; the process is gone afterwards in every case."""
    try:
        yield
        assert _wait_for_marker(proc), "the round worker never reached the crash point"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _submit_all(target: str, bundle_id: str) -> list[int]:
    with grpc.insecure_channel(target) as ch:
        device = device_pb2_grpc.DeviceServiceStub(ch)
        ids = []
        for i, device_id in enumerate(DEVICES):
            device.Register(device_pb2.RegisterRequest(device_id=device_id), timeout=RPC_TIMEOUT)
            params = {k: (v + 0.1 * (i + 1)).astype(np.float32) for k, v in initial_params().items()}
            ids.append(device.SubmitUpdate(device_pb2.FederatedUpdate(
                device_id=device_id, bundle_id=bundle_id, base_version=0, num_samples=5,
                tensors=tensors_to_proto(params)), timeout=RPC_TIMEOUT).submission_id)
    return ids


@pytest.mark.parametrize("crash_point", ["before_publish", "after_publish"])
def test_kill9_during_a_fedavg_round_settles_it_without_losing_or_reusing_a_submission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_point: str
) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("CRASH_POINT", crash_point)
    proc, port = start_server_process(data, "update_encoding='f32'", setup=_HOLD)
    target = f"127.0.0.1:{port}"
    with _killed_at_crash_point(proc), grpc.insecure_channel(target) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        bundle_id = admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id
        submissions = _submit_all(target, bundle_id)  # acknowledged: committed before the kill
        round_id = admin.StartRound(admin_pb2.StartRoundRequest(kind="fedavg"), timeout=RPC_TIMEOUT).round_id

    config = ServerConfig(data_dir=data, port=0, grace_seconds=1.0, update_encoding="f32")
    with create_server(config) as srv:  # restart on the same data directory: settles the interrupted round
        storage = srv.state.storage
        assert storage.unfinished_rounds() == []
        settled = storage.get_round(round_id)
        records = [storage.get_submission(i) for i in submissions]
        assert all(r is not None for r in records), "an acknowledged submission is gone after kill -9"
        if crash_point == "after_publish":
            assert settled.state == "done" and settled.update_version == 1 and settled.metrics["recovered"] == 1.0
            assert [r.used_in_round for r in records] == [round_id] * len(DEVICES)
            assert storage.unused_submissions(bundle_id) == []  # nothing can be aggregated a second time
            assert storage.latest_version("default") == 1
            return
        assert settled.state == "failed" and "interrupted" in settled.error
        assert storage.latest_version("default") == 0
        assert [s.id for s in storage.unused_submissions(bundle_id)] == submissions  # left for the next round
        retry = srv.runner.start("fedavg")
        done = srv.runner.wait(retry.round_id, timeout=20.0)
        assert done.state == "done" and done.update_version == 1 and done.metrics["submissions"] == len(DEVICES)
        assert [storage.get_submission(i).used_in_round for i in submissions] == [retry.round_id] * len(DEVICES)
        assert storage.latest_version("default") == 1  # published once, from the one retry


_FAKE_DISTILLER = ("import server.app as _app; from tests.server.server_testkit import FakeDistiller; "
                   "_serve = _app.serve; "
                   "_app.serve = lambda config, **kw: _serve(config, distiller=FakeDistiller(), **kw)")


@pytest.mark.parametrize("crash_point", ["before_publish", "after_publish"])
def test_kill9_during_a_distill_round_never_lets_a_sample_serve_two_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_point: str
) -> None:
    """A distill round claims its samples before it publishes: killed after publishing, the restart finds them
    used by the round (they used to stay unused and be distilled again into a second version); killed before,
    the round fails and its samples serve the next one."""
    data = tmp_path / "data"
    monkeypatch.setenv("CRASH_POINT", crash_point)
    proc, port = start_server_process(data, "update_encoding='f32'", setup=f"{_FAKE_DISTILLER}\n{_HOLD}")
    target = f"127.0.0.1:{port}"
    sample_ids = [f"dev-a:s:{i}" for i in range(4)]
    with _killed_at_crash_point(proc), grpc.insecure_channel(target) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        device = device_pb2_grpc.DeviceServiceStub(ch)
        bundle_id = admin.PublishBundle(bundle_chunks(make_bundle_files()), timeout=RPC_TIMEOUT).bundle_id
        device.Register(device_pb2.RegisterRequest(device_id="dev-a"), timeout=RPC_TIMEOUT)
        ack = device.UploadSamples(iter([sample_msg(s, bundle_id, "dev-a", seed=i)
                                         for i, s in enumerate(sample_ids)]), timeout=RPC_TIMEOUT)
        assert sorted(ack.stored_ids) == sample_ids
        round_id = admin.StartRound(admin_pb2.StartRoundRequest(kind="distill"), timeout=RPC_TIMEOUT).round_id

    config = ServerConfig(data_dir=data, port=0, grace_seconds=1.0, update_encoding="f32")
    with create_server(config, distiller=FakeDistiller()) as srv:
        storage = srv.state.storage
        settled = storage.get_round(round_id)
        if crash_point == "after_publish":
            assert settled.state == "done" and settled.update_version == 1
            assert [storage.get_sample(s).used_in_round for s in sample_ids] == [round_id] * 4
            assert storage.unused_samples(bundle_id, limit=None, with_input=True) == []  # never distilled again
            return
        assert settled.state == "failed" and storage.latest_version("default") == 0
        assert [s.sample_id for s in storage.unused_samples(bundle_id, limit=None, with_input=True)] == sample_ids
        retry = srv.runner.wait(srv.runner.start("distill").round_id, timeout=20.0)
        assert retry.state == "done" and retry.update_version == 1 and retry.samples_used == 4
        assert [storage.get_sample(s).used_in_round for s in sample_ids] == [retry.round_id] * 4
