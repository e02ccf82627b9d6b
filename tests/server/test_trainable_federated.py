"""Trainable parameter space in bundles, encoded submissions and delta pulls, over a real server and gRPC."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agents.client import DeviceClient
from device_agents.errors import TransportError
from device_agents.updates import SubmissionEncoder, check_signature, decode_params
from edgeloop.admin import AdminClient
from exporter.signing import signature_document
from runtime.arrays import encode_arrays
from runtime.errors import ManifestError
from runtime.manifest import parse_manifest as runtime_parse
from runtime.params import params_digest
from runtime.update_codec import encode_delta
from server.app import EdgeloopServer, ServerConfig
from server.errors import InvalidBundleError
from server.manifest import parse_manifest as server_parse
from server.updates import current_params
from tests.server.server_testkit import TEST_SIGNING_KEY, initial_params, make_bundle_files

TRAINABLE = {"conv.weight": (4, 1, 3, 3), "fc.weight": (10, 300), "fc.bias": (10,), "emb.weight": (96, 100)}


def trainable_values(seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic trainable weights of :data:`TRAINABLE`'s shapes."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in TRAINABLE.items()}


def trainable_bundle_files(weights: dict[str, np.ndarray] | None = None, shapes: object = None,
                           manifest_edit: object = None) -> dict[str, bytes]:
    """The server test bundle plus a trainable block and file (re-signed)."""
    files = make_bundle_files()
    manifest = json.loads(files["manifest.json"])
    blob = encode_arrays(trainable_values() if weights is None else weights)
    files["trainable.bin"] = blob
    manifest["files"]["trainable.bin"] = hashlib.sha256(blob).hexdigest()
    manifest["trainable"] = {"file": "trainable.bin", "architecture": "toy",
                             "shapes": {k: list(v) for k, v in TRAINABLE.items()} if shapes is None else shapes}
    if callable(manifest_edit):
        manifest_edit(manifest)
    raw = json.dumps(manifest).encode()
    files["manifest.json"] = raw
    files["manifest.sig"] = signature_document(raw, TEST_SIGNING_KEY)
    return files


def write_bundle(files: dict[str, bytes], root: Path) -> Path:
    """``files`` written under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EdgeloopServer]:
    """A started server with int8 top-k updates (10 %) and the trainable bundle published."""
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, update_encoding="int8_topk_delta",
                       update_topk_fraction=0.1)
    srv = EdgeloopServer(cfg)
    srv.start()
    with AdminClient(f"127.0.0.1:{srv.port}") as admin:
        admin.publish_bundle(write_bundle(trainable_bundle_files(), tmp_path / "bundle"))
    yield srv
    srv.stop(grace=1.0)


def _client(srv: EdgeloopServer, name: str = "dev-1") -> tuple[DeviceClient, str, bytes]:
    c = DeviceClient(f"127.0.0.1:{srv.port}", name)
    info = c.register()
    return c, info.bundle_id, info.update_public_key


def full_initial() -> dict[str, np.ndarray]:
    """Version 0 of the federated space: adaptable initial values and trainable weights."""
    return {**initial_params(), **trainable_values()}


# -- manifests ---------------------------------------------------------------------------------------------------
def test_manifest_trainable_block_parses_on_server_and_runtime(tmp_path: Path) -> None:
    files = trainable_bundle_files()
    _, spec = server_parse(files["manifest.json"])
    assert spec.trainable_file == "trainable.bin"
    assert spec.param_shapes["fc.weight"] == (10, 300) and spec.param_shapes["bn1.weight"] == (4,)
    loaded = spec.trainable_initial(files["trainable.bin"])
    assert np.array_equal(loaded["fc.bias"], trainable_values()["fc.bias"])
    manifest = runtime_parse(json.loads(files["manifest.json"]))
    assert manifest.trainable is not None and manifest.trainable.shapes["conv.weight"] == (4, 1, 3, 3)
    root = write_bundle(files, tmp_path / "b")
    assert set(manifest.trainable_params(root)) == set(TRAINABLE)
    plain = runtime_parse(json.loads(make_bundle_files()["manifest.json"]))
    assert plain.trainable is None  # backward compatible: no block, nothing changes
    with pytest.raises(ManifestError, match="no trainable block"):
        plain.trainable_params(root)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m["trainable"].update(file="missing.bin"), "trainable.file"),
    (lambda m: m["trainable"].update(shapes={}), "at least one tensor"),
    (lambda m: m["trainable"].update(shapes={"fc.bias": [0]}), "positive ints"),
    (lambda m: m["trainable"].update(shapes={"bn1.weight": [4]}), "repeats an adaptable"),
    (lambda m: m.update(trainable=[1]), "must be an object"),
    (lambda m: m["trainable"]["shapes"].update({"w" * 300: [2]}), r"must be 1\.\.255 bytes of UTF-8"),
])
def test_malformed_trainable_blocks_are_refused(edit: object, match: str) -> None:
    files = trainable_bundle_files(manifest_edit=edit)
    with pytest.raises(InvalidBundleError, match=match):
        server_parse(files["manifest.json"])
    with pytest.raises(ManifestError):
        runtime_parse(json.loads(files["manifest.json"]))


