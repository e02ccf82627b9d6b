"""Handlers, broker and round runner without gRPC: real SQLite and blob store in tmp_path, fake distiller."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server import handlers, updates
from server.broker import UpdateBroker
from server.errors import (
    InvalidBundleError,
    InvalidTensorError,
    NoBundlePublishedError,
    ServerShuttingDownError,
    UnknownDeviceError,
)
from server.manifest import parse_manifest
from server.records import SubmissionRecord
from server.rounds import DistillResult, RoundRunner, fedavg, latest_per_device
from server.state import Limits, ServerState, resolve_bundle, spec_of
from server.storage import BlobStore, Registry
from tests.server.server_testkit import INPUT_SHAPE, FakeDistiller, initial_params, make_bundle_files


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ServerState]:
    """Handler state over a fresh registry and blob store."""
    reg = Registry(tmp_path / "reg.sqlite3")
    yield ServerState(reg, BlobStore(tmp_path / "blobs"), UpdateBroker(reg.latest_version()), Limits())
    reg.close()


@pytest.fixture
def bundle_id(state: ServerState) -> str:
    """Publish the test bundle and register ``dev-1``."""
    handlers.register_device(state, "dev-1", {}, "onnx")
    return handlers.publish_bundle(state, make_bundle_files()).bundle_id


def _sample(sid: str, bundle: str, x: np.ndarray | None = None) -> handlers.SampleIn:
    x = np.zeros(INPUT_SHAPE, np.float32) if x is None else x
    return handlers.SampleIn("dev-1", sid, bundle, x, None, 0.3, 1, 0, 0)


def test_manifest_errors_name_the_field() -> None:
    files = make_bundle_files()
    manifest = json.loads(files["manifest.json"])
    manifest["schema_version"] = 3  # newer than any this server reads
    with pytest.raises(InvalidBundleError, match="schema_version"):
        parse_manifest(json.dumps(manifest).encode())
    del manifest["input"]["shape"]
    manifest["schema_version"] = 1
    with pytest.raises(InvalidBundleError, match=r"input\.shape"):
        parse_manifest(json.dumps(manifest).encode())
    manifest = json.loads(files["manifest.json"])
    manifest["files"]["../escape"] = "0" * 64
    with pytest.raises(InvalidBundleError, match="escape"):
        parse_manifest(json.dumps(manifest).encode())


def test_publish_is_idempotent_and_latest_is_current(state: ServerState) -> None:
    first = handlers.publish_bundle(state, make_bundle_files("one"))
    second = handlers.publish_bundle(state, make_bundle_files("two"))
    assert handlers.publish_bundle(state, make_bundle_files("two")) == second
    reg = handlers.register_device(state, "d", {"cohort": "a"}, "tflite")
    assert reg.bundle_id == second.bundle_id != first.bundle_id
    handlers.publish_bundle(state, make_bundle_files("one"))  # re-publishing makes it current again
    assert handlers.register_device(state, "d", {}, "onnx").bundle_id == first.bundle_id


def test_sample_input_shapes(state: ServerState, bundle_id: str) -> None:
    ok = handlers.store_samples(state, [_sample("a", bundle_id), _sample("b", bundle_id, np.zeros((1, *INPUT_SHAPE),
                                                                                                  np.float32))])
    assert ok.stored_ids == ["a", "b"]
    rec = state.storage.get_sample("b")
    assert rec is not None and rec.input_blob is not None
    from server.codec import decode_array
    from server.state import sample_tensor

    assert decode_array(sample_tensor(state, rec.input_blob)).shape == INPUT_SHAPE  # stored without batch dim
    with pytest.raises(InvalidTensorError, match="shape"):
        handlers.store_samples(state, [_sample("c", bundle_id, np.zeros((3, 8, 8), np.float32))])
    with pytest.raises(InvalidTensorError, match="neither"):
        handlers.store_samples(state, [handlers.SampleIn("dev-1", "d", bundle_id, None, None, 0.1, 0, 0, 0)])
    with pytest.raises(UnknownDeviceError):
        handlers.store_samples(state, [handlers.SampleIn("ghost", "e", bundle_id, None, None, 0.1, 0, 0, 0)])
    assert state.storage.get_sample("c") is None
    assert list(state.bundle_specs) == [bundle_id]  # later uploads validate against the cached spec


def test_fedavg_weighted_mean_and_partial_names() -> None:
    base = {"w": np.zeros(2, np.float32), "b": np.ones(2, np.float32), "v": np.full(2, 5.0, np.float32)}
    out = fedavg([(1, {"w": np.array([4.0, 0.0]), "b": np.array([3.0, 3.0])}),
                  (3, {"w": np.array([0.0, 8.0])})], base)
    np.testing.assert_allclose(out["w"], [1.0, 6.0])
    np.testing.assert_allclose(out["b"], [3.0, 3.0])  # carried by one contribution only
    np.testing.assert_array_equal(out["v"], base["v"])  # carried by none
    assert all(v.dtype == np.float32 for v in out.values())
    subs = [SubmissionRecord("b", "x", 0, 1, "h", 0, id=1), SubmissionRecord("a", "x", 0, 1, "h", 0, id=2),
            SubmissionRecord("b", "x", 0, 1, "h", 0, id=3)]
    assert [s.id for s in latest_per_device(subs)] == [2, 3]


def test_broker_wakes_waiters_without_polling() -> None:
    broker = UpdateBroker(latest_version=4)
    assert broker.wait_for(3, timeout=0) is True
    t0 = time.monotonic()
    assert broker.wait_for(4, timeout=0.05) is False and time.monotonic() - t0 >= 0.05
    threading.Timer(0.05, broker.publish, args=(5,)).start()
    assert broker.wait_for(4, timeout=5.0) is True
    cancelled = threading.Event()
    threading.Timer(0.05, lambda: (cancelled.set(), broker.wake())).start()
    t0 = time.monotonic()
    assert broker.wait_for(5, timeout=5.0, cancelled=cancelled.is_set) is False
    assert time.monotonic() - t0 < 2.0
    threading.Timer(0.05, broker.shutdown).start()
    assert broker.wait_for(5, timeout=5.0) is False and broker.closed


def test_watch_yields_stored_then_new_then_times_out(state: ServerState, bundle_id: str) -> None:
    params = initial_params()
    updates.publish_update(state, bundle_id, "fedavg", params)
    stream = updates.watch_updates(state, "dev-1", bundle_id, 0, max_wait_s=3.0, is_active=lambda: True)
    assert next(stream).version == 1
    threading.Timer(0.05, updates.publish_update, args=(state, bundle_id, "distill", params)).start()
    second = next(stream)
    assert (second.version, second.kind) == (2, "distill")
    state.broker.shutdown()
    assert list(stream) == []
    assert state.storage.get_device("dev-1").acked_update_version == 2  # type: ignore[union-attr]


def test_publish_update_requires_full_valid_params(state: ServerState, bundle_id: str) -> None:
    params = initial_params()
    params.pop("bn2.var")
    with pytest.raises(InvalidTensorError, match=r"bn2\.var"):
        updates.publish_update(state, bundle_id, "fedavg", params)
    bad = initial_params()
    bad["bn1.bias"] = np.array([np.inf, 0, 0, 0], np.float32)
    with pytest.raises(InvalidTensorError, match=r"bn1\.bias"):
        updates.publish_update(state, bundle_id, "distill", bad)
    assert state.storage.latest_version() == 0


def test_updates_keep_the_scales_a_model_needs_nonnegative(state: ServerState) -> None:
    """A bundle whose model pools before its normalisation scale (TFLite, trained γ >= 0) lists those scales in
    ``nonnegative_params``: an update or a device submission with a negative value there is refused, naming it,
    and nothing is stored."""
    bundle = handlers.publish_bundle(state, make_bundle_files("pooled", nonnegative=("bn1.weight",))).bundle_id
    handlers.register_device(state, "dev-1", {}, "tflite")
    bad = initial_params()
    bad["bn1.weight"] = np.array([1.0, -0.5, 1.0, 1.0], np.float32)
    with pytest.raises(InvalidTensorError, match=r"bn1\.weight\[1\] = -0\.5 is negative: model 'fp32'"):
        updates.publish_update(state, bundle, "fedavg", bad)
    with pytest.raises(InvalidTensorError, match=r"bn1\.weight\[1\]"):
        updates.submit_update(state, "dev-1", bundle, 0, 8, bad)
    assert state.storage.latest_version() == 0
    fine = initial_params()
    fine["bn2.weight"] = -fine["bn2.weight"]  # not listed: any sign
    assert updates.publish_update(state, bundle, "fedavg", fine).version == 1
    manifest = json.loads(make_bundle_files("pooled", nonnegative=("bn9.weight",))["manifest.json"])
    with pytest.raises(InvalidBundleError, match="nonnegative_params"):
        parse_manifest(json.dumps(manifest).encode())


class BlockingDistiller(FakeDistiller):
    """A fake distiller that waits for ``release`` before answering."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int,
                nonnegative: frozenset[str] = frozenset()) -> DistillResult:
        self.entered.set()
        self.release.wait(10.0)
        return super().distill(samples_x, current_params, steps, nonnegative)


