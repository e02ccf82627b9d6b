"""A federated-learning run through the real server: a server on 127.0.0.1:0 (real SQLite under a temporary
directory) with a bundle that carries trainable weights, clients as in-process threads speaking gRPC over
loopback (:class:`~edgeloop.federated.device.FederatedDevice` with a
:class:`~edgeloop.federated.trainer.LocalSGDTrainer` each), seeded client sampling, aggregation by the server's
round runner (``aggregator``), central evaluation after every round, bytes counted per message.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.fleet.byzantine import ATTACKS
from edgeloop.data.partition import dirichlet_partition
from edgeloop.federated.device import FederatedDevice
from edgeloop.federated.trainer import LocalSGDTrainer, TrainerConfig, evaluate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederatedConfig:
    """One run: ``clients`` devices (Dirichlet(``alpha``) label skew, ``seed``), ``per_round`` sampled per round
    (seeded), ``rounds`` rounds of local SGD (``trainer``); ``encoding``/``topk_fraction`` for both directions;
    ``aggregator`` (+ options) on the server; ``byzantine_fraction`` of the clients (the first ones of a seeded
    permutation) submit ``attack``-ed updates; ``workers`` client threads train at once; central evaluation
    uses ``eval_threads`` torch threads (None: as set)."""

    rounds: int = 20
    clients: int = 100
    per_round: int = 10
    alpha: float = 0.5
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    encoding: str = "f32"
    topk_fraction: float = 0.05
    aggregator: str = "fedavg"
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    byzantine_fraction: float = 0.0
    attack: str = "sign_flip"
    attack_scale: float | None = None
    workers: int = 2
    eval_threads: int | None = 2
    round_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.per_round <= self.clients or self.rounds < 1:
            raise ValueError(f"need 0 < per_round ({self.per_round}) <= clients ({self.clients}) and rounds >= 1")
        if not 0 <= self.byzantine_fraction < 1:
            raise ValueError(f"byzantine_fraction {self.byzantine_fraction} must be in [0, 1)")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha (the Dirichlet concentration) must be a positive finite number, got {self.alpha}")
        # checked here, not when the first byzantine device is sampled: that can be rounds into the run, whose
        # results were then lost with the error
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown byzantine attack {self.attack!r}; known: {sorted(ATTACKS)}")
        if self.attack_scale is not None and not (math.isfinite(self.attack_scale) and self.attack_scale > 0):
            raise ValueError(f"attack_scale must be a positive finite number, got {self.attack_scale}")
        from server.aggregation import check_aggregator

        check_aggregator(self.aggregator, self.aggregator_options)  # before the bundle is exported


def load_uint8(dataset: str, data_dir: Path | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test images of ``dataset`` as uint8 (N, C, H, W) and int64 labels (trainers divide by 255)."""
    from edgeloop.data.datasets import load_dataset

    tr, te = load_dataset(dataset, "train", data_dir), load_dataset(dataset, "test", data_dir)
    to_u8 = lambda a: np.clip(np.rint(np.asarray(a, np.float32) * 255.0), 0, 255).astype(np.uint8)  # noqa: E731
    return to_u8(tr.x), np.asarray(tr.y, np.int64), to_u8(te.x), np.asarray(te.y, np.int64)


def seeded_bundle(arch: str, x: np.ndarray, num_classes: int, seed: int, out: Path) -> tuple[Path, Any]:
    """The seeded, untrained ``arch`` exported as a bundle with trainable weights (fp32 ONNX, no int8), from
    uint8 images ``x`` (normalisation statistics, golden and source samples); returns the bundle and spec."""
    import torch

    from edgeloop.federated.trainer import model_spec_for
    from exporter.bundle import export_bundle
    from exporter.models import build_model

    xf = x.astype(np.float32) / 255.0
    spec = model_spec_for(xf[:10000], num_classes)
    torch.manual_seed(seed)
    model = build_model(arch, spec).eval()
    bundle = export_bundle((model, arch, spec, "0" * 64), out, labels=[str(i) for i in range(num_classes)],
                           calibration_x=xf[:16], golden_x=xf[:2], source_x=xf[:256], int8=False, overwrite=True,
                           trainable=True)
    return bundle, spec


