"""Unreadable round inputs are quarantined, not retried forever: a submission whose blob is corrupt, missing or
undecodable, or a sample whose input tensor is, is marked used by the round that found it and left out, the
round goes on with the rest (counting them in its metrics), and later rounds and FedBuff buffers are not blocked;
a FedBuff step replaces each one with the next unused submission, so it always aggregates K readable ones.
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
def _deltas(*values: float) -> dict[str, np.ndarray]:
    """Σ (submission − initial) over submissions ``initial + value`` (bn1 only), float64."""
    init = initial_params()
    return {k: sum(_params(x)[k].astype(np.float64) - init[k] for x in values) for k in _params(0)}


def test_every_fedbuff_step_aggregates_k_readable_submissions(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """K = 2. Unreadable submissions are quarantined and the buffer is topped up with the next oldest ones, so each
    step aggregates exactly K readable submissions; a readable one left over waits for the next."""
    ids = [site.submit(f"dev-{i}", 0.1 * (i + 1)) for i in range(6)]  # no runner yet: they wait in the registry
    site.corrupt(ids[0])
    site.delete(ids[1])
    site.corrupt(ids[3])
    runner = RoundRunner(site.state, aggregator=FedBuff(FedBuffConfig(buffer_size=2)))  # drains at start-up
    try:
        with caplog.at_level(logging.ERROR, logger="server.rounds"):
            assert runner.wait_idle(WAIT)
        assert site.versions() == [1]
        step = runner.get(site.used_in_round(ids[2]))
        assert step.kind == "fedbuff" and step.state == "done" and step.update_version == 1, step.error
        assert step.metrics["submissions"] == 2.0 and step.metrics["buffer_size"] == 2.0
        assert step.metrics["unreadable_submissions"] == 3.0
        assert site.reg.round_inputs(step.round_id) == [ids[2], ids[4]]  # claimed: exactly K readable ones
        assert [site.used_in_round(ids[i]) for i in (0, 1, 3, 4)] == [step.round_id] * 4
        assert [s.id for s in site.reg.unused_submissions(site.bundle_id)] == [ids[5]]  # buffered for the next
        assert site.reg.unfinished_rounds() == []
        logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        for pos in (0, 1, 3):
            assert f"submission {ids[pos]} of device dev-{pos}" in logged
        assert f"submission {ids[2]} of" not in logged
        init = {k: v.astype(np.float64) for k, v in initial_params().items()}
        v1 = {k: init[k] + d / 2 for k, d in _deltas(0.3, 0.5).items()}  # both on v0, staleness 0
        for k, v in v1.items():
            np.testing.assert_allclose(site.current()[k], v, rtol=0, atol=1e-5)
    finally:
        runner.shutdown()

    # a restart finds ids[5] plus a corrupt and a good submission: one step of ids[5] and the good one
    late = [site.submit("dev-x", 1.0, base_version=1), site.submit("dev-y", 1.5, base_version=1)]
    site.corrupt(late[0])
    runner = RoundRunner(site.state, aggregator=FedBuff(FedBuffConfig(buffer_size=2)))
    try:
        assert runner.wait_idle(WAIT)
        assert site.versions() == [1, 2] and site.reg.unused_submissions(site.bundle_id) == []
        last = runner.get(site.used_in_round(late[1]))
        assert last.state == "done" and last.update_version == 2, last.error
        assert last.metrics["submissions"] == 2.0 and last.metrics["unreadable_submissions"] == 1.0
        assert site.reg.round_inputs(last.round_id) == [ids[5], late[1]]
        assert site.used_in_round(late[0]) == last.round_id
        # ids[5] is on v0 (staleness 1: weight 1/sqrt(2)), dev-y on v1 (staleness 0)
        step = {k: (_deltas(0.6)[k] / np.sqrt(2.0) + _params(1.5)[k].astype(np.float64) - v1[k]) / 2 for k in v1}
        for k in v1:
            np.testing.assert_allclose(site.current()[k], v1[k] + step[k], rtol=0, atol=1e-5)
    finally:
        runner.shutdown()


def test_a_buffer_short_of_k_readable_submissions_waits_for_more_and_publishes_nothing(site: Site) -> None:
    """K = 3. A full buffer with one unreadable submission: it is quarantined by a failed round naming it, nothing
    is published, and the two readable ones wait; the next submission completes the buffer."""
    ids = [site.submit("dev-a", 0.2), site.submit("dev-b", 0.4), site.submit("dev-c", 0.6)]
    site.delete(ids[1])
    runner = RoundRunner(site.state, aggregator=FedBuff(FedBuffConfig(buffer_size=3)))
    try:
        assert runner.wait_idle(WAIT)
        assert site.versions() == []
        waiting = runner.get(site.used_in_round(ids[1]))
        assert waiting.kind == "fedbuff" and waiting.state == "failed" and waiting.update_version is None
        assert "NothingToAggregateError" in waiting.error and f"unreadable (quarantined: {ids[1]})" in waiting.error
        assert "2 readable one(s) stay buffered until 3 are readable" in waiting.error
        assert waiting.metrics == {"unreadable_submissions": 1.0, "buffer_size": 3.0, "buffered_submissions": 2.0}
        assert site.reg.round_inputs(waiting.round_id) == [] and site.reg.update_of_round(waiting.round_id) is None
        assert [s.id for s in site.reg.unused_submissions(site.bundle_id)] == [ids[0], ids[2]]

        ids.append(site.submit("dev-d", 0.8))  # completes the buffer: three readable submissions
        assert runner.wait_idle(WAIT)
        assert site.versions() == [1] and site.reg.unused_submissions(site.bundle_id) == []
        done = runner.get(site.used_in_round(ids[3]))
        assert done.state == "done" and done.metrics["submissions"] == 3.0, done.error
        assert done.metrics["unreadable_submissions"] == 0.0
        assert site.reg.round_inputs(done.round_id) == [ids[0], ids[2], ids[3]]
        init = initial_params()
        for k, d in _deltas(0.2, 0.6, 0.8).items():
            np.testing.assert_allclose(site.current()[k], init[k] + d / 3, rtol=0, atol=1e-5)

        runner.shutdown()  # so that no check reads the next ones before they are corrupted
        bad = [site.submit("dev-a", 1.0), site.submit("dev-b", 1.2), site.submit("dev-c", 1.4)]
        for i in bad:  # a buffer of nothing but unreadable submissions: quarantined, nothing waits
            site.corrupt(i)
        runner = RoundRunner(site.state, aggregator=FedBuff(FedBuffConfig(buffer_size=3)))
        assert runner.wait_idle(WAIT)
        failed = runner.get(site.used_in_round(bad[0]))
        assert failed.state == "failed" and failed.metrics["unreadable_submissions"] == 3.0
        assert failed.metrics["buffered_submissions"] == 0.0
        assert [site.used_in_round(i) for i in bad] == [failed.round_id] * 3 and site.versions() == [1]
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
    bad = site.submit("dev-a", 0.1)
    site.corrupt(bad)
    good = [site.submit("dev-b", 0.2), site.submit("dev-c", 0.4)]  # with bad: K = 2 readable after a top-up
    runner = RoundRunner(site.state, aggregator=FedBuff(FedBuffConfig(buffer_size=2)))  # drains at start-up
    try:
        assert runner.wait_idle(WAIT)
        failed = runner.get(site.used_in_round(bad))
        assert failed.state == "failed" and "disk full" in failed.error
        assert failed.metrics["unreadable_submissions"] == 1.0
        assert [site.used_in_round(i) for i in good] == [None, None] and site.versions() == []  # transient: unused

        good.append(site.submit("dev-d", 0.6))  # the next check retries the buffer: the oldest K readable ones
        assert runner.wait_idle(WAIT)
        assert site.versions() == [1] and [site.used_in_round(i) for i in good] == [failed.round_id + 1] * 2 + [None]
        assert runner.get(failed.round_id + 1).metrics["unreadable_submissions"] == 0.0
    finally:
        runner.shutdown()