def test_rounds_run_one_at_a_time_and_record_failures(state: ServerState, bundle_id: str) -> None:
    distiller = BlockingDistiller()
    runner = RoundRunner(state, distiller=distiller, default_steps=2)
    handlers.store_samples(state, [_sample("s", bundle_id)])
    updates.submit_update(state, "dev-1", bundle_id, 0, 10, {"bn1.weight": np.ones(4, np.float32)})
    first = runner.start("distill")
    assert distiller.entered.wait(5.0)
    assert runner.wait(first.round_id, timeout=0.01).state == "running"  # a timeout returns the live record
    assert runner.get(first.round_id).state == "running"
    agg = runner.start("fedavg")
    starved = runner.start("fedavg")  # its check passes now; the first fedavg will consume the submission
    assert runner.get(agg.round_id).state == "queued"
    distiller.release.set()
    done = [runner.wait(r.round_id, timeout=10.0) for r in (first, agg, starved)]
    assert [r.state for r in done] == ["done", "done", "failed"]
    assert [r.update_version for r in done[:2]] == [1, 2]
    assert "NothingToAggregateError" in done[2].error and "submissions" in done[2].error
    assert done[1].seconds > 0 and done[1].metrics["submissions"] == 1
    np.testing.assert_allclose(updates.current_params(state, bundle_id)[0]["bn1.weight"], np.ones(4))
    runner.shutdown()
    with pytest.raises(ServerShuttingDownError):
        runner.start("fedavg")