def run_federated(bundle_dir: Path, arch: str, spec: Any, train: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], config: FederatedConfig, work_dir: Path | None = None
                  ) -> dict[str, Any]:
    """Run ``config`` against a fresh server publishing ``bundle_dir``; return accuracy per round, wall time
    and bytes (per message kind and in total, from the devices' counters)."""
    from device_agents.client import DeviceClient
    from edgeloop.admin import AdminClient
    from runtime.manifest import read_manifest
    from server.app import EdgeloopServer
    from server.config import ServerConfig
    from server.updates import current_params

    x, y = train
    parts = dirichlet_partition(y, config.clients, config.alpha, seed=config.seed)
    manifest, _ = read_manifest(Path(bundle_dir))
    initial = {**manifest.initial_params, **manifest.trainable_params(Path(bundle_dir))}
    rng = np.random.default_rng(config.seed)
    n_bad = round(config.byzantine_fraction * config.clients)
    bad = set(np.random.default_rng(config.seed + 1).permutation(config.clients)[:n_bad].tolist())
    tmp = tempfile.TemporaryDirectory(prefix="edgeloop-fl-", dir=work_dir)
    server_cfg = ServerConfig(data_dir=Path(tmp.name) / "server", host="127.0.0.1", port=0, max_workers=16,
                              update_encoding=config.encoding,
                              update_topk_fraction=config.topk_fraction, aggregator=config.aggregator,
                              aggregator_options=dict(config.aggregator_options))
    server = EdgeloopServer(server_cfg)
    devices: list[FederatedDevice] = []
    try:
        port = server.start()
        target = f"127.0.0.1:{port}"
        with AdminClient(target) as admin:
            bundle_id = admin.publish_bundle(Path(bundle_dir))
        for i in range(config.clients):
            client = DeviceClient(target, f"dev-{i:03d}", timeout=60.0)
            info = client.register()
            trainer = LocalSGDTrainer(arch, x[parts[i]], y[parts[i]], config.trainer, spec=spec, client_id=i)
            devices.append(FederatedDevice(
                client, bundle_id, initial, trainer.train_round, encoding=config.encoding,
                topk_fraction=config.topk_fraction,
                trusted_keys=[info.update_public_key] if info.update_public_key else None,
                byzantine=config.attack if i in bad else None, attack_scale=config.attack_scale, seed=config.seed + i))
        history: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=config.workers) as pool:
            for r in range(1, config.rounds + 1):
                chosen = sorted(rng.choice(config.clients, config.per_round, replace=False).tolist())
                t_clients = time.perf_counter()
                list(pool.map(lambda i: devices[i].contribute(), chosen))
                t_round = time.perf_counter()
                record = server.runner.wait(server.runner.start("fedavg").round_id, timeout=config.round_timeout_s)
                if record.state != "done":
                    raise RuntimeError(f"round {r} ended {record.state}: {record.error}")
                t_eval = time.perf_counter()
                params, version = current_params(server.state, bundle_id)
                acc = evaluate(arch, spec, params, *test, threads=config.eval_threads)
                t_end = time.perf_counter()
                history.append({"round": r, "accuracy": acc, "clients": chosen, "version": version,
                                "elapsed_s": t_end - t0, "clients_s": t_round - t_clients,
                                "aggregate_s": t_eval - t_round, "evaluate_s": t_end - t_eval,
                                "byzantine_in_round": sum(i in bad for i in chosen)})
                logger.info("round %d: accuracy %.4f (%.1fs)", r, acc, t_end - t0)
        wall = time.perf_counter() - t0
        traffic = _traffic(devices)
    finally:
        for d in devices:
            d.client.close()
        server.stop(grace=1.0)
        tmp.cleanup()
    return {"config": {**asdict(config), "trainer": asdict(config.trainer)},
            "accuracy": [h["accuracy"] for h in history], "rounds": history,
            "wall_s": wall, "byzantine_clients": sorted(bad), **traffic}


def _traffic(devices: list[FederatedDevice]) -> dict[str, Any]:
    up = [0, 0]
    down = [0, 0]
    for d in devices:
        t = d.client.traffic()
        sub, pull = t.get("SubmitUpdate", {}), t.get("PullUpdate", {})
        up[0] += sub.get("messages_up", 0)
        up[1] += sub.get("bytes_up", 0)
        down[0] += pull.get("messages_down", 0)
        down[1] += pull.get("bytes_down", 0)
    total_msgs = up[0] + down[0]
    return {"bytes_up": up[1], "bytes_down": down[1], "messages_up": up[0], "messages_down": down[0],
            "bytes_total": up[1] + down[1],
            "bytes_per_upload": up[1] / max(1, up[0]), "bytes_per_download": down[1] / max(1, down[0]),
            "bytes_per_message": (up[1] + down[1]) / max(1, total_msgs)}
