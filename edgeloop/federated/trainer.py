"""Local-SGD trainer devices (simulation only; torch is imported when a trainer is built).

A :class:`LocalSGDTrainer` holds a torch model of a registered architecture (:mod:`exporter.models`) and one
client's partition. Each :meth:`~LocalSGDTrainer.train_round` loads the global parameters it is given, runs
``epochs`` local epochs of plain SGD (McMahan et al. 2017, FedAvg's ClientUpdate) and returns its trainable
weights and sample count — what a device submits to federated averaging. Shuffling is seeded per client and
round, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeloop.federated.weights import load_trainable, trainable_state


@dataclass(frozen=True)
class TrainerConfig:
    """Local training: ``epochs`` passes of SGD (``lr``, ``momentum``, ``weight_decay``) in ``batch_size`` batches."""

    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs {self.epochs} and batch_size {self.batch_size} must be >= 1")
        if not (np.isfinite(self.lr) and self.lr > 0) or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"lr {self.lr} must be > 0, momentum {self.momentum} in [0, 1), weight_decay >= 0")


def model_spec_for(x: np.ndarray, num_classes: int) -> Any:
    """An :class:`exporter.models.ModelSpec` for NCHW images ``x`` in [0, 1] (per-channel mean/std of ``x``)."""
    from exporter.models import ModelSpec

    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"x must be square NCHW images, got shape {x.shape}")
    mean = tuple(float(v) for v in x.mean(axis=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in x.std(axis=(0, 2, 3)))
    return ModelSpec(int(x.shape[1]), int(num_classes), int(x.shape[2]), mean, std)


class LocalSGDTrainer:
    """One simulated trainer device: a torch model of ``arch`` (``spec``) and its data ``x`` (N, C, H, W) in
    [0, 1], ``y`` (N,) class ids."""

    def __init__(self, arch: str, x: np.ndarray, y: np.ndarray, config: TrainerConfig | None = None, *,
                 spec: Any = None, client_id: int = 0) -> None:
        """Build the model (torch is imported here). ``client_id`` seeds the shuffling with ``config.seed``."""
        import torch

        from exporter.models import build_model

        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y)
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x must be (N, C, H, W) and y (N,) with N > 0, got {x.shape} and {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ValueError("y must hold non-negative integer class ids")
        self.config = config or TrainerConfig()
        self.spec = spec if spec is not None else model_spec_for(x, int(y.max()) + 1)
        if int(y.max()) >= self.spec.num_classes:
            raise ValueError(f"label {int(y.max())} is outside the model's {self.spec.num_classes} classes")
        self.arch = arch
        self.client_id = int(client_id)
        self.model = build_model(arch, self.spec)
        self._x = torch.from_numpy(x)
        self._y = torch.from_numpy(y.astype(np.int64))
        self.rounds = 0

    @property
    def num_samples(self) -> int:
        """Size of the local partition (the weight in FedAvg)."""
        return len(self._y)

    def train_round(self, global_params: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Load ``global_params`` (every trainable name; others, e.g. adaptable ones, are ignored), train
        ``epochs`` local epochs and return ``(trainable weights, num_samples)``."""
        import torch
        import torch.nn.functional as F

        cfg = self.config
        load_trainable(self.model, global_params)
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [cfg.seed, self.client_id, self.rounds]).generate_state(1)[0]))
        n = self.num_samples
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(self._x[idx]), self._y[idx])
                loss.backward()
                opt.step()
        self.rounds += 1
        self.model.eval()
        return trainable_state(self.model), n


def evaluate(arch: str, spec: Any, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
             batch_size: int = 256, threads: int | None = None) -> float:
    """Top-1 accuracy of ``arch`` with ``params`` on ``(x, y)`` (central evaluation), with ``threads`` torch
    threads for its duration (None: as set); ``x`` and ``y`` are checked before the model runs
    (:func:`exporter.train.evaluate`)."""
    import torch

    from exporter.models import build_model
    from exporter.train import evaluate as evaluate_model

    model = build_model(arch, spec)
    load_trainable(model, params)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return evaluate_model(model, x, y, batch_size)
    finally:
        torch.set_num_threads(before)
