"""Built-in architectures (source students and stronger teachers) and their explicit registry.

Every registered model normalises its [0, 1] input inside the graph and exposes
``forward_features(x) -> (N, D)`` and ``classifier`` so the adaptable graph can output penultimate features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from runtime.checks import require_int


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the data a model is built for."""

    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for name, minimum in (("in_channels", 1), ("num_classes", 2), ("image_size", 4)):
            object.__setattr__(self, name, require_int(f"ModelSpec.{name}", getattr(self, name), minimum))
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean/std need {self.in_channels} values, got {self.mean} / {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvNet(nn.Module):
    """A plain conv–BN–ReLU stack, global average pooling and a linear classifier.

    ``plan`` lists ``(channels, stride)`` per block; the input is normalised by ``spec.mean``/``spec.std``.
    """

    def __init__(self, spec: ModelSpec, plan: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("input_mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))
        layers: list[nn.Module] = []
        c_in = spec.in_channels
        for c_out, stride in plan:
            layers += _block(c_in, c_out, stride)
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, spec.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, D) of a [0, 1] input batch (N, C, H, W)."""
        z = self.features((x - self.input_mean) / self.input_std)
        return z.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K)."""
        return self.classifier(self.forward_features(x))


def small_cnn(spec: ModelSpec) -> ConvNet:
    """The edge student: three conv–BN–ReLU blocks (16, 32, 64 channels), ~24k parameters."""
    return ConvNet(spec, [(16, 1), (32, 2), (64, 2)])


def wide_cnn(spec: ModelSpec) -> ConvNet:
    """The cloud teacher: five wider blocks (64…256 channels), ~560k parameters."""
    return ConvNet(spec, [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2)])


class _Normalize(nn.Module):
    """Input normalisation by per-channel mean/std buffers (part of the graph)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std``."""
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """The benchmark SmallCNN: conv 16 3×3–BN–ReLU–maxpool, conv 32 3×3–BN–ReLU–maxpool, linear 64–ReLU
    (the penultimate features), linear K. For 28×28 MNIST the flattened map is 32·7·7 = 1568."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = _Normalize(spec)
        self.features = nn.Sequential(
            nn.Conv2d(spec.in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = spec.image_size // 4
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU())
        self.feature_dim = 64
        self.classifier = nn.Linear(64, spec.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64)."""
        return self.embed(self.features(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K)."""
        return self.classifier(self.forward_features(x))


class _ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet8(nn.Module):
    """A ResNet-8 in the style of the MLPerf Tiny image-classification model: a 16-channel stem and three
    residual stages of 16, 32 and 64 channels (strides 1, 2, 2), global average pooling, linear K."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = _Normalize(spec)
        self.stem = nn.Sequential(nn.Conv2d(spec.in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.stages = nn.Sequential(_ResidualBlock(16, 16, 1), _ResidualBlock(16, 32, 2), _ResidualBlock(32, 64, 2))
        self.feature_dim = 64
        self.classifier = nn.Linear(64, spec.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64)."""
        return self.stages(self.stem(self.normalize(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K)."""
        return self.classifier(self.forward_features(x))


ARCHITECTURES: dict[str, Callable[[ModelSpec], nn.Module]] = {}


def register_architecture(name: str, factory: Callable[[ModelSpec], nn.Module]) -> None:
    """Add ``factory`` under ``name``; duplicate or empty names are rejected."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"invalid architecture name {name!r}")
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    ARCHITECTURES[name] = factory


register_architecture("small_cnn", small_cnn)
register_architecture("wide_cnn", wide_cnn)
register_architecture("smallcnn", SmallCNN)
register_architecture("resnet8", ResNet8)


def build_model(arch: str, spec: ModelSpec) -> nn.Module:
    """Instantiate the registered architecture ``arch`` for ``spec``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; registered: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](spec)


class FeatureSplit(nn.Module):
    """Give any classifier that ends in an ``nn.Linear`` the ``forward_features``/``classifier`` interface the
    adaptable graph needs: the features are the input of that last Linear, captured by a pre-forward hook."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; define forward_features and "
                             "classifier on it instead")
        self.model = model
        self.classifier = linears[-1]
        self._captured: list[torch.Tensor] = []
        self.classifier.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._captured.append(args[0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last Linear layer when the wrapped model runs on ``x``."""
        self._captured.clear()
        self.model(x)
        if len(self._captured) != 1:
            raise ValueError(f"the last nn.Linear ran {len(self._captured)} times in one forward pass; define "
                             "forward_features and classifier on the model instead")
        return self._captured.pop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped model."""
        return self.model(x)


def with_feature_split(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` itself when it has ``forward_features``/``classifier``, else a :class:`FeatureSplit` that is
    checked on ``example``: the last Linear applied to the captured features must give the model's logits."""
    if callable(getattr(model, "forward_features", None)) and isinstance(getattr(model, "classifier", None), nn.Module):
        return model
    split = FeatureSplit(model).eval()
    with torch.no_grad():
        logits = split(example)
        again = split.classifier(split.forward_features(example))
    if logits.shape != again.shape or not torch.allclose(logits, again, atol=1e-5):
        raise ValueError(f"{type(model).__name__}: its output is not the last nn.Linear applied to that layer's "
                         "input; define forward_features and classifier on the model")
    return split
