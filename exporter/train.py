"""Supervised training of registered architectures on numpy image arrays (CPU, deterministic).

Data are float32 NCHW batches in [0, 1] with int64 labels, as produced by ``edgeloop.data.load_dataset``.
The data spec (channels, image size, per-channel mean/std) is derived from the training data unless given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.models import ARCHITECTURES, ModelSpec, build_model
from exporter.statistics import check_labels
from runtime.checks import is_finite_number, require_int, require_optional_int

logger = logging.getLogger(__name__)

AugmentFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    ``augment`` turns on corruption augmentation (for teachers): a random half of the batches is passed
    through the ``augment_fn`` given to :func:`train_model`. ``threads``: torch intra-op threads during
    training (None keeps torch's setting). On a small shared CPU one thread is often far faster for small
    models: measured on 2 contended cores, digits small_cnn took 0.8–3 s with 1 thread and 10–37 s with 2.
    """

    arch: str = "small_cnn"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; registered: {sorted(ARCHITECTURES)}")
        check_counts(self)
        check_rates(self)


def check_counts(config: Any) -> None:
    """Validate the integer fields ``epochs``, ``batch_size``, ``seed`` and ``threads`` that :class:`TrainConfig`
    and the fine-tune config share (a bool or a float is refused, naming the field) and store them as ints."""
    counts = {"epochs": require_int("epochs", config.epochs, 1),
              "batch_size": require_int("batch_size", config.batch_size, 2, why="BatchNorm needs 2 samples"),
              "seed": require_int("seed", config.seed, 0),
              "threads": require_optional_int("threads", config.threads, 1)}
    for name, value in counts.items():  # numpy integers become ints (frozen dataclasses: set past the guard)
        object.__setattr__(config, name, value)


