"""Foreign bundles (no ``adaptable`` block: ``edgeloop export --from-onnx/--from-tflite``) rolled out to a fleet.

A real gRPC server on 127.0.0.1:0 with its SQLite registry in ``tmp_path`` publishes a wrapped model (an ONNX one
built here, always; from ``../shared/data/models``, skipped when absent: the ONNX Model Zoo MNIST and the MLPerf
Tiny ResNet-8 float and int8 TFLite); a
:class:`DeviceClient` registers, fetches and verifies it, runs it through a :class:`Predictor` (equal to the
bundle's golden outputs and to a predictor on the local copy), with TTA ``source``/``lame``/``t3a`` and drift
detection on entropy and features, and uploads selected samples through its outbox. Everything that needs
adaptable parameters — submissions, update watch/pull, federated and distillation rounds, publishing an update —
is refused with FAILED_PRECONDITION naming the bundle, and nothing already accepted is lost.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from device_agents.client import DeviceClient
from device_agents.drift import MahalanobisDrift, PageHinkley
from device_agents.errors import TransportError
from device_agents.outbox import OutboxSample, SqliteOutbox
from device_agents.selection import EntropyBandSelector, SelectorConfig
from device_agents.tta import create_tta_method, normalized_entropy
from edgeloop.admin import AdminClient
from edgeloop.data import default_data_dir
from exporter.foreign import wrap_onnx, wrap_tflite
from runtime import load_bundle
from runtime.bundle import golden_input, read_golden
from runtime.manifest import read_manifest
from runtime.predictor import Predictor
from runtime.update_codec import encode_full
from server.app import EdgeloopServer, ServerConfig, create_server
from server.errors import InvalidBundleError, InvalidTensorError, NoAdaptableParametersError
from server.manifest import FEATURES_ANY_WIDTH, FEATURES_UNDECLARED, bundle_spec
from server.updates import current_params, publish_update
from tests.server.server_testkit import FakeDistiller, make_bundle_files

ZOO = default_data_dir() / "models" / "onnx_zoo_mnist8.onnx"
RESNET8 = {"float32": default_data_dir() / "models" / "mlperf_tiny_resnet8_cifar10.tflite",
           "uint8": default_data_dir() / "models" / "mlperf_tiny_resnet8_cifar10_int8.tflite"}
MNIST = default_data_dir() / "mnist" / "mnist_test.npz"
ZOO_SPEC = {"name": "Input3", "shape": [1, 1, 28, 28], "dtype": "float32", "layout": "NCHW", "value_range": [0, 255]}
TINY_SPEC = {"name": "x", "shape": [-1, 1, 4, 4], "dtype": "float32", "layout": "NCHW", "value_range": [0, 1]}
TINY_LABELS = ["a", "b", "c"]
REFUSED = "has no adaptable parameters"


def _tiny_onnx(path: Path) -> Path:
    """x (N, 1, 4, 4) → Flatten → Gemm 16→8 → Relu → Gemm 8→3 → logits: a small foreign classifier."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.normal(0, 0.5, (16, 8))), ("b1", rng.normal(0, 0.1, 8)),
        ("w2", rng.normal(0, 0.5, (8, 3))), ("b2", rng.normal(0, 0.1, 3)))]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w1", "b1"], ["hidden"]),
             helper.make_node("Relu", ["hidden"], ["act"]),
             helper.make_node("Gemm", ["act", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny_foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _tiny_inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 4, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    """The publisher key of the wrapped bundles."""
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> Path:
    """The tiny classifier wrapped with features and source statistics (schema 2, no adaptable block)."""
    root = tmp_path_factory.mktemp("tiny")
    x = _tiny_inputs(96, 1)
    y = np.arange(96) % 3
    return wrap_onnx(_tiny_onnx(root / "tiny.onnx"), root / "bundle", labels=TINY_LABELS, input_spec=TINY_SPEC,
                     output_kind="logits", golden_x=x[:8], signing_key=key, name="tiny-foreign", source_x=x,
                     source_y=y)


@pytest.fixture(scope="module")
def zoo_bundle(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> tuple[Path, np.ndarray]:
    """The ONNX Model Zoo MNIST wrapped as ``edgeloop export --from-onnx`` does, and 64 MNIST test images."""
    missing = [str(p) for p in (ZOO, MNIST) if not p.is_file()]
    if missing:
        pytest.skip(f"shared data absent (see ../shared/data/README.md): {missing}")
    with np.load(MNIST) as npz:
        x, y = npz["x"].astype(np.float32)[:, None], npz["y"].astype(np.int64)
    out = tmp_path_factory.mktemp("zoo") / "bundle"
    bundle = wrap_onnx(ZOO, out, labels=[str(i) for i in range(10)], input_spec=ZOO_SPEC, output_kind="logits",
                       golden_x=x[:8], signing_key=key, name="onnx-zoo-mnist", source_x=x[-512:],
                       source_y=y[-512:])
    return bundle, x[100:164]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EdgeloopServer]:
    """A real server (fake distiller, so a distill round is refused for the bundle, not for a missing teacher)."""
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, grace_seconds=1.0)
    srv = create_server(cfg, distiller=FakeDistiller())
    srv.start()
    yield srv
    srv.stop(grace=1.0)


def _refused(exc: pytest.ExceptionInfo[Any], bundle_id: str) -> None:
    assert exc.value.code == "FAILED_PRECONDITION", exc.value
    assert bundle_id in exc.value.details and REFUSED in exc.value.details, exc.value.details


def _roll_out(srv: EdgeloopServer, bundle: Path, work: Path, x: np.ndarray, device_id: str) -> dict[str, Any]:
    """Publish ``bundle``, then be a device: enroll-free register, fetch, verify, predict, adapt, detect drift,
    select and upload; check each step against the local bundle. Returns what later checks need."""
    target = f"127.0.0.1:{srv.port}"
    manifest_bytes = (bundle / "manifest.json").read_bytes()
    with AdminClient(target) as admin:
        bundle_id = admin.publish_bundle(bundle, chunk_bytes=4096)
    assert bundle_id == hashlib.sha256(manifest_bytes).hexdigest()
    client = DeviceClient(target, device_id)
    info = client.register({"site": "lab"})
    assert info.bundle_id == bundle_id and info.latest_update_version == 0
    path = client.fetch_bundle(bundle_id, work / "bundles", class_statistics=True)
    manifest, _ = read_manifest(path)
    expected = {*manifest.files_for(manifest.default_model, class_statistics=True), "manifest.json", "manifest.sig"}
    assert {p.name for p in path.iterdir()} == expected  # only what the model needs (no export report)
    assert "export_report.json" not in expected
    fetched = load_bundle(path)  # sha256s, signature and golden outputs verified again
    assert not fetched.manifest.is_adaptable and fetched.model.graph == "folded"

    # predictions: equal to the bundle's own golden outputs and to a predictor on the publisher's copy
    predictor, local = Predictor(fetched), Predictor(load_bundle(bundle))
    golden_name = manifest.golden_file_of(fetched.model.name)
    recorded = read_golden(path, golden_name)
    gx = golden_input(recorded, golden_name)
    logits = recorded[f"{fetched.model.name}/{manifest.logits_output}"]
    atol, rtol = manifest.tolerance_of(fetched.model.name, manifest.logits_output)
    np.testing.assert_allclose(predictor.predict(gx).scores, logits, atol=atol, rtol=rtol)
    result = predictor.predict(x)
    np.testing.assert_array_equal(result.scores, local.predict(x).scores)
    assert result.features is not None and result.features.shape == (len(x), manifest.feature_dim)

    # TTA methods that read outputs, on the predictor
    for name in ("source", "lame", "t3a"):
        out = create_tta_method(name).predict(predictor, x)
        assert out.probs.shape == (len(x), len(manifest.labels)) and np.allclose(out.probs.sum(axis=1), 1.0)
        if name == "source":
            np.testing.assert_allclose(out.probs, result.probs, atol=1e-6)
    # drift on entropy (Page-Hinkley) and on features (Mahalanobis against the fetched class Gaussians)
    entropy = normalized_entropy(result.probs)
    ph = PageHinkley(min_instances=5, delta=0.01, threshold=50.0)
    assert not any(ph.update(float(e)).drift_detected for e in entropy)
    maha = MahalanobisDrift.from_bundle(fetched, window_size=4, ert=200, reference_size=len(x) // 2, n_runs=50,
                                        run_length=200)
    assert [maha.update(f).drift_detected for f in result.features].count(True) == 0
    event = client.report_drift("mahalanobis", "features", 1.5, 1.0, stream_position=len(x))
    assert event > 0

    # selective upload through the durable outbox, input and features
    selector = EntropyBandSelector(SelectorConfig(low=0.0, bytes_per_window=1 << 20))  # confident digits too
    chosen = selector.select(entropy, int(x[0].nbytes + result.features[0].nbytes))
    assert chosen.size > 0
    with SqliteOutbox(work / "outbox.sqlite3", max_bytes=1 << 20) as outbox:
        outbox.put([OutboxSample(f"{device_id}:{i}", bundle_id, x[i].astype(np.float32), result.features[i],
                                 float(entropy[i]),
                                 int(result.predictions[i]), int(i), 1000 + int(i)) for i in chosen])
        uploaded = client.upload(outbox)
        assert uploaded.stored == chosen.size and uploaded.retried == 0 and outbox.pending_count == 0
    return {"bundle_id": bundle_id, "client": client, "stored": int(chosen.size), "predictor": predictor,
            "feature_dim": manifest.feature_dim}


def _parameter_calls_refused(srv: EdgeloopServer, client: DeviceClient, bundle_id: str, feature_dim: int) -> None:
    """Every call that needs adaptable parameters: FAILED_PRECONDITION naming the bundle; nothing crashes."""
    params = {"features.weight": np.ones(feature_dim, np.float32)}
    with pytest.raises(TransportError) as exc:
        client.submit_update(bundle_id, 0, 16, params)
    _refused(exc, bundle_id)
    with pytest.raises(TransportError) as exc:
        client.submit_update(bundle_id, 0, 16, encoding="f32", payload=encode_full(params))
    _refused(exc, bundle_id)
    with pytest.raises(TransportError) as exc:
        client.pull_update(bundle_id, 0)
    _refused(exc, bundle_id)
    with pytest.raises(TransportError) as exc:
        list(client.watch_updates(bundle_id, 0, max_wait=0.1))
    _refused(exc, bundle_id)
    with AdminClient(f"127.0.0.1:{srv.port}") as admin:
        for kind in ("fedavg", "distill"):
            with pytest.raises(grpc.RpcError) as rpc:
                admin.start_round(kind)
            assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert bundle_id in rpc.value.details() and REFUSED in rpc.value.details()
        assert "distillation" in rpc.value.details()
    for call in (lambda: publish_update(srv.state, bundle_id, "distill", params),
                 lambda: current_params(srv.state, bundle_id)):
        with pytest.raises(NoAdaptableParametersError, match=REFUSED):
            call()
    assert not srv.state.storage.unused_submissions(bundle_id, "default")


def test_tiny_foreign_bundle_rolls_out_and_refuses_parameter_calls(
    server: EdgeloopServer, tiny_bundle: Path, tmp_path: Path
) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert "adaptable" not in manifest and manifest["schema_version"] == 2 and manifest["arch"] == "foreign"
    rolled = _roll_out(server, tiny_bundle, tmp_path / "dev", _tiny_inputs(48, 7), "cam-1")
    bundle_id, client = rolled["bundle_id"], rolled["client"]
    try:
        _parameter_calls_refused(server, client, bundle_id, rolled["feature_dim"])
        # the refusals lost nothing: the samples are there, and the device keeps uploading and reporting
        (device,) = [d for d in AdminClient(f"127.0.0.1:{server.port}").list_devices() if d.device_id == "cam-1"]
        assert device.samples_stored == rolled["stored"] and device.drift_events == 1
        assert device.acked_update_version == 0
        stored = server.state.storage.unused_samples(bundle_id, limit=1000, with_input=True)
        assert len(stored) == rolled["stored"] and all(s.features_blob for s in stored)
        x = _tiny_inputs(4, 9)
        out = rolled["predictor"].predict(x)
        with SqliteOutbox(tmp_path / "dev" / "outbox2.sqlite3", max_bytes=1 << 20) as outbox:
            outbox.put([OutboxSample(f"cam-1:late{i}", bundle_id, x[i], out.features[i], 0.5, 0, 100 + i, 5)
                        for i in range(4)])
            assert client.upload(outbox).stored == 4
        # a features vector of the wrong width is refused with the bundle's recorded width
        with SqliteOutbox(tmp_path / "dev" / "outbox3.sqlite3", max_bytes=1 << 20) as outbox:
            outbox.put([OutboxSample("cam-1:bad", bundle_id, None, np.zeros(3, np.float32), 0.5, 0, 200, 5)])
            with pytest.raises(TransportError, match=r"expected \(8,\)"):
                client.upload(outbox)
    finally:
        client.close()


def test_zoo_mnist_rolls_out_and_refuses_parameter_calls(
    server: EdgeloopServer, zoo_bundle: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    bundle, x = zoo_bundle
    rolled = _roll_out(server, bundle, tmp_path / "dev", x, "zoo-cam")
    client = rolled["client"]
    try:
        assert rolled["feature_dim"] == 256
        accuracy_ok = rolled["predictor"].predict(x).predictions  # the zoo model is a good MNIST classifier
        with np.load(MNIST) as npz:
            assert (accuracy_ok == npz["y"][100:164]).mean() >= 0.95
        _parameter_calls_refused(server, client, rolled["bundle_id"], rolled["feature_dim"])
    finally:
        client.close()


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_tflite_resnet8_rolls_out_and_refuses_parameter_calls(
    server: EdgeloopServer, key: Ed25519PrivateKey, tmp_path: Path, dtype: str
) -> None:
    """The MLPerf Tiny ResNet-8 (float and int8 TFLite, LiteRT on the device), wrapped as ``--from-tflite`` does
    (NHWC, 0-255, probabilities); random images stand in for CIFAR-10 here: what is checked is the roll-out."""
    model = RESNET8[dtype]
    if not model.is_file():
        pytest.skip(f"shared data absent (see ../shared/data/README.md): {model}")
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (40, 32, 32, 3)).astype(dtype)
    spec = {"name": "input_1" if dtype == "float32" else "input_1_int8", "shape": [-1, 32, 32, 3], "dtype": dtype,
            "layout": "NHWC", "value_range": [0, 255]}
    bundle = wrap_tflite(model, tmp_path / "bundle", labels=[str(i) for i in range(10)], input_spec=spec,
                         output_kind="probabilities", golden_x=x[:2], signing_key=key, name=f"resnet8-{dtype}",
                         source_x=x[:32], source_y=np.arange(32) % 10)
    rolled = _roll_out(server, bundle, tmp_path / "dev", x[32:], f"cam-{dtype}")
    try:
        _parameter_calls_refused(server, rolled["client"], rolled["bundle_id"], rolled["feature_dim"])
    finally:
        rolled["client"].close()


def test_adaptable_work_survives_a_foreign_rollout(server: EdgeloopServer, tiny_bundle: Path) -> None:
    """A submission accepted for an adaptable bundle stays when a foreign bundle becomes current: the fedavg
    round on the foreign one is refused, the old bundle's submission is still unused, and a device still on
    the adaptable bundle can keep submitting to it by id."""
    target = f"127.0.0.1:{server.port}"
    adaptable_dir = tiny_bundle.parent / "adaptable"
    adaptable_dir.mkdir(exist_ok=True)
    for path, data in make_bundle_files().items():
        (adaptable_dir / path).write_bytes(data)
    with AdminClient(target) as admin, DeviceClient(target, "old-cam") as client:
        old_id = admin.publish_bundle(adaptable_dir)
        client.register()
        params = {"bn1.mean": np.full(4, 0.5, np.float32)}
        first = client.submit_update(old_id, 0, 8, params)
        foreign_id = admin.publish_bundle(tiny_bundle)
        assert client.register().bundle_id == foreign_id
        with pytest.raises(grpc.RpcError) as rpc:
            admin.start_round("fedavg")
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and foreign_id in rpc.value.details()
        second = client.submit_update(old_id, 0, 8, params)
        kept = server.state.storage.unused_submissions(old_id, "default")
        assert [s.id for s in kept] == [first, second]
        assert server.state.storage.get_round(1) is None  # the refused StartRound recorded no round


# -- the manifest rules, directly -----------------------------------------------------------------------------
def _foreign_manifest(tiny_bundle: Path) -> dict[str, Any]:
    return json.loads((tiny_bundle / "manifest.json").read_text())


def test_spec_of_a_foreign_manifest(tiny_bundle: Path) -> None:
    manifest = _foreign_manifest(tiny_bundle)
    spec = bundle_spec(manifest)
    assert not spec.adaptable and spec.param_shapes == {} and spec.feature_dim == 8
    assert spec.input_shape == (-1, 1, 4, 4) and set(spec.files) == set(manifest["files"])
    no_stats = {k: v for k, v in manifest.items() if k != "source_statistics"}
    assert bundle_spec(no_stats).feature_dim == FEATURES_ANY_WIDTH
    assert bundle_spec(no_stats).check_features(np.ones((1, 5), np.float32), "f").shape == (5,)
    no_features = {**no_stats, "outputs": {**manifest["outputs"], "features": None}}
    spec = bundle_spec(no_features)
    assert spec.feature_dim == FEATURES_UNDECLARED
    with pytest.raises(InvalidTensorError, match="no features output"):
        spec.check_features(np.ones(8, np.float32), "sample 's1' features")
    v1 = {**no_stats, "schema_version": 1, "source_statistics": {"features": {"mean": [0.0] * 6, "var": [1.0] * 6}}}
    assert bundle_spec(v1).feature_dim == 6


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["models"][0].update(graph="adaptable"), "is adaptable but the manifest has no adaptable block"),
    (lambda m: m.update(trainable={"file": "golden_fp32.bin", "shapes": {"w": [2]}}), "'trainable' block needs"),
    (lambda m: m.update(models=[]), "manifest lists no models"),
    (lambda m: m["source_statistics"]["features"].update(dim=0), r"dim \(0\) positive"),
    (lambda m: m.update(adaptable={}), "adaptable.layers is missing"),  # a declared block: strict as before
    (lambda m: m.update(adaptable={"layers": [], "initial": {"file": "golden_fp32.bin"}}),
     "adaptable.layers must be a non-empty list"),
])
def test_foreign_manifest_errors_are_named(tiny_bundle: Path, edit: Any, message: str) -> None:
    manifest = _foreign_manifest(tiny_bundle)
    edit(manifest)
    with pytest.raises(InvalidBundleError, match=message):
        bundle_spec(manifest)