def test_publish_refuses_a_trainable_file_that_does_not_match(tmp_path: Path, server: EdgeloopServer) -> None:
    bad = trainable_values()
    bad["fc.bias"] = np.full(10, np.nan, np.float32)
    with AdminClient(f"127.0.0.1:{server.port}") as admin, pytest.raises(Exception, match=r"fc\.bias"):
        admin.publish_bundle(write_bundle(trainable_bundle_files(weights=bad), tmp_path / "bad"))
    short = {k: v for k, v in trainable_values().items() if k != "fc.weight"}
    with AdminClient(f"127.0.0.1:{server.port}") as admin, pytest.raises(Exception, match="trainable file"):
        admin.publish_bundle(write_bundle(trainable_bundle_files(weights=short), tmp_path / "short"))


# -- submissions, aggregation and pulls over gRPC ------------------------------------------------------------------
def test_encoded_submissions_aggregate_full_weights_and_pull_as_delta(server: EdgeloopServer) -> None:
    initial = full_initial()
    clients = [_client(server, f"dev-{i}") for i in range(2)]
    targets = []
    for i, (c, bundle_id, _) in enumerate(clients):
        trained = {k: v + np.float32(0.01 * (i + 1)) for k, v in trainable_values().items()}
        targets.append(trained)
        payload = SubmissionEncoder("int8_delta").encode(trained, initial)
        c.submit_update(bundle_id, 0, 10 * (i + 1), encoding="int8_delta", payload=payload,
                        base_sha256=params_digest(initial))
    record = server.runner.wait(server.runner.start("fedavg").round_id, timeout=30)
    assert record.state == "done", record.error
    params, version = current_params(server.state, clients[0][1])
    assert version == 1
    expected = (10 * targets[0]["fc.weight"] + 20 * targets[1]["fc.weight"]) / 30
    assert np.abs(params["fc.weight"] - expected).max() < 2e-3  # int8 delta error, averaged
    assert np.array_equal(params["bn1.weight"], initial["bn1.weight"])  # nobody sent adaptable ones
    # a device holding version 0 gets a top-k delta from exactly what it holds, not the full f32
    c, bundle_id, key = clients[0]
    update = c.pull_update(bundle_id, 0, params_digest(initial))
    assert update is not None and update.encoding == "int8_topk_delta" and update.base_version == 0
    check_signature(update, [key])
    held = decode_params(update, initial, 0)
    assert params_digest(held) == update.sha256
    full = len(encode_arrays(params))
    assert len(update.payload) < full / 3  # int8, small tensors whole
    # the server remembers what it sent: the device is up to date at version 1 with that lossy copy
    assert c.pull_update(bundle_id, 1, update.sha256) is None
    # unknown base digest: full f32; up to date: nothing
    full_update = c.pull_update(bundle_id, 0, "0" * 64)
    assert full_update is not None and full_update.encoding == "f32"
    assert c.pull_update(bundle_id, 1, params_digest(params)) is None
    traffic = c.traffic()
    assert traffic["PullUpdate"]["messages_down"] == 4 and traffic["SubmitUpdate"]["messages_up"] == 1
    assert traffic["SubmitUpdate"]["bytes_up"] < full / 3  # int8 delta of the trainable weights
    c.close()
    clients[1][0].close()


def test_zero_delta_tensors_cost_a_header_only() -> None:
    zero = {k: np.zeros(s, np.float32) for k, s in TRAINABLE.items()}
    moved = dict(zero, **{"fc.bias": np.ones(10, np.float32)})
    for enc in ("int8_delta", "int8_topk_delta"):
        assert len(encode_delta(zero, enc, 0.1)) < 100
        assert len(encode_delta(moved, enc, 0.5)) < 120


