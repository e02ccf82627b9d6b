"""Non-stationary test streams: a sequence of domains (clean or corrupted), with ground-truth drift points.

A stream concatenates ``samples_per_domain`` samples per domain, each segment drawn from a dataset
(seeded) and corrupted with :func:`edgeloop.data.corruptions.corrupt`, as in the continual test-time
adaptation protocols built on ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich 2019).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeloop.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from edgeloop.data.datasets import Dataset

logger = logging.getLogger(__name__)

CLEAN = "clean"
ORDERS: tuple[str, ...] = ("shuffled", "class_sorted")


@dataclass(frozen=True)
class Domain:
    """One stream segment's condition: ``"clean"`` (severity 0) or a registered corruption at 1..5."""

    corruption: str
    severity: int = 0

    def __post_init__(self) -> None:
        sev = self.severity
        if isinstance(sev, bool) or not isinstance(sev, int | np.integer):
            raise ValueError(f"Domain severity must be an integer, got {sev!r}")
        object.__setattr__(self, "severity", int(sev))
        if self.corruption == CLEAN:
            if self.severity != 0:
                raise ValueError(f"the 'clean' domain takes severity 0, got {self.severity}")
            return
        if self.corruption not in CORRUPTIONS:
            choices = ", ".join([CLEAN, *CORRUPTIONS])
            raise ValueError(f"unknown domain corruption {self.corruption!r}; valid choices: {choices}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity of {self.corruption!r} must be in 1..5, got {self.severity}")

    @property
    def is_clean(self) -> bool:
        """Whether this domain leaves images untouched."""
        return self.corruption == CLEAN

    @property
    def label(self) -> str:
        """Short name: ``"clean"`` or ``"<corruption>@<severity>"`` (accepted back by :meth:`parse`)."""
        return CLEAN if self.is_clean else f"{self.corruption}@{self.severity}"

    @classmethod
    def parse(cls, spec: DomainSpec) -> Domain:
        """A Domain from a Domain, a ``(name or None, severity)`` tuple, ``"clean"``, ``"name@sev"`` or None."""
        if isinstance(spec, Domain):
            return spec
        if spec is None or spec == CLEAN:
            return cls(CLEAN, 0)
        if isinstance(spec, str):
            name, sep, sev = spec.partition("@")
            if not sep or not sev.strip().isdigit():
                raise ValueError(f"domain string must be 'clean' or '<corruption>@<severity>', got {spec!r}")
            return cls(name.strip(), int(sev))
        if isinstance(spec, tuple) and len(spec) == 2:
            name, sev = spec
            return cls(CLEAN if name is None else name, sev)
        raise ValueError(f"cannot interpret {spec!r} as a domain; use Domain, (name, severity) or 'name@sev'")


@dataclass(frozen=True, eq=False)
class Stream:
    """A test stream.

    Attributes:
        x: float32 images (T, C, H, W) in [0, 1], in arrival order.
        y: int64 labels (T,).
        domain_index: int64 (T,), index into ``domains`` of each sample's domain.
        domains: the domains in stream order.
        drift_points: ground truth; sample indices where the domain changes (segment starts after the
            first, skipping boundaries between two equal domains).
        source_index: int64 (T,), index of each sample in the source dataset (empty if unknown).
        labels: class names of the source dataset.
    """

    x: np.ndarray
    y: np.ndarray
    domain_index: np.ndarray
    domains: list[Domain]
    drift_points: list[int]
    source_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.x)
        if self.x.ndim != 4 or len(self.y) != n or len(self.domain_index) != n:
            raise ValueError(
                f"Stream arrays disagree: x {self.x.shape}, y {self.y.shape}, domain_index {self.domain_index.shape}"
            )
        if n and (self.domain_index.min() < 0 or self.domain_index.max() >= len(self.domains)):
            raise ValueError(f"domain_index values must lie in [0, {len(self.domains)})")
        if list(self.drift_points) != sorted(set(self.drift_points)) or any(not 0 < p < n for p in self.drift_points):
            raise ValueError(f"drift_points must be increasing indices in (0, {n}), got {self.drift_points}")

    def __len__(self) -> int:
        return len(self.y)

    def domain_at(self, index: int) -> Domain:
        """The domain of sample ``index``."""
        return self.domains[int(self.domain_index[index])]


