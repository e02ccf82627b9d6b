"""A short supervised fine-tune that drives a compression pass's ``step`` hook (AdamW, cosine schedule, CPU).

The same loop recovers accuracy after N:M masking (the pass's ``step`` moves masks and gradient flow along
its schedule) and after low-rank factorization (``step`` does nothing; the factors simply train).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.compress.base import CompressionPass
from exporter.train import check_counts, check_images, check_labels, check_rates, check_trainable_count, torch_threads

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineTuneConfig:
    """Options of :func:`fine_tune`: ``epochs`` over the data, AdamW ``lr``/``weight_decay``, ``batch_size``,
    ``seed`` (shuffling), ``threads`` (torch intra-op threads; 1 is fastest for small models on shared CPUs)."""

    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        check_counts(self)
        check_rates(self)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [c for c in chunks if len(c) >= 2]  # a 1-sample batch breaks train-mode BatchNorm


def fine_tune(
    model: nn.Module, compression: CompressionPass, x: np.ndarray, y: np.ndarray, config: FineTuneConfig
) -> dict[str, Any]:
    """Fine-tune a prepared ``model`` on ``(x, y)`` with cross-entropy, calling ``compression.step(progress)``
    after every optimizer step; leave the model in eval mode and return ``{epochs, steps, loss, seconds}``.

    The metrics are also attached to the pass's report under ``fine_tune``.
    """
    x = check_images(x, "fine-tune x")
    check_trainable_count(x, "fine-tune x")
    y = check_labels(y, len(x))
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = len(_batches(len(x), config.batch_size, np.random.default_rng(0)))
    total = max(steps_per_epoch * config.epochs, 1)
    start, done, loss_value = time.perf_counter(), 0, float("nan")
    with torch_threads(config.threads):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        model.train()
        for _ in range(config.epochs):
            for idx in _batches(len(x), config.batch_size, rng):
                loss = nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                done += 1
                compression.step(min(done / total, 1.0))
                loss_value = float(loss.detach())
        model.eval()
    metrics = {"epochs": config.epochs, "steps": done, "loss": loss_value,
               "seconds": round(time.perf_counter() - start, 3)}
    compression.note("fine_tune", metrics)
    logger.info("%s fine-tune: %d steps, final loss %.4f", compression.name, done, loss_value)
    return metrics
