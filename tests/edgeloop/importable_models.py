"""Models a user might hand to `edgeloop export` by import path (used by the export tests)."""

from __future__ import annotations

from torch import nn


def build_net() -> nn.Module:
    """A plain nn.Sequential digits classifier with BatchNorm, ending in a Linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def build_headless() -> nn.Module:
    """A model whose output is not produced by a Linear layer (refused with a clear error)."""
    return nn.Sequential(nn.Conv2d(1, 10, 8), nn.BatchNorm2d(10), nn.Flatten())