def test_corrupt_payload_and_wrong_base_are_refused(server: EdgeloopServer) -> None:
    c, bundle_id, _ = _client(server)
    initial = full_initial()
    payload = SubmissionEncoder("int8_topk_delta", 0.1).encode(trainable_values(1), initial)
    with pytest.raises(TransportError, match=r"truncated|unexpected bytes|undecodable"):
        c.submit_update(bundle_id, 0, 5, encoding="int8_topk_delta", payload=payload[:-7])
    with pytest.raises(TransportError, match="base_sha256"):
        c.submit_update(bundle_id, 0, 5, encoding="int8_topk_delta", payload=payload, base_sha256="ab" * 32)
    with pytest.raises(TransportError, match="base_version 3"):
        c.submit_update(bundle_id, 3, 5, encoding="int8_topk_delta", payload=payload)
    with pytest.raises(TransportError, match="encoding"):
        c.submit_update(bundle_id, 0, 5, encoding="zip", payload=payload)
    bad = {"fc.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(TransportError, match=r"fc\.weight"):
        c.submit_update(bundle_id, 0, 5, encoding="f32", payload=SubmissionEncoder("f32").encode(bad, None))
    nan = {"fc.bias": np.full(10, np.nan, np.float32)}
    with pytest.raises(TransportError, match="NaN"):
        c.submit_update(bundle_id, 0, 5, encoding="f32", payload=SubmissionEncoder("f32").encode(nan, None))
    assert c.submit_update(bundle_id, 0, 5, encoding="int8_topk_delta", payload=payload,
                           base_sha256=params_digest(initial)) > 0
    c.close()


def test_adaptable_only_device_applies_its_names_from_a_full_update(server: EdgeloopServer) -> None:
    c, bundle_id, key = _client(server)
    initial = full_initial()
    c.submit_update(bundle_id, 0, 3, {"bn1.weight": np.full(4, 2.0, np.float32)})
    assert server.runner.wait(server.runner.start("fedavg").round_id, timeout=30).state == "done"
    update = c.pull_update(bundle_id, 0, "")
    assert update is not None and update.encoding == "f32"
    check_signature(update, [key])
    adaptable = {k: v for k, v in initial.items() if k in initial_params()}
    held = decode_params(update, adaptable, 0)
    assert set(held) == set(adaptable) and np.allclose(held["bn1.weight"], 2.0)
    c.close()


def test_server_counts_parameter_bytes_both_ways(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, metrics_port=0,
                       update_encoding="int8_topk_delta", update_topk_fraction=0.1)
    with EdgeloopServer(cfg) as srv:
        with AdminClient(f"127.0.0.1:{srv.port}") as admin:
            admin.publish_bundle(write_bundle(trainable_bundle_files(), tmp_path / "bundle"))
        c, bundle_id, _ = _client(srv)
        initial = full_initial()
        c.submit_update(bundle_id, 0, 4, encoding="int8_delta",
                        payload=SubmissionEncoder("int8_delta").encode(trainable_values(1), initial))
        assert srv.runner.wait(srv.runner.start("fedavg").round_id, timeout=30).state == "done"
        assert c.pull_update(bundle_id, 0, params_digest(initial)) is not None
        assert srv.metrics is not None
        reg = srv.metrics.registry
        traffic = c.traffic()
        assert reg.get_sample_value("edgeloop_parameter_bytes_total", {"direction": "up"}) == \
            traffic["SubmitUpdate"]["bytes_up"]
        assert reg.get_sample_value("edgeloop_parameter_bytes_total", {"direction": "down"}) == \
            traffic["PullUpdate"]["bytes_down"]
        c.close()


def test_pulls_chain_from_what_the_server_last_sent(server: EdgeloopServer) -> None:
    c, bundle_id, key = _client(server)
    initial = full_initial()
    held, version, sha = initial, 0, params_digest(initial)
    for step in range(1, 4):
        trained = {k: v + np.float32(0.05 * step) for k, v in trainable_values().items()}
        c.submit_update(bundle_id, version, 5, encoding="int8_delta",
                        payload=SubmissionEncoder("int8_delta").encode(trained, held), base_sha256=sha)
        assert server.runner.wait(server.runner.start("fedavg").round_id, timeout=30).state == "done"
        update = c.pull_update(bundle_id, version, sha)
        assert update is not None and update.encoding == "int8_topk_delta"
        assert (update.base_version, update.base_sha256) == (version, sha)  # a delta from exactly its lossy copy
        check_signature(update, [key])
        held, version, sha = decode_params(update, held, version), update.version, update.sha256
        exact, _ = current_params(server.state, bundle_id)
        assert np.abs(held["fc.weight"] - exact["fc.weight"]).max() < 0.01  # small tensors go whole (int8)
        moved = np.abs(held["emb.weight"] - exact["emb.weight"]) < 1e-3
        if step == 1:  # the large one as top-k: 10 % of its entries caught up
            assert abs(moved.mean() - 0.1) < 0.01
        else:  # what one reply left out is in the next: each reply closes part of the whole gap
            gap = np.abs(held["emb.weight"] - exact["emb.weight"]).mean()
            assert gap < 0.95 * np.abs(initial["emb.weight"] - exact["emb.weight"]).mean()
    assert version == 3
    c.close()
