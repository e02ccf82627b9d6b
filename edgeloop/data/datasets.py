"""Image classification datasets as float32 NCHW batches in [0, 1].

Three datasets are supported:

* ``"digits"``: scikit-learn's embedded 8x8 handwritten digits (1797 images, always available), scaled
  by 1/16, split 70/30 into train/test with a fixed seed, stratified by class.
* ``"mnist"``: ``<data_dir>/mnist/mnist_{train,test}.npz`` (keys ``x`` uint8 (N, 28, 28), ``y``).
* ``"cifar10"``: ``<data_dir>/cifar10_jpeg/cifar10_jpeg_{train,test}.npz`` (JPEG bytes concatenated in
  ``jpeg``, ``offsets`` int64 (N+1), ``y``, ``classes``), decoded with Pillow to RGB.

The data directory is ``data_dir`` if given, else the ``EDGELOOP_DATA_DIR`` environment variable, else
``<repository root>/../shared/data``. Decoded arrays are cached in-process and returned read-only.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "EDGELOOP_DATA_DIR"
DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "cifar10")
SPLITS: tuple[str, ...] = ("train", "test")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3
SUBSET_SEED = 0

_DIGIT_LABELS = [str(i) for i in range(10)]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file is missing; the message names the exact path and how to provide it."""


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold the expected arrays."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image set.

    Attributes:
        x: float32 images, shape (N, C, H, W), values in [0, 1].
        y: int64 class indices, shape (N,).
        labels: class names; ``labels[y[i]]`` names sample ``i``'s class.
        name: dataset name, e.g. ``"digits"``.
    """

    x: np.ndarray
    y: np.ndarray
    labels: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.dtype != np.float32:
            raise ValueError(f"Dataset.x must be float32 (N, C, H, W), got {self.x.dtype} {self.x.shape}")
        if self.y.ndim != 1 or self.y.dtype != np.int64 or len(self.y) != len(self.x):
            raise ValueError(f"Dataset.y must be int64 of shape ({len(self.x)},), got {self.y.dtype} {self.y.shape}")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.labels)):
            raise ValueError(
                f"Dataset.y values must lie in [0, {len(self.labels)}), got [{self.y.min()}, {self.y.max()}]"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``labels``)."""
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        _, c, h, w = self.x.shape
        return (c, h, w)


def default_data_dir() -> Path:
    """Directory holding the shared data files: ``$EDGELOOP_DATA_DIR`` or ``<repo>/../shared/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return (repo_root / ".." / "shared" / "data").resolve()


def load_dataset(name: str, split: str, data_dir: Path | str | None = None, limit: int | None = None) -> Dataset:
    """Load a dataset split as float32 NCHW images in [0, 1] with int64 labels.

    Args:
        name: ``"digits"``, ``"mnist"`` or ``"cifar10"``.
        split: ``"train"`` or ``"test"``.
        data_dir: directory holding ``mnist/`` and ``cifar10_jpeg/`` (ignored for digits); defaults to
            :func:`default_data_dir`.
        limit: if given, a seeded class-stratified subset of at most ``limit`` samples (kept in file order);
            for CIFAR-10 only those images are decoded.

    Returns:
        A :class:`Dataset` whose arrays are cached in-process and read-only.

    Raises:
        ValueError: unknown name or split, or ``limit`` < 1.
        DatasetNotFoundError: the dataset's file does not exist.
        DatasetFormatError: the file lacks an expected array.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    root = "" if name == "digits" else str(Path(data_dir) if data_dir is not None else default_data_dir())
    return _load_cached(name, split, root, None if limit is None else int(limit))


