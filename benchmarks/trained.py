"""Trained checkpoints the compression and adaptation benchmarks share, cached outside the repository.

Training runs once per machine (single-threaded torch: fastest on the shared cores here) and the checkpoint
is kept in ``$EDGELOOP_BENCH_CACHE`` (default ``~/.cache/edgeloop/bench``). Each checkpoint records its
training metrics, which the benchmarks report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where trained benchmark checkpoints live."""
    root = Path(os.environ.get("EDGELOOP_BENCH_CACHE", Path.home() / ".cache" / "edgeloop" / "bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def mnist_smallcnn(epochs: int = 3) -> Path:
    """The issue's SmallCNN trained on MNIST (60,000 images)."""
    from edgeloop import pipeline

    path = cache_dir() / f"smallcnn_mnist_e{epochs}.pt"
    if not path.exists():
        log.info("training smallcnn on MNIST for %d epochs (cached at %s)", epochs, path)
        pipeline.train_checkpoint(arch="smallcnn", dataset="mnist", out=path, epochs=epochs, seed=0, threads=1)
    return path


def cifar_resnet8(epochs: int = 15) -> Path:
    """ResNet-8 trained on the CIFAR-10-JPEG training set with crop/flip augmentation on every batch."""
    from edgeloop.data import load_dataset
    from edgeloop.pipeline import random_flip_crop
    from exporter.checkpoint import save_checkpoint
    from exporter.train import TrainConfig, evaluate, train_model

    path = cache_dir() / f"resnet8_cifar10_e{epochs}.pt"
    if path.exists():
        return path
    log.info("training resnet8 on CIFAR-10-JPEG for %d epochs (cached at %s)", epochs, path)
    train, test = load_dataset("cifar10", "train"), load_dataset("cifar10", "test")
    config = TrainConfig(arch="resnet8", epochs=epochs, batch_size=128, lr=4e-3, seed=0, augment=True, threads=1)
    model, spec, metrics = train_model("resnet8", train.x, train.y, config, augment_fn=random_flip_crop)
    metrics["test_accuracy"] = evaluate(model, test.x, test.y)
    meta = {"dataset": "cifar10", "labels": list(train.labels), "epochs": epochs, "metrics": metrics,
            "augment": "flip_crop", "invariances": ["hflip"]}
    save_checkpoint(model, "resnet8", spec, path, meta)
    log.info("resnet8: test accuracy %.4f after %.0f s", metrics["test_accuracy"], metrics["seconds"])
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(mnist_smallcnn(), cifar_resnet8())
