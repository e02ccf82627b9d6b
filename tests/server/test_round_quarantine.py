"""Unreadable round inputs are quarantined, not retried forever: a submission whose blob is corrupt, missing or
undecodable, or a sample whose input tensor is, is marked used by the round that found it and left out, the
round goes on with the rest (counting them in its metrics), and later rounds and FedBuff buffers are not blocked.
Transient failures (the strategy, the publish) still leave every input unused for a retry.

Real objects throughout: a SQLite registry file, a blob store on disk, the handlers and a :class:`RoundRunner`."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server import handlers, rounds, updates
from server.aggregation import AggregateResult, Contribution, FedAvg, FedBuff, FedBuffConfig
from server.broker import UpdateBroker
from server.codec import decode_array
from server.errors import NothingToAggregateError
from server.rounds import RoundRunner
from server.state import Limits, ServerState
from server.storage import BlobStore, Registry
from tests.server.server_testkit import INPUT_SHAPE, FakeDistiller, initial_params, make_bundle_files

WAIT = 10.0


@dataclass
class Site:
    """A registry, blob store and state over ``tmp_path`` with the test bundle published."""

    reg: Registry
    state: ServerState
    bundle_id: str
    db_path: Path

    def submit(self, device_id: str, value: float, n: int = 1, base_version: int = 0) -> int:
        """Register ``device_id`` and store ``initial + value`` (bn1 only) as its submission; return its id."""
        handlers.register_device(self.state, device_id, {}, "onnx")
        return updates.submit_update(self.state, device_id, self.bundle_id, base_version, n, _params(value))

    def blob_path(self, submission_id: int) -> Path:
        """Where the submission's parameter blob lies on disk."""
        return self.state.blobs.path(self.reg.get_submission(submission_id).blob)

    def corrupt(self, submission_id: int) -> None:
        """Overwrite the submission's blob on disk with other bytes (its digest no longer matches)."""
        path = self.blob_path(submission_id)
        path.write_bytes(b"\x00garbage" + path.read_bytes()[8:])

    def delete(self, submission_id: int) -> None:
        """Remove the submission's blob from disk."""
        self.blob_path(submission_id).unlink()

    def used_in_round(self, submission_id: int) -> int | None:
        """The round that used the submission (None: still unused)."""
        return self.reg.get_submission(submission_id).used_in_round

    def current(self) -> dict[str, np.ndarray]:
        """The default cohort's current parameters."""
        return updates.current_params(self.state, self.bundle_id)[0]

    def versions(self) -> list[int]:
        """Published versions of the default cohort."""
        return [u.version for u in self.reg.updates_since(self.bundle_id, 0)]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A fresh site (f32 updates, so published parameters are exact)."""
    db_path = tmp_path / "reg.sqlite3"
    reg = Registry(db_path)
    state = ServerState(reg, BlobStore(tmp_path / "blobs"), UpdateBroker(0), Limits(), update_encoding="f32")
    bundle_id = handlers.publish_bundle(state, make_bundle_files()).bundle_id
    yield Site(reg, state, bundle_id, db_path)
    reg.close()


def _params(value: float) -> dict[str, np.ndarray]:
    return {k: v + np.float32(value) for k, v in initial_params().items() if k.startswith("bn1.")}


def _run_round(runner: RoundRunner, kind: str = "fedavg") -> rounds.RoundRecord:
    record = runner.start(kind)
    done = runner.wait(record.round_id, timeout=WAIT)
    assert done.state in ("done", "failed"), done
    return done


class FlakyFedAvg(FedAvg):
    """FedAvg that raises while ``fail`` is set (a transient strategy failure)."""

    fail = True

    def aggregate(self, base: Mapping[str, np.ndarray], contributions: Sequence[Contribution]) -> AggregateResult:
        if self.fail:
            raise RuntimeError("strategy hiccup")
        return super().aggregate(base, contributions)


# -- synchronous fedavg -------------------------------------------------------------------------------------
def test_fedavg_quarantines_unreadable_submissions_and_falls_back_per_device(
        site: Site, caplog: pytest.LogCaptureFixture) -> None:
    a_old = site.submit("dev-a", 0.1, n=1)
    a_new = site.submit("dev-a", 0.2, n=1)  # corrupt: dev-a falls back to a_old
    b_only = site.submit("dev-b", 0.3, n=1)  # missing: dev-b is left out
    c_only = site.submit("dev-c", 0.5, n=3)
    site.corrupt(a_new)
    site.delete(b_only)
    runner = RoundRunner(site.state)
    try:
        with caplog.at_level(logging.ERROR, logger="server.rounds"):
            done = _run_round(runner)
        assert done.state == "done", done.error
        assert done.metrics["unreadable_submissions"] == 2.0
        assert done.metrics["submissions"] == 2.0 and done.metrics["superseded"] == 0.0
        assert done.samples_used == 4 and done.metrics["total_weight"] == 4.0
        expected = {k: (1 * _params(0.1)[k].astype(np.float64) + 3 * _params(0.5)[k]) / 4 for k in _params(0)}
        for k, v in expected.items():
            np.testing.assert_allclose(site.current()[k], v, rtol=0, atol=1e-6)
        for k in initial_params():  # bn2 was never submitted: kept
            if k.startswith("bn2."):
                np.testing.assert_array_equal(site.current()[k], initial_params()[k])
        assert {i: site.used_in_round(i) for i in (a_old, a_new, b_only, c_only)} == dict.fromkeys(
            (a_old, a_new, b_only, c_only), done.round_id)
        assert site.reg.round_inputs(done.round_id) == [a_old, c_only]  # claimed: only what was aggregated
        logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        for sid, device, kind in ((a_new, "dev-a", "BlobCorruptError"), (b_only, "dev-b", "BlobNotFoundError")):
            assert f"submission {sid} of device {device}" in logged and kind in logged
            assert site.reg.get_submission(sid).blob in logged

        nxt = site.submit("dev-b", 0.7, n=1)  # the next round is not blocked by the bad ones
        again = _run_round(runner)
        assert again.state == "done", again.error
        assert again.metrics["submissions"] == 1.0 and again.metrics["unreadable_submissions"] == 0.0
        assert site.used_in_round(nxt) == again.round_id and site.versions() == [1, 2]
        np.testing.assert_allclose(site.current()["bn1.weight"], _params(0.7)["bn1.weight"], rtol=0, atol=1e-6)
    finally:
        runner.shutdown()


def test_a_round_whose_submissions_are_all_unreadable_fails_once_and_does_not_block(site: Site) -> None:
    bad = [site.submit("dev-a", 0.1), site.submit("dev-b", 0.2)]
    site.corrupt(bad[0])
    site.blob_path(bad[1]).write_bytes(b"")  # truncated to nothing: corrupt as well
    runner = RoundRunner(site.state)
    try:
        failed = _run_round(runner)
        assert failed.state == "failed" and "NothingToAggregateError" in failed.error and "unreadable" in failed.error
        assert failed.metrics["unreadable_submissions"] == 2.0
        assert [site.used_in_round(i) for i in bad] == [failed.round_id] * 2 and site.versions() == []
        with pytest.raises(NothingToAggregateError):  # nothing left to retry
            runner.start("fedavg")
        good = site.submit("dev-a", 0.4)
        done = _run_round(runner)
        assert done.state == "done" and site.used_in_round(good) == done.round_id and site.versions() == [1]
    finally:
        runner.shutdown()


def test_an_undecodable_blob_with_a_valid_digest_is_quarantined(site: Site) -> None:
    """A blob intact on disk (its sha256 matches) that is not an array encoding: CodecError, quarantined."""
    good = site.submit("dev-a", 0.1)
    odd = site.submit("dev-b", 0.2)
    junk = site.state.blobs.put(b"not an array blob")
    with sqlite3.connect(site.db_path) as raw:
        raw.execute("UPDATE submissions SET blob = ? WHERE id = ?", (junk, odd))
    runner = RoundRunner(site.state)
    try:
        done = _run_round(runner)
        assert done.state == "done" and done.metrics["unreadable_submissions"] == 1.0
        assert done.metrics["submissions"] == 1.0 and site.used_in_round(odd) == done.round_id
        assert site.used_in_round(good) == done.round_id
    finally:
        runner.shutdown()


# -- asynchronous FedBuff -----------------------------------------------------------------------------------
def test_fedbuff_drain_goes_on_past_unreadable_buffers(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """K = 2. Buffer 1 is entirely unreadable, buffer 2 half; later buffers still aggregate and publish."""
    ids = [site.submit(f"dev-{i}", 0.1 * (i + 1)) for i in range(6)]  # no runner yet: they wait in the registry
    site.corrupt(ids[0])
    site.delete(ids[1])
    site.corrupt(ids[3])
    runner = RoundRunner(site.state, aggregator=FedBuff(FedBuffConfig(buffer_size=2)))  # drains at start-up
    try:
        with caplog.at_level(logging.ERROR, logger="server.rounds"):
            assert runner.wait_idle(WAIT)
        assert site.versions() == [1, 2]
        assert site.reg.unused_submissions(site.bundle_id) == []
        r_bad, r_half, r_full = (site.used_in_round(ids[0]), site.used_in_round(ids[2]), site.used_in_round(ids[4]))
        assert site.used_in_round(ids[1]) == r_bad and site.used_in_round(ids[3]) == r_half
        assert site.used_in_round(ids[5]) == r_full and len({r_bad, r_half, r_full}) == 3

        first = runner.get(r_bad)
        assert first.kind == "fedbuff" and first.state == "failed" and "unreadable" in first.error
        assert first.metrics["unreadable_submissions"] == 2.0 and site.reg.update_of_round(r_bad) is None
        half = runner.get(r_half)
        assert half.state == "done" and half.update_version == 1
        assert half.metrics["submissions"] == 1.0 and half.metrics["unreadable_submissions"] == 1.0
        assert site.reg.round_inputs(r_half) == [ids[2]]
        full = runner.get(r_full)
        assert full.state == "done" and full.update_version == 2 and full.metrics["unreadable_submissions"] == 0.0
        assert site.reg.unfinished_rounds() == []
        logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        for pos in (0, 1, 3):
            assert f"submission {ids[pos]} of device dev-{pos}" in logged
        assert f"submission {ids[2]} of" not in logged

        # v1 is ids[2]'s own parameters (one delta from v0, staleness 0); v2 averages ids[4], ids[5] (both on v0,
        # staleness 1 each: weight 1/sqrt(2))
        v1 = {k: v.astype(np.float64) for k, v in initial_params().items()}
        v1.update({k: v.astype(np.float64) for k, v in _params(0.3).items()})
        init = {k: v.astype(np.float64) for k, v in initial_params().items()}
        for k in _params(0):
            step = sum(_params(x)[k].astype(np.float64) - init[k] for x in (0.5, 0.6)) / np.sqrt(2.0) / 2
            np.testing.assert_allclose(site.current()[k], v1[k] + step, rtol=0, atol=1e-5)

        # live: the next full buffer, with one corrupt submission among it, still publishes
        late = [site.submit("dev-x", 1.0, base_version=2)]
        site.corrupt(late[0])
        late += [site.submit("dev-y", 1.5, base_version=2)]
        assert runner.wait_idle(WAIT)
        assert site.versions() == [1, 2, 3] and site.reg.unused_submissions(site.bundle_id) == []
        last = runner.get(site.used_in_round(late[1]))
        assert last.state == "done" and last.metrics["unreadable_submissions"] == 1.0
        assert site.used_in_round(late[0]) == last.round_id
        np.testing.assert_allclose(site.current()["bn1.bias"], _params(1.5)["bn1.bias"], rtol=0, atol=1e-5)
    finally:
        runner.shutdown()


def test_an_operator_fedbuff_flush_skips_unreadable_submissions(site: Site) -> None:
    runner = RoundRunner(site.state, aggregator=FedBuff(FedBuffConfig(buffer_size=10)))
    try:
        ids = [site.submit("dev-a", 0.2), site.submit("dev-b", 0.4), site.submit("dev-c", 0.6)]
        site.delete(ids[1])
        done = _run_round(runner)  # the operator flushes the partial buffer
        assert done.state == "done" and done.update_version == 1, done.error
        assert done.metrics["submissions"] == 2.0 and done.metrics["unreadable_submissions"] == 1.0
        assert [site.used_in_round(i) for i in ids] == [done.round_id] * 3
        assert site.reg.round_inputs(done.round_id) == [ids[0], ids[2]]
        expected = (_params(0.2)["bn1.weight"].astype(np.float64) + _params(0.6)["bn1.weight"]) / 2
        np.testing.assert_allclose(site.current()["bn1.weight"], expected, rtol=0, atol=1e-5)

        only_bad = site.submit("dev-a", 0.8)
        site.corrupt(only_bad)
        failed = _run_round(runner)
        assert failed.state == "failed" and "NothingToAggregateError" in failed.error
        assert failed.metrics["unreadable_submissions"] == 1.0 and site.used_in_round(only_bad) == failed.round_id
    finally:
        runner.shutdown()


# -- distillation -------------------------------------------------------------------------------------------
def _store_samples(site: Site, ids: Sequence[str], seed: int = 0) -> dict[str, str]:
    """Store samples with distinct inputs for ``dev-1``; return sample id → input digest."""
    handlers.register_device(site.state, "dev-1", {}, "onnx")
    rng = np.random.default_rng(seed)
    site_samples = [handlers.SampleIn("dev-1", sid, site.bundle_id, rng.random((1, *INPUT_SHAPE), dtype=np.float32),
                                      None, 0.5, 1, seed * 100 + i, 1000 + i) for i, sid in enumerate(ids)]
    handlers.store_samples(site.state, site_samples)
    return {sid: site.reg.get_sample(sid).input_blob for sid in ids}


def test_distill_skips_unreadable_sample_inputs(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    distiller = FakeDistiller()
    runner = RoundRunner(site.state, distiller=distiller, default_steps=2)
    try:
        digests = _store_samples(site, ["dev-1:s:0", "dev-1:s:1", "dev-1:s:2", "dev-1:s:3"])
        with sqlite3.connect(site.db_path) as raw:  # small inputs live in the registry's tensor table
            raw.execute("UPDATE sample_tensors SET data = ? WHERE digest = ?", (b"rot", digests["dev-1:s:1"]))
            raw.execute("DELETE FROM sample_tensors WHERE digest = ?", (digests["dev-1:s:2"],))
        with caplog.at_level(logging.ERROR, logger="server.rounds"):
            done = _run_round(runner, "distill")
        assert done.state == "done", done.error
        assert distiller.calls == [((2, *INPUT_SHAPE), 2)]
        assert done.samples_used == 2 and done.metrics["samples"] == 2.0 and done.metrics["unreadable_samples"] == 2.0
        assert {sid: site.reg.get_sample(sid).used_in_round for sid in digests} == dict.fromkeys(digests,
                                                                                              done.round_id)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "sample dev-1:s:1 of device dev-1" in logged and "BlobCorruptError" in logged
        assert "sample dev-1:s:2 of device dev-1" in logged and "BlobNotFoundError" in logged
        np.testing.assert_allclose(site.current()["bn1.weight"], initial_params()["bn1.weight"] + 0.02, atol=1e-6)

        # the next distill round is not blocked; one whose samples are all unreadable fails without retrying
        more = _store_samples(site, ["dev-1:t:0"], seed=1)
        assert _run_round(runner, "distill").state == "done" and distiller.calls[-1][0][0] == 1
        gone = _store_samples(site, ["dev-1:u:0"], seed=2)
        with sqlite3.connect(site.db_path) as raw:
            raw.execute("DELETE FROM sample_tensors WHERE digest = ?", (gone["dev-1:u:0"],))
        failed = _run_round(runner, "distill")
        assert failed.state == "failed" and "NothingToAggregateError" in failed.error
        assert failed.metrics["unreadable_samples"] == 1.0
        assert site.reg.get_sample("dev-1:u:0").used_in_round == failed.round_id
        assert site.reg.get_sample("dev-1:t:0").used_in_round is not None and len(distiller.calls) == 2
        assert decode_array(site.reg.get_tensor(more["dev-1:t:0"])).shape == INPUT_SHAPE  # intact, unused again
    finally:
        runner.shutdown()


# -- transient failures still retry -------------------------------------------------------------------------
def test_a_failing_strategy_leaves_readable_submissions_unused_for_a_retry(site: Site) -> None:
    agg = FlakyFedAvg()
    runner = RoundRunner(site.state, aggregator=agg)
    try:
        good = [site.submit("dev-a", 0.1), site.submit("dev-b", 0.3)]
        bad = site.submit("dev-c", 0.5)
        site.corrupt(bad)
        failed = _run_round(runner)
        assert failed.state == "failed" and "strategy hiccup" in failed.error
        assert failed.metrics["unreadable_submissions"] == 1.0
        assert [site.used_in_round(i) for i in good] == [None, None]  # transient: kept for the next round
        assert site.used_in_round(bad) == failed.round_id  # unreadable for good: quarantined all the same
        assert site.versions() == [] and site.reg.round_inputs(failed.round_id) == []

        agg.fail = False
        done = _run_round(runner)
        assert done.state == "done" and done.metrics["submissions"] == 2.0
        assert done.metrics["unreadable_submissions"] == 0.0
        assert [site.used_in_round(i) for i in good] == [done.round_id] * 2
    finally:
        runner.shutdown()


def test_a_failing_publish_of_an_async_step_keeps_its_submissions_for_the_next(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    real_publish = rounds.publish_update
    calls = {"n": 0}

    def publish_once_failing(*args: object, **kwargs: object) -> updates.ParameterUpdate:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        return real_publish(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rounds, "publish_update", publish_once_failing)
    runner = RoundRunner(site.state, aggregator=FedBuff(FedBuffConfig(buffer_size=2)))
    try:
        bad = site.submit("dev-a", 0.1)
        site.corrupt(bad)
        good = [site.submit("dev-b", 0.2)]
        assert runner.wait_idle(WAIT)
        failed = runner.get(site.used_in_round(bad))
        assert failed.state == "failed" and "disk full" in failed.error
        assert failed.metrics["unreadable_submissions"] == 1.0
        assert site.used_in_round(good[0]) is None and site.versions() == []  # transient: still unused

        good.append(site.submit("dev-c", 0.4))  # the buffer is full again: the retry aggregates both
        assert runner.wait_idle(WAIT)
        assert site.versions() == [1] and [site.used_in_round(i) for i in good] == [failed.round_id + 1] * 2
        assert runner.get(failed.round_id + 1).metrics["unreadable_submissions"] == 0.0
    finally:
        runner.shutdown()