def check_rates(config: Any) -> None:
    """Validate ``lr`` (positive) and ``weight_decay`` (>= 0): finite real numbers, not bools or strings."""
    if not (is_finite_number(config.lr) and config.lr > 0):
        raise ValueError(f"lr must be positive and finite, got {config.lr!r}")
    if not (is_finite_number(config.weight_decay) and config.weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0 and finite, got {config.weight_decay!r}")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block (None: unchanged), restoring it afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


def check_images(x: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate a float NCHW batch of finite values in [0, 1]; return it as contiguous float32."""
    arr = np.asarray(x)
    if arr.ndim != 4 or arr.shape[0] < 1:
        raise ValueError(f"{what} must be a non-empty (N, C, H, W) array, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(f"{what} must be floating point in [0, 1], got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contain NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{what} must lie in [0, 1], got range [{lo}, {hi}]")
    return arr


def check_trainable_count(x: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` unless ``x`` holds at least 2 samples: batches of one are skipped (train-mode
    BatchNorm needs 2), so a single sample would train nothing."""
    if len(x) < 2:
        raise ValueError(f"{what} needs at least 2 samples (train-mode BatchNorm), got {len(x)}")


def spec_from_data(x: np.ndarray, y: np.ndarray) -> ModelSpec:
    """Derive a :class:`ModelSpec` from square NCHW images and labels (per-channel mean/std over N, H, W)."""
    x = check_images(x, "train_x")
    y = check_labels(y, x.shape[0])
    _, c, h, w = x.shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(x.std(axis=(0, 2, 3), dtype=np.float64), 1e-3)
    return ModelSpec(c, max(int(y.max()) + 1, 2), h, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [c for c in chunks if len(c) >= 2]  # a 1-sample batch breaks train-mode BatchNorm


def _augmented(xb: np.ndarray, augment_fn: AugmentFn, rng: np.random.Generator) -> np.ndarray:
    out = np.asarray(augment_fn(xb, rng), dtype=np.float32)
    if out.shape != xb.shape:
        raise ValueError(f"augment_fn changed the batch shape from {xb.shape} to {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError("augment_fn returned NaN or infinite values")
    return out


def _run_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    data: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
    rng: np.random.Generator,
    augment_fn: AugmentFn | None,
) -> tuple[float, float, int]:
    x, y = data
    loss_sum, correct, seen = 0.0, 0, 0
    for idx in _batches(len(x), config.batch_size, rng):
        xb = x[idx]
        if augment_fn is not None and rng.random() < 0.5:
            xb = _augmented(xb, augment_fn, rng)
        xt, yt = torch.from_numpy(xb), torch.from_numpy(y[idx])
        logits = model(xt)
        loss = nn.functional.cross_entropy(logits, yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach()) * len(idx)
        correct += int((logits.detach().argmax(1) == yt).sum())
        seen += len(idx)
    return loss_sum / seen, correct / seen, seen


def _fit(
    arch: str, spec: ModelSpec, data: tuple[np.ndarray, np.ndarray], config: TrainConfig, aug: AugmentFn | None
) -> tuple[nn.Module, float, float, int]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_model(arch, spec)
    model.train()
    steps_per_epoch = len(_batches(len(data[0]), config.batch_size, np.random.default_rng(0)))
    total = max(steps_per_epoch * config.epochs, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    loss, acc = float("nan"), float("nan")
    for epoch in range(config.epochs):
        loss, acc, _ = _run_epoch(model, opt, sched, data, config, rng, aug)
        logger.debug("%s epoch %d/%d: loss %.4f acc %.4f", arch, epoch + 1, config.epochs, loss, acc)
    model.eval()
    return model, loss, acc, total


def train_model(
    arch: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    config: TrainConfig | None = None,
    spec: ModelSpec | None = None,
    augment_fn: AugmentFn | None = None,
) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Train ``arch`` on ``(train_x, train_y)``; return ``(model in eval mode, spec, metrics)``.

    AdamW with a per-step cosine schedule, seeded by ``config.seed`` (torch and a numpy generator for
    shuffling and augmentation), on CPU. ``config.arch`` must equal ``arch`` (default config: ``arch``'s).
    Metrics: ``train_loss`` / ``train_acc`` of the last epoch, ``epochs``, ``steps``, ``seconds``.
    """
    config = config if config is not None else TrainConfig(arch=arch)
    if config.arch != arch:
        raise ValueError(f"arch {arch!r} differs from config.arch {config.arch!r}")
    if config.augment and augment_fn is None:
        raise ValueError("config.augment is set but no augment_fn was given")
    x = check_images(train_x, "train_x")
    check_trainable_count(x, "train_x")
    spec = spec if spec is not None else spec_from_data(x, train_y)
    y = check_labels(train_y, len(x), spec.num_classes)
    if x.shape[1:] != (spec.in_channels, spec.image_size, spec.image_size):
        raise ValueError(f"train_x has sample shape {x.shape[1:]}, spec expects {spec}")
    start = time.perf_counter()
    with torch_threads(config.threads):
        model, loss, acc, total = _fit(arch, spec, (x, y), config, augment_fn if config.augment else None)
    seconds = time.perf_counter() - start
    logger.info("trained %s for %d steps in %.1f s: loss %.4f acc %.4f", arch, total, seconds, loss, acc)
    metrics = {"train_loss": loss, "train_acc": acc, "epochs": config.epochs, "steps": total, "seconds": seconds}
    return model, spec, metrics


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eval-mode logits (N, K) of ``model`` on the [0, 1] batch ``x``, computed in chunks."""
    batch_size = require_int("batch_size", batch_size, 1)
    arr = check_images(x, "x")
    was_training = model.training
    model.eval()
    try:
        out = [model(torch.tensor(arr[i : i + batch_size])) for i in range(0, len(arr), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``(x, y)``.

    ``x`` (a non-empty [0, 1] NCHW batch) and ``y`` (one integer label per sample, in ``[0, K)`` for a model with
    a ``spec``) are validated before the model runs; errors name ``x`` or ``y``. A model without a ``spec`` has
    its labels' range checked against the width of its logits."""
    batch_size = require_int("batch_size", batch_size, 1)
    arr = check_images(x, "x")
    spec = getattr(model, "spec", None)
    num_classes = spec.num_classes if isinstance(spec, ModelSpec) else None
    labels = check_labels(y, len(arr), num_classes, what="y")
    logits = predict_logits(model, arr, batch_size)
    if num_classes is None:
        labels = check_labels(labels, len(logits), logits.shape[1], what="y")
    return float((logits.argmax(1) == labels).mean())
