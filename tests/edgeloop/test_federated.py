"""Local-SGD trainer devices and full-model federated averaging through a real server over gRPC (digits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from device_agents.client import DeviceClient  # noqa: E402
from edgeloop.admin import AdminClient  # noqa: E402
from edgeloop.data.datasets import load_dataset  # noqa: E402
from edgeloop.federated.device import FederatedDevice  # noqa: E402
from edgeloop.federated.trainer import LocalSGDTrainer, TrainerConfig, evaluate, model_spec_for  # noqa: E402
from edgeloop.federated.weights import load_trainable, trainable_names, trainable_state  # noqa: E402
from exporter.bundle import export_bundle  # noqa: E402
from exporter.models import build_model  # noqa: E402
from runtime.manifest import read_manifest  # noqa: E402
from runtime.params import params_digest  # noqa: E402
from server.app import EdgeloopServer, ServerConfig  # noqa: E402
from server.updates import current_params  # noqa: E402

ARCH = "small_cnn"


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Single-threaded torch (the machine has 2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits train/test as float32 NCHW in [0, 1] and int64 labels."""
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    return (np.asarray(tr.x, np.float32), np.asarray(tr.y, np.int64), np.asarray(te.x, np.float32),
            np.asarray(te.y, np.int64))


@pytest.fixture(scope="module")
def trainable_bundle(digits: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A seeded small_cnn exported with its trainable weights (fp32 only)."""
    x = digits[0]
    spec = model_spec_for(x, 10)
    torch.manual_seed(0)
    model = build_model(ARCH, spec).eval()
    out = export_bundle((model, ARCH, spec, "0" * 64), tmp_path_factory.mktemp("fl") / "bundle",
                        labels=[str(i) for i in range(10)], calibration_x=x[:16], golden_x=x[:2], source_x=x[:64],
                        int8=False, trainable=True)
    return out, spec


def test_exported_trainable_weights_match_the_model(trainable_bundle: tuple) -> None:
    bundle, spec = trainable_bundle
    manifest, _ = read_manifest(bundle)
    assert manifest.trainable is not None and manifest.trainable.architecture == ARCH
    weights = manifest.trainable_params(bundle)
    torch.manual_seed(0)
    fresh = build_model(ARCH, spec)
    assert set(weights) == set(trainable_names(fresh))
    assert all(np.array_equal(weights[k], v) for k, v in trainable_state(fresh).items())
    assert "features.1.running_var" in weights and not any("input_mean" in k for k in weights)
    assert not set(weights) & set(manifest.initial_params)  # disjoint from the adaptable names


@pytest.mark.slow
def test_trainer_round_is_reproducible_and_learns(digits: tuple, trainable_bundle: tuple) -> None:
    x, y, xt, yt = digits
    _, spec = trainable_bundle
    cfg = TrainerConfig(epochs=2, lr=0.05, batch_size=32, seed=3)
    a = LocalSGDTrainer(ARCH, x[:400], y[:400], cfg, spec=spec, client_id=1)
    b = LocalSGDTrainer(ARCH, x[:400], y[:400], cfg, spec=spec, client_id=1)
    start = trainable_state(a.model)
    pa, na = a.train_round(start)
    pb, _ = b.train_round(start)
    assert na == 400 and set(pa) == set(start)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)  # same seed, client, round: same result
    assert any(not np.array_equal(pa[k], start[k]) for k in pa)
    assert evaluate(ARCH, spec, pa, xt, yt) > evaluate(ARCH, spec, start, xt, yt) + 0.2


def test_trainer_and_weights_reject_bad_input(digits: tuple, trainable_bundle: tuple) -> None:
    x, y, _, _ = digits
    _, spec = trainable_bundle
    with pytest.raises(ValueError, match="epochs"):
        TrainerConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainerConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="x must be"):
        LocalSGDTrainer(ARCH, x[:10, 0], y[:10], spec=spec)
    with pytest.raises(ValueError, match="integer"):
        LocalSGDTrainer(ARCH, x[:10], y[:10].astype(np.float32), spec=spec)
    trainer = LocalSGDTrainer(ARCH, x[:10], y[:10], spec=spec)
    state = trainable_state(trainer.model)
    with pytest.raises(ValueError, match="lack trainable"):
        trainer.train_round({k: v for k, v in state.items() if k != "classifier.bias"})
    bad = dict(state, **{"classifier.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"classifier\.bias"):
        load_trainable(trainer.model, bad)
    with pytest.raises(ValueError, match=r"y must have shape \(10,\)"):  # central evaluation checks first too
        evaluate(ARCH, spec, state, x[:10], y[:9])
    with pytest.raises(ValueError, match="y must lie in"):
        evaluate(ARCH, spec, state, x[:10], y[:10] + 10)


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["f32", "int8_topk_delta"])
def test_trainer_devices_average_over_grpc(digits: tuple, trainable_bundle: tuple, tmp_path: Path,
                                           encoding: str) -> None:
    x, y, xt, yt = digits
    bundle, spec = trainable_bundle
    cfg = ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, update_encoding=encoding,
                       update_topk_fraction=0.2)
    srv = EdgeloopServer(cfg)
    srv.start()
    target = f"127.0.0.1:{srv.port}"
    try:
        with AdminClient(target) as admin:
            bundle_id = admin.publish_bundle(bundle)
        manifest, _ = read_manifest(bundle)
        initial = {**manifest.initial_params, **manifest.trainable_params(bundle)}
        devices = []
        for i in range(3):
            client = DeviceClient(target, f"trainer-{i}")
            key = client.register().update_public_key
            trainer = LocalSGDTrainer(ARCH, x[i * 300:(i + 1) * 300], y[i * 300:(i + 1) * 300],
                                      TrainerConfig(lr=0.05), spec=spec, client_id=i)
            devices.append(FederatedDevice(client, bundle_id, initial, trainer.train_round, encoding=encoding,
                                           topk_fraction=0.2, trusted_keys=[key]))
        accuracies = []
        for _ in range(2):
            for d in devices:
                d.contribute()
            record = srv.runner.wait(srv.runner.start("fedavg").round_id, timeout=60)
            assert record.state == "done", record.error
            params, version = current_params(srv.state, bundle_id)
            accuracies.append(evaluate(ARCH, spec, params, xt, yt))
        assert version == 2
        assert accuracies[-1] > 0.3  # chance is 0.1
        assert np.array_equal(params["bn1.weight"], initial["bn1.weight"])  # trainers leave adaptable ones be
        d = devices[0]
        assert d.sync() and d.held_version == 2 and params_digest(d.held) == d.held_sha256
        if encoding == "f32":
            assert all(np.array_equal(d.held[k], params[k]) for k in params)
        traffic = d.client.traffic()
        full = sum(v.nbytes for v in manifest.trainable_params(bundle).values())
        per_upload = traffic["SubmitUpdate"]["bytes_up"] / traffic["SubmitUpdate"]["messages_up"]
        assert (per_upload > full) if encoding == "f32" else (per_upload < full / 3)
        for dev in devices:
            dev.client.close()
    finally:
        srv.stop(grace=1.0)


def test_byzantine_device_submits_the_attacked_delta(digits: tuple, trainable_bundle: tuple, tmp_path: Path) -> None:
    from edgeloop.federated.experiment import FederatedConfig
    from server.codec import decode_arrays

    x, y, _, _ = digits
    bundle, spec = trainable_bundle
    with pytest.raises(ValueError, match="per_round"):
        FederatedConfig(clients=3, per_round=4)
    with pytest.raises(ValueError, match="byzantine_fraction"):
        FederatedConfig(byzantine_fraction=1.0)
    srv = EdgeloopServer(ServerConfig(data_dir=tmp_path / "data", port=0, max_workers=8, update_encoding="f32"))
    srv.start()
    try:
        target = f"127.0.0.1:{srv.port}"
        with AdminClient(target) as admin:
            bundle_id = admin.publish_bundle(bundle)
        manifest, _ = read_manifest(bundle)
        initial = {**manifest.initial_params, **manifest.trainable_params(bundle)}
        honest_trainer = LocalSGDTrainer(ARCH, x[:200], y[:200], spec=spec, client_id=7)
        honest, _ = LocalSGDTrainer(ARCH, x[:200], y[:200], spec=spec, client_id=7).train_round(initial)
        client = DeviceClient(target, "evil")
        client.register()
        evil = FederatedDevice(client, bundle_id, initial, honest_trainer.train_round, byzantine="sign_flip",
                               attack_scale=4.0)
        evil.contribute()
        (sub,) = srv.state.storage.unused_submissions(bundle_id)
        sent = decode_arrays(srv.state.blobs.get(sub.blob))
        for k in ("classifier.weight", "features.0.weight"):
            np.testing.assert_allclose(sent[k] - initial[k], -4.0 * (honest[k] - initial[k]), atol=1e-5)
        client.close()
    finally:
        srv.stop(grace=1.0)
