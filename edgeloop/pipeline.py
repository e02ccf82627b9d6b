"""The jobs behind the CLI, as plain functions: train, export, evaluate, serve, run an agent.

Torch is imported only inside the functions that need it (train, export, serve's distiller).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

AUGMENT_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur",
    "contrast", "brightness", "pixelate", "jpeg_compression", "elastic_transform",
)


def corruption_augmenter(
    names: Sequence[str] = AUGMENT_CORRUPTIONS, severities: Sequence[int] = (1, 2, 3, 4, 5)
) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """An augmentation hook for training: one random corruption at a random severity per batch."""
    from edgeloop.data import corrupt

    def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        name = str(rng.choice(list(names)))
        severity = int(rng.choice(list(severities)))
        return corrupt(batch, name, severity, seed=int(rng.integers(0, 2**31 - 1)))

    return augment


def random_flip_crop(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The standard CIFAR augmentation: a random horizontal flip per image and a random crop of the image's
    size from a 4-pixel zero padding."""
    n, _, h, w = batch.shape
    flipped = np.where(rng.random(n)[:, None, None, None] < 0.5, batch[..., ::-1], batch)
    padded = np.pad(flipped, ((0, 0), (0, 0), (4, 4), (4, 4)))
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    return np.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)]).astype(np.float32)