def test_rounds_project_server_results_onto_nonnegative_scales(state: ServerState) -> None:
    """A round's own result (here a distiller that drives a scale below 0) is published with the negative
    values of the bundle's nonnegative_params set to 0, where a caller's update would be refused."""

    told: list[frozenset[str]] = []

    class Overshooting:
        def distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int,
                    nonnegative: frozenset[str] = frozenset()) -> DistillResult:
            told.append(nonnegative)  # what the round asks it to keep >= 0; it ignores it, the server projects
            out = {k: np.array(v, np.float32) for k, v in current_params.items()}
            out["bn1.weight"][1] = -0.25
            out["bn2.weight"][0] = -0.5  # not listed: published as it is
            return DistillResult(out, {"kl_after": 0.1})

    bundle = handlers.publish_bundle(state, make_bundle_files("pooled", nonnegative=("bn1.weight",))).bundle_id
    handlers.register_device(state, "dev-1", {}, "tflite")
    handlers.store_samples(state, [_sample("s", bundle)])
    runner = RoundRunner(state, distiller=Overshooting(), default_steps=1)
    try:
        done = runner.wait(runner.start("distill").round_id, timeout=10.0)
    finally:
        runner.shutdown()
    assert done.state == "done" and done.update_version == 1
    published = updates.current_params(state, bundle)[0]
    assert published["bn1.weight"][1] == 0.0 and published["bn1.weight"][0] == initial_params()["bn1.weight"][0]
    assert published["bn2.weight"][0] == -0.5
    assert told == [frozenset({"bn1.weight", "bn1.var", "bn2.var"})]  # and the variances, never negative


def test_distiller_returning_wrong_names_fails_the_round(state: ServerState, bundle_id: str) -> None:
    class Broken:
        def distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int,
                    nonnegative: frozenset[str] = frozenset()) -> DistillResult:
            return DistillResult({"bn1.weight": np.ones(4, np.float32)})

    runner = RoundRunner(state, distiller=Broken())
    handlers.store_samples(state, [_sample("s", bundle_id)])
    record = runner.wait(runner.start("distill").round_id, timeout=10.0)
    assert record.state == "failed" and "bn1.bias" in record.error
    assert state.storage.get_sample("s").used_in_round is None  # type: ignore[union-attr]
    runner.shutdown()


def test_round_without_bundle(state: ServerState) -> None:
    runner = RoundRunner(state)
    with pytest.raises(NoBundlePublishedError):
        runner.start("fedavg")
    runner.shutdown()


def test_a_negative_variance_is_never_published(state: ServerState, bundle_id: str) -> None:
    """A variance below 0 makes every device's normalisation NaN: given directly it is refused, naming it; in
    a result the server computed (``project``: a round's mean over submissions) it is set to 0."""
    bad = initial_params()
    bad["bn2.var"] = np.array([1.0, -0.25, 1, 1, 1, 1, 1, 1], np.float32)
    with pytest.raises(InvalidTensorError, match=r"bn2\.var\[1\] = -0\.25 is negative: a variance"):
        updates.publish_update(state, bundle_id, "fedavg", bad)
    assert state.storage.latest_version() == 0
    update = updates.publish_update(state, bundle_id, "fedavg", bad, project=True)
    np.testing.assert_array_equal(update.params["bn2.var"], [1.0, 0, 1, 1, 1, 1, 1, 1])
    assert {"bn1.var", "bn2.var"} <= updates.nonnegative_names(spec_of(resolve_bundle(state, bundle_id)))