DomainSpec = Domain | tuple[str | None, int] | str | None
"""Anything :meth:`Domain.parse` accepts."""


def _draw_indices(y: np.ndarray, count: int, order: str, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded sample indices for one domain; without replacement when the dataset is large enough."""
    n = len(y)
    idx = rng.permutation(n)[:count] if count <= n else rng.integers(0, n, size=count)
    if order == "class_sorted":
        class_rank = np.argsort(rng.permutation(num_classes))
        idx = idx[np.argsort(class_rank[y[idx]], kind="stable")]
    return idx.astype(np.int64)


def _check_build_args(dataset: Dataset, samples_per_domain: int, order: str, n_domains: int) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown stream order {order!r}; valid choices: {', '.join(ORDERS)}")
    if isinstance(samples_per_domain, bool) or not isinstance(samples_per_domain, int | np.integer):
        raise ValueError(f"samples_per_domain must be an integer, got {samples_per_domain!r}")
    if samples_per_domain < 1:
        raise ValueError(f"samples_per_domain must be >= 1, got {samples_per_domain}")
    if n_domains == 0:
        raise ValueError("a stream needs at least one domain")
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")


def build_stream(
    dataset: Dataset,
    domains: Sequence[DomainSpec],
    samples_per_domain: int,
    seed: int,
    order: str = "shuffled",
) -> Stream:
    """Build a stream of ``len(domains) * samples_per_domain`` samples, one segment per domain.

    Each segment draws ``samples_per_domain`` samples from ``dataset`` (seeded; without replacement
    within the segment when the dataset is large enough, else with replacement) and corrupts them with
    the segment's corruption and severity (ImageNet-C / MNIST-C style, Hendrycks & Dietterich 2019;
    Mu & Gilmer 2019).

    Args:
        dataset: the source images.
        domains: Domain objects, ``(name or None, severity)`` tuples, ``"clean"`` or ``"name@sev"``.
        samples_per_domain: segment length.
        seed: seeds sampling, class order and the corruptions; equal seeds give equal streams.
        order: ``"shuffled"`` (i.i.d. within a segment) or ``"class_sorted"`` (temporally correlated:
            each segment arrives as one run per class, classes in a seeded random order).

    Raises:
        ValueError: invalid domain, order, or sample count, or an empty dataset.
    """
    parsed = [Domain.parse(d) for d in domains]
    _check_build_args(dataset, samples_per_domain, order, len(parsed))
    count = int(samples_per_domain)
    rng = np.random.default_rng(seed)
    xs, ys, sources = [], [], []
    for domain in parsed:
        idx = _draw_indices(dataset.y, count, order, dataset.num_classes, rng)
        corruption_seed = int(rng.integers(0, 2**31 - 1))
        images = dataset.x[idx]
        if not domain.is_clean:
            images = corrupt(images, domain.corruption, domain.severity, seed=corruption_seed)
        xs.append(images)
        ys.append(dataset.y[idx])
        sources.append(idx)
    drift_points = [k * count for k in range(1, len(parsed)) if parsed[k] != parsed[k - 1]]
    logger.debug("built %s stream: %d domains x %d samples", dataset.name, len(parsed), count)
    return Stream(
        x=np.ascontiguousarray(np.concatenate(xs), dtype=np.float32),
        y=np.concatenate(ys).astype(np.int64),
        domain_index=np.repeat(np.arange(len(parsed), dtype=np.int64), count),
        domains=parsed,
        drift_points=drift_points,
        source_index=np.concatenate(sources),
        labels=list(dataset.labels),
    )


def iter_batches(
    stream: Stream, batch_size: int, drop_last: bool = False
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, x, y)`` for consecutive batches of ``batch_size`` samples in arrival order.

    The last batch may be shorter unless ``drop_last``. ``x`` and ``y`` are views into the stream.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(stream)
    for start in range(0, n, int(batch_size)):
        stop = min(n, start + int(batch_size))
        if drop_last and stop - start < batch_size:
            return
        yield start, stream.x[start:stop], stream.y[start:stop]