def train_checkpoint(
    *, arch: str, dataset: str, out: Path, epochs: int = 15, batch_size: int = 64, lr: float = 3e-3,
    seed: int = 0, augment: bool = False, limit: int | None = None, threads: int | None = 1,
    flip_crop: bool = False,
) -> dict[str, Any]:
    """Train ``arch`` on ``dataset``'s train split, save a checkpoint at ``out``; return metrics.

    ``augment``: corruption augmentation (:func:`corruption_augmenter`); ``flip_crop``: :func:`random_flip_crop`
    (after the corruption when both are on), and the checkpoint's meta then declares the ``hflip`` input
    invariance, which ``edgeloop export`` writes into the bundle (FOA's mirrored view). Either applies to a
    random half of the batches (:class:`exporter.train.TrainConfig`)."""
    from edgeloop.data import load_dataset
    from exporter.checkpoint import save_checkpoint
    from exporter.train import TrainConfig, evaluate, train_model

    train = load_dataset(dataset, "train", limit=limit)
    test = load_dataset(dataset, "test")
    config = TrainConfig(
        arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment=augment or flip_crop,
        threads=threads,
    )
    steps = [f for f, on in ((corruption_augmenter(), augment), (random_flip_crop, flip_crop)) if on]

    def augment_fn(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for step in steps:
            batch = step(batch, rng)
        return batch

    model, spec, metrics = train_model(arch, train.x, train.y, config, augment_fn=augment_fn if steps else None)
    metrics = {**metrics, "test_accuracy": evaluate(model, test.x, test.y)}
    meta = {"dataset": dataset, "labels": list(train.labels), "augment": augment, "seed": seed, "epochs": epochs,
            **({"flip_crop": True, "invariances": ["hflip"]} if flip_crop else {})}
    metrics["sha256"] = save_checkpoint(model, arch, spec, out, {**meta, "metrics": metrics})
    metrics.update(arch=arch, dataset=dataset, out=str(out))
    log.info("trained %s on %s: test accuracy %.4f", arch, dataset, metrics["test_accuracy"])
    return metrics


def default_signing_key_path() -> Path:
    """``$EDGELOOP_SIGNING_KEY``, else ``~/.config/edgeloop/signing_key.pem``."""
    env = os.environ.get("EDGELOOP_SIGNING_KEY")
    return Path(env) if env else Path.home() / ".config" / "edgeloop" / "signing_key.pem"


def signing_key(path: Path | None = None, create: bool = True) -> Any:
    """Load the Ed25519 signing key at ``path`` (default :func:`default_signing_key_path`).

    A missing key is created (PEM, mode 0600, its public key beside it as ``PATH.pub``; logged) when ``create``
    is true, the default for callers that keep a key of their own beside their outputs. With ``create=False`` a
    missing key raises ``FileNotFoundError`` naming the path and how to create it: the CLI passes it for an
    explicit ``--signing-key``, where a typo must not sign a bundle with a fresh key no device trusts."""
    from exporter.signing import generate_key, load_private_key, public_path

    path = Path(path) if path is not None else default_signing_key_path()
    if not path.exists() and not create:
        raise FileNotFoundError(f"signing key {path} does not exist; create it with `edgeloop keygen --out {path}` "
                                f"and give devices its public key {public_path(path)}, or check the path for a typo")
    if not path.exists():
        key = generate_key(path)
        log.warning("created signing key %s (public key %s): give the public key to devices", path,
                    public_path(path))
        return key
    return load_private_key(path)


def trusted_keys(paths: Sequence[Path] | None) -> list[bytes] | None:
    """Raw public keys from PEM/raw files, or None when no paths are given (any valid signature)."""
    from runtime.signing import load_public_key

    return [load_public_key(Path(p)) for p in paths] if paths else None


def export_checkpoint(
    checkpoint: Path, *, out: Path, dataset: str | None = None, int8: bool = True,
    calibration_samples: int = 256, name: str | None = None, overwrite: bool = False, seed: int = 0,
    key_path: Path | None = None,
) -> Path:
    """Export a checkpoint to a bundle, with calibration, golden and source-statistics data from ``dataset``."""
    from edgeloop.data import load_dataset
    from exporter.bundle import export_bundle
    from exporter.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    dataset = dataset or info["meta"].get("dataset")
    if not dataset:
        raise ValueError(f"{checkpoint} records no dataset; pass --dataset")
    if calibration_samples < 8:
        raise ValueError(f"calibration_samples must be >= 8, got {calibration_samples}")
    train = load_dataset(dataset, "train")
    test = load_dataset(dataset, "test")
    rng = np.random.default_rng(seed)
    calib = train.x[rng.choice(len(train), size=min(calibration_samples, len(train)), replace=False)]
    golden = test.x[rng.choice(len(test), size=8, replace=False)]
    # source statistics describe the training distribution (test images feed the evaluation streams)
    source_idx = rng.choice(len(train), size=min(2048, len(train)), replace=False)
    return export_bundle(
        (model, info["arch"], info["spec"], info["sha256"]), out, labels=train.labels, calibration_x=calib,
        golden_x=golden, source_x=train.x[source_idx], source_y=train.y[source_idx], int8=int8,
        name=name or f"{info['arch']}-{dataset}", overwrite=overwrite, signing_key=signing_key(key_path),
    )


def evaluate_bundle(
    bundle: Path, *, dataset: str = "digits", corruption: str = "clean", severity: int = 3, tta: str = "source",
    model: str | None = None, backend: str = "auto", batch_size: int = 64, limit: int | None = None,
    threads: int | None = None, seed: int = 0, trusted: Sequence[Path] | None = None,
    tta_settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Accuracy of a verified bundle on ``dataset``'s test split, clean or corrupted, with a TTA method
    (``tta_settings``: ``KEY=VALUE`` settings of its config, :mod:`device_agents.tta.options`).

    Adaptable models run through any TTA method; folded and foreign models (no adaptable graph) run through a
    :class:`~runtime.predictor.Predictor` with the output-only methods, fed in their own layout, value range
    and dtype.
    """
    from device_agents.tta.options import create_configured
    from edgeloop.data import corrupt, load_dataset
    from runtime import load_bundle

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    method = create_configured(tta, tta_settings)  # a bad setting fails before the bundle is loaded
    loaded = load_bundle(bundle, model=model, backend=backend, threads=threads, trusted_keys=trusted_keys(trusted))
    predict = _batch_predictor(loaded, method)
    data = load_dataset(dataset, "test", limit=limit)
    x = data.x if corruption == "clean" else corrupt(data.x, corruption, severity, seed=seed)
    order = np.random.default_rng(seed).permutation(len(data))
    x, y = x[order], data.y[order]
    correct, started = 0, time.perf_counter()
    for start in range(0, len(y), batch_size):
        correct += int((predict(x[start : start + batch_size]) == y[start : start + batch_size]).sum())
    seconds = time.perf_counter() - started
    return {
        "bundle": str(bundle), "bundle_id": loaded.bundle_id, "model": loaded.model.name,
        "backend": loaded.model.backend,
        "dataset": dataset, "corruption": corruption, "severity": severity if corruption != "clean" else 0,
        "tta": tta, "tta_settings": dict(tta_settings or {}), "samples": len(y), "accuracy": correct / len(y),
        "batch_size": batch_size,
        "seconds": seconds,
    }


def _batch_predictor(loaded: Any, method: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function from [0, 1] NCHW batches to predicted class indices for the bundle's model, adapted by the
    TTA ``method``.

    Adaptable models run any TTA method; folded and foreign models run through a :class:`Predictor` in
    their own layout, range and dtype, with the output-only methods (``source``, ``lame``, ``t3a``).
    """
    from edgeloop.exporting import to_model_input
    from runtime import AdaptableModel
    from runtime.predictor import Predictor

    if loaded.model.graph == "adaptable":
        adaptable = AdaptableModel(loaded)
        return lambda x: method.adapt_and_predict(adaptable, x).logits.argmax(axis=1)
    spec, predictor = loaded.manifest.input, Predictor(loaded)
    method.check_model(predictor)
    return lambda x: method.adapt_and_predict(
        predictor, to_model_input(x, spec.layout, spec.value_range, spec.dtype)).logits.argmax(axis=1)


def serve(config: Any, bundle: Path | None = None) -> None:
    """Run the server for ``config`` (a :class:`~server.config.ServerConfig`) until SIGINT/SIGTERM,
    publishing the ``bundle`` directory first when given (in-process: no admin credential needed)."""
    from server.app import EdgeloopServer
    from server.app import serve as serve_forever
    from server.handlers import publish_bundle

    def on_started(srv: EdgeloopServer) -> None:
        if bundle is not None:
            root = Path(bundle)
            if not (root / "manifest.json").is_file():
                raise FileNotFoundError(f"{root} is not a bundle: manifest.json missing")
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
            print(f"published bundle {publish_bundle(srv.state, files).bundle_id}", flush=True)
        print(f"edgeloop server listening on {config.host}:{srv.port} (data in {config.data_dir})", flush=True)

    serve_forever(config, on_started=on_started)


def parse_domains(spec: str) -> list[Any]:
    """Parse ``"clean:0,gaussian_noise:4"`` into stream domains."""
    from edgeloop.data import Domain

    domains = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, sev = part.partition(":")
        try:
            severity = int(sev) if sev else (0 if name == "clean" else 3)
        except ValueError as exc:
            raise ValueError(f"domain {part!r}: severity {sev!r} is not an integer") from exc
        domains.append(Domain(name, severity))
    if not domains:
        raise ValueError(f"no domains in {spec!r}")
    return domains


# A device in the cloud loop runs classic one-pass α-BN (the current batch's statistics mixed with the
# reference by α): exactly the normalisation the server's distiller reproduces (ServerConfig.distill_alpha),
# so distilled parameters land where they were fitted. The library default (a running estimate of the test
# statistics, robust on class-sorted streams) normalises differently and would not match the distiller.
LOOP_ALPHA = 0.6


def agent_tta(name: str, settings: Mapping[str, str] | None = None) -> Any:
    """The TTA method an agent in the cloud loop runs: ``alpha_bn`` as classic one-pass α-BN at LOOP_ALPHA;
    ``settings`` (``KEY=VALUE``, :mod:`device_agents.tta.options`) applied on top."""
    from device_agents.tta import AlphaBNConfig
    from device_agents.tta.options import create_configured

    base = AlphaBNConfig(alpha=LOOP_ALPHA, batch_weight=1.0) if name == "alpha_bn" else None
    return create_configured(name, settings, base)


def connect_agent(
    server: str, device_id: str, work_dir: Path, *, tta: str = "alpha_bn", labels: dict[str, str] | None = None,
    outbox_bytes: int = 8 << 20, selector_bytes_per_window: int = 256 << 10, drift_threshold: float = 5.0,
    trusted_keys: Sequence[bytes] | None = None, enrollment_secret: str | None = None, tls: Any = None,
    detector: str = "page_hinkley", update_keys: Sequence[bytes] | None = None,
    tta_settings: Mapping[str, str] | None = None,
) -> Any:
    """Register with ``server``, download and verify its bundle (signed by one of ``trusted_keys`` when
    given), and build a ready :class:`Agent`: on the adaptable graph, or — for a bundle without one (a folded
    or wrapped foreign model) — on a :class:`~runtime.predictor.Predictor`, which serves the output-only TTA
    methods (``source``, ``lame``, ``t3a``; another is a :class:`ModelCapabilityError` naming the bundle) and
    has no parameter updates.

    Parameter updates must be signed by one of ``update_keys``; without them the device pins the update key
    the server announced at its first registration (``work_dir/update_key.pub``, trust on first use over the
    possibly TLS-verified channel) and refuses a server that later announces another.

    ``tls`` (:class:`device_agents.channel.TlsOptions`) turns on (mutual) TLS. With ``enrollment_secret`` the
    device enrolls once and keeps its token in ``work_dir/device.token`` (mode 0600) for later runs.

    What a restart must not lose is kept in ``work_dir/agent_state.sqlite3`` (:mod:`device_agents.state`):
    the applied update's parameters and versions and the reports not yet delivered. A later run in the same
    ``work_dir`` restores them, unless the server's update history no longer reaches the saved version.
    """
    from device_agents.agent import Agent, AgentConfig
    from device_agents.client import DeviceClient
    from device_agents.outbox import SqliteOutbox
    from device_agents.selection import EntropyBandSelector, SelectorConfig
    from device_agents.state import AgentStateStore
    from runtime import AdaptableModel, load_bundle
    from runtime.files import write_atomically
    from runtime.predictor import Predictor

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    token_file = work_dir / "device.token"
    # an empty file is no token: one left by an older version killed while it enrolled
    token = (token_file.read_text().strip() or None) if token_file.is_file() else None
    client = DeviceClient(server, device_id, trusted_keys=trusted_keys, token=token, tls=tls)
    try:
        if enrollment_secret is not None and token is None:
            write_atomically(token_file, client.enroll(enrollment_secret).encode())
        info = client.register(labels or {})
        if not info.bundle_id:
            raise RuntimeError(f"server {server} has no bundle published yet")
        path = client.fetch_bundle(info.bundle_id, work_dir / "bundles",
                                   class_statistics=needs_class_statistics(tta, detector))
        loaded = load_bundle(path, trusted_keys=trusted_keys)
        model = AdaptableModel(loaded) if loaded.model.graph == "adaptable" else Predictor(loaded)
        method = agent_tta(tta, tta_settings)
        method.check_model(model)
    except BaseException:
        client.close()
        raise
    selector = EntropyBandSelector(SelectorConfig(bytes_per_window=selector_bytes_per_window))
    opened: list[Any] = []
    try:
        keys = tuple(update_keys) if update_keys is not None else _pinned_update_key(work_dir,
                                                                                     info.update_public_key)
        config = AgentConfig(device_id=device_id, bundle_id=info.bundle_id, cohort=info.cohort, update_keys=keys)
        drift = make_detector(detector, model, drift_threshold)
        opened.append(SqliteOutbox(work_dir / "outbox.sqlite3", max_bytes=outbox_bytes))
        opened.append(AgentStateStore(work_dir / "agent_state.sqlite3"))
        return Agent(model, method, drift, selector, opened[0], client, config, state=opened[1],
                     server_version=info.latest_update_version)
    except BaseException:
        for resource in (*opened, client):
            resource.close()
        raise


def fresh_run_state(out: Path) -> None:
    """Create ``out`` and remove its ``server`` and ``devices`` directories: a fresh registry and fresh device
    state for each demo or simulation run (reproducible versions; a device would otherwise restore the update it
    applied in the previous run, :mod:`device_agents.state`)."""
    out.mkdir(parents=True, exist_ok=True)
    for owned in ("server", "devices"):
        if (out / owned).is_dir():
            shutil.rmtree(out / owned)


def _pinned_update_key(work_dir: Path, announced: bytes) -> tuple[bytes, ...] | None:
    """The pinned update key (pinning ``announced`` on first use); None when the server signs nothing."""
    from runtime.files import write_atomically

    pin = work_dir / "update_key.pub"
    if pin.is_file():
        pinned = pin.read_bytes()
        if announced and announced != pinned:
            raise RuntimeError(f"the server announces update key {announced.hex()[:16]}…, but {pin} pins "
                               f"{pinned.hex()[:16]}…; delete the pin to trust the new key")
        return (pinned,)
    if not announced:
        return None
    write_atomically(pin, announced)
    return (announced,)


def needs_class_statistics(tta: str, detector: str) -> bool:
    """Whether an agent running ``tta`` with ``detector`` reads the bundle's class-conditional statistics (a
    device fetches them only then: ``DeviceClient.fetch_bundle(..., class_statistics=True)``)."""
    return detector == "mahalanobis" or tta == "t3a"


def make_detector(name: str, model: Any, drift_threshold: float = 5.0) -> Any:
    """The agent's drift detector: Page-Hinkley on normalised entropy with the loop's settings (threshold
    ``drift_threshold``), ADWIN or KSWIN on entropy with their defaults, or a feature detector — MMD on feature
    windows, Mahalanobis against the bundle's class-conditional source Gaussians."""
    from device_agents.drift import MahalanobisDrift, PageHinkley, create_detector

    if name == "page_hinkley":
        return PageHinkley(min_instances=30, delta=0.02, threshold=drift_threshold, mode="both")
    if name == "mahalanobis":
        return MahalanobisDrift.from_bundle(model.bundle)
    if name == "mmd":  # reference: the first windows of features after each reset
        stats = model.manifest.source_feature_stats()
        if stats is None:
            raise ValueError("the mmd detector needs the feature dimension: the bundle records no feature statistics")
        return create_detector("mmd", reference=None, dim=len(stats[0]))
    return create_detector(name)  # unknown names: ValueError listing the registered ones


def run_agent(
    *, server: str, device_id: str, work_dir: Path, dataset: str = "digits", domains: str = "clean:0",
    samples_per_domain: int = 200, batch_size: int = 16, tta: str = "alpha_bn", seed: int = 0,
    sync_every: int = 4, trusted: Sequence[Path] | None = None, enrollment_secret: str | None = None,
    tls: Any = None, detector: str = "page_hinkley", tta_settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run an agent over a corrupted stream of ``dataset``, syncing with the server every few batches."""
    from edgeloop.data import build_stream, iter_batches, load_dataset
    from edgeloop.exporting import to_model_input

    for name, value in (("batch_size", batch_size), ("sync_every", sync_every)):
        if value < 1:  # before the agent registers and downloads the bundle
            raise ValueError(f"{name} must be >= 1, got {value}")
    stream = build_stream(load_dataset(dataset, "test"), parse_domains(domains), samples_per_domain, seed=seed)
    agent_tta(tta, tta_settings)  # a bad setting fails before the agent connects
    agent = connect_agent(server, device_id, work_dir, tta=tta, trusted_keys=trusted_keys(trusted),
                          enrollment_secret=enrollment_secret, tls=tls, detector=detector, tta_settings=tta_settings)
    try:
        spec = agent.model.manifest.input  # a foreign model is fed in its own layout, value range and dtype
        feed = (lambda x: x) if agent.adaptable else (lambda x: to_model_input(x, spec.layout, spec.value_range,
                                                                               spec.dtype))
        agent.sync()
        for i, (start, x, y) in enumerate(iter_batches(stream, batch_size)):
            agent.process_batch(feed(x), y, position=start)
            if (i + 1) % sync_every == 0:
                agent.sync()
        agent.sync(wait_seconds=0.5)
        stats = agent.stats
    finally:
        close_agent(agent)
    return {
        "device_id": device_id, "samples": stats.samples_seen, "accuracy": stats.accuracy,
        "drift_points": list(stream.drift_points), "drift_detected": list(stats.drift_positions),
        "uploaded_samples": stats.uploaded_samples, "bytes_up": stats.uploaded_bytes,
        "bytes_down": stats.downloaded_bytes, "update_versions": list(stats.update_versions),
        "version": agent.version, "active_version": agent.active_version,
        "restored": asdict(agent.restored),  # what this run took over from the work dir's state
    }


def close_agent(agent: Any) -> None:
    """Stop an agent built by :func:`connect_agent` and close its outbox, state store and client."""
    agent.close()
    for resource in (agent.outbox, agent.state, agent.client):
        if resource is not None:
            resource.close()