def clear_cache() -> None:
    """Drop every cached decoded dataset."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, split: str, root: str, limit: int | None) -> Dataset:
    if name == "digits":
        x, y, labels = _load_digits(split)
        x, y = _take(x, y, _stratified_subset(y, limit))
    elif name == "mnist":
        x, y, labels = _load_mnist(Path(root), split, limit)
    else:
        x, y, labels = _load_cifar10(Path(root), split, limit)
    x.flags.writeable = False
    y.flags.writeable = False
    logger.debug("loaded %s/%s: x %s, %d classes", name, split, x.shape, len(labels))
    return Dataset(x=x, y=y, labels=labels, name=name)


def _take(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if idx is None:
        return x, y
    return np.ascontiguousarray(x[idx]), np.ascontiguousarray(y[idx])


def _stratified_subset(y: np.ndarray, limit: int | None, seed: int = SUBSET_SEED) -> np.ndarray | None:
    """Sorted indices of a seeded ``limit``-sample subset keeping class proportions (largest remainder)."""
    if limit is None or limit >= len(y):
        return None
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * (limit / len(y))
    quota = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - quota), kind="stable")
    quota[remainder_order[: limit - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(np.flatnonzero(y == c), size=int(q), replace=False) for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    return np.ascontiguousarray(x[idx]), y[idx], list(_DIGIT_LABELS)


def _open_npz(root: Path, relative: str, name: str) -> np.lib.npyio.NpzFile:
    path = root / relative
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{name} data file not found: {path}. Provide it by placing {relative} under a data directory "
            f"and passing data_dir=<that directory> or setting {DATA_DIR_ENV}=<that directory> "
            f"(default: <repo>/../shared/data; see ../shared/data/README.md)."
        )
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetFormatError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def _read(npz: np.lib.npyio.NpzFile, key: str, path: str) -> np.ndarray:
    """Array ``key`` of an open npz; a truncated or damaged member raises :class:`DatasetFormatError`."""
    try:
        return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: array {key!r} cannot be read ({type(exc).__name__}: {exc})") from exc


def _labels(raw: np.ndarray, path: str) -> np.ndarray:
    """Integer class labels ``y`` as int64 (N,); anything else raises :class:`DatasetFormatError`."""
    if raw.ndim != 1 or raw.dtype.kind not in "iu":
        raise DatasetFormatError(f"{path}: y must be integer labels of shape (N,), got {raw.dtype} {raw.shape}")
    return raw.astype(np.int64)


def _require(npz: np.lib.npyio.NpzFile, keys: tuple[str, ...], path: str) -> None:
    missing = [k for k in keys if k not in npz.files]
    if missing:
        raise DatasetFormatError(f"{path} lacks arrays {missing}; it holds {npz.files}")


def _load_mnist(root: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    relative = f"mnist/mnist_{split}.npz"
    with _open_npz(root, relative, "mnist") as npz:
        source = str(root / relative)
        _require(npz, ("x", "y"), source)
        raw_x, raw_y = _read(npz, "x", source), _labels(_read(npz, "y", source), source)
    if raw_x.ndim != 3 or raw_x.shape[0] != len(raw_y) or raw_x.dtype != np.uint8:
        raise DatasetFormatError(f"{source}: x must be uint8 (N, H, W) matching y, got {raw_x.dtype} {raw_x.shape}")
    raw_x, y = _take(raw_x, raw_y, _stratified_subset(raw_y, limit))
    x = (raw_x.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return np.ascontiguousarray(x), y, list(_DIGIT_LABELS)


def _load_cifar10(root: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    relative = f"cifar10_jpeg/cifar10_jpeg_{split}.npz"
    with _open_npz(root, relative, "cifar10") as npz:
        source = str(root / relative)
        _require(npz, ("jpeg", "offsets", "y", "classes"), source)
        jpeg, offsets = _read(npz, "jpeg", source), _read(npz, "offsets", source).astype(np.int64)
        all_y, labels = _labels(_read(npz, "y", source), source), [str(c) for c in _read(npz, "classes", source)]
    if len(offsets) != len(all_y) + 1:
        raise DatasetFormatError(f"{root / relative}: {len(offsets)} offsets for {len(all_y)} labels")
    idx = _stratified_subset(all_y, limit)
    idx = np.arange(len(all_y)) if idx is None else idx
    x = _decode_jpegs(jpeg, offsets, idx, str(root / relative))
    return x, np.ascontiguousarray(all_y[idx]), labels


def _decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, idx: np.ndarray, source: str) -> np.ndarray:
    """Decode the JPEGs at ``idx`` into float32 (n, 3, H, W) in [0, 1]."""
    from PIL import Image

    images = []
    for i in idx:
        try:
            with Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
            raise DatasetFormatError(f"{source}: image {i} (bytes {offsets[i]}..{offsets[i + 1]}) is not a "
                                     f"decodable JPEG ({exc})") from exc
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DatasetFormatError(f"{source}: images have differing sizes {sorted(shapes)}")
    stacked = np.stack(images) if images else np.zeros((0, 32, 32, 3), dtype=np.uint8)
    x = stacked.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x)
