"""Tests of edgeloop.data.datasets: the embedded digits, file loaders (fake files in tmp_path and the real
shared data when present), stratified limits, caching, and error messages."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeloop.data import (
    DATA_DIR_ENV,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    clear_cache,
    default_data_dir,
    load_dataset,
)

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "mnist").is_dir() or not (SHARED_DATA / "cifar10_jpeg").is_dir(),
    reason=f"real data absent: {SHARED_DATA} (see ../shared/data/README.md); fresh clones skip this",
)


def _write_fake_mnist(root: Path, split: str, n: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    np.savez(root / "mnist" / f"mnist_{split}.npz", x=x, y=(np.arange(n) % 10).astype(np.uint8))
    return x


def _write_fake_cifar(root: Path, split: str, per_class: int = 4) -> list[str]:
    """Class-ordered JPEGs like the real file: class k's images are a flat colour k * 25."""
    classes = [f"class{k}" for k in range(10)]
    blobs, labels = [], []
    for k in range(10):
        for _ in range(per_class):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (k * 25, 255 - k * 25, 128)).save(buffer, format="JPEG", quality=95)
            blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
            labels.append(k)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    (root / "cifar10_jpeg").mkdir(parents=True, exist_ok=True)
    np.savez(
        root / "cifar10_jpeg" / f"cifar10_jpeg_{split}.npz",
        jpeg=np.concatenate(blobs),
        offsets=offsets,
        y=np.array(labels, np.uint8),
        classes=np.array(classes),
    )
    return classes


def test_digits_counts_and_format() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert (len(train), len(test)) == (1257, 540)
    for ds in (train, test):
        assert isinstance(ds, Dataset) and ds.name == "digits"
        assert ds.x.dtype == np.float32 and ds.x.shape[1:] == (1, 8, 8) == ds.image_shape
        assert ds.y.dtype == np.int64 and ds.labels == [str(i) for i in range(10)]
        assert ds.x.min() == 0.0 and ds.x.max() == 1.0
        assert np.bincount(ds.y).min() >= 0.09 * len(ds)  # stratified: every class ~10 %


def test_digits_split_is_deterministic_and_cached() -> None:
    first = load_dataset("digits", "test")
    assert load_dataset("digits", "test") is first
    clear_cache()
    again = load_dataset("digits", "test")
    assert again is not first
    np.testing.assert_array_equal(again.x, first.x)
    np.testing.assert_array_equal(again.y, first.y)


def test_cached_arrays_are_read_only() -> None:
    ds = load_dataset("digits", "train")
    with pytest.raises(ValueError):
        ds.x[0, 0, 0, 0] = 0.5


def test_limit_is_a_stratified_subset() -> None:
    full = load_dataset("digits", "train")
    sub = load_dataset("digits", "train", limit=100)
    assert len(sub) == 100
    assert np.bincount(sub.y, minlength=10).min() >= 9
    full_rows = {row.tobytes() for row in full.x}
    assert all(row.tobytes() in full_rows for row in sub.x)
    assert len(load_dataset("digits", "train", limit=10**6)) == len(full)


@pytest.mark.parametrize("limit", [0, -3, True, 2.5])
def test_bad_limit_raises(limit: object) -> None:
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", "train", limit=limit)  # type: ignore[arg-type]


def test_unknown_names_list_choices() -> None:
    with pytest.raises(ValueError, match="digits, mnist, cifar10"):
        load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("digits", "val")


@pytest.mark.parametrize(
    ("name", "relative"),
    [("mnist", "mnist/mnist_train.npz"), ("cifar10", "cifar10_jpeg/cifar10_jpeg_train.npz")],
)
def test_missing_file_names_the_path(tmp_path: Path, name: str, relative: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "train", data_dir=tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path / relative) in message
    assert DATA_DIR_ENV in message and "data_dir" in message


def test_env_var_sets_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "mnist" / "mnist_test.npz"))):
        load_dataset("mnist", "test")
    _write_fake_mnist(tmp_path, "test")
    assert len(load_dataset("mnist", "test")) == 30


def test_default_data_dir_is_shared_next_to_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert default_data_dir() == SHARED_DATA


def test_fake_mnist_file_loads(tmp_path: Path) -> None:
    raw = _write_fake_mnist(tmp_path, "train")
    ds = load_dataset("mnist", "train", data_dir=tmp_path)
    assert ds.x.shape == (30, 1, 28, 28) and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    np.testing.assert_allclose(ds.x[:, 0] * 255, raw, atol=1e-3)
    assert sorted(load_dataset("mnist", "train", data_dir=tmp_path, limit=10).y.tolist()) == list(range(10))


def test_fake_cifar_limit_is_stratified_not_first_n(tmp_path: Path) -> None:
    classes = _write_fake_cifar(tmp_path, "test")
    ds = load_dataset("cifar10", "test", data_dir=tmp_path, limit=20)
    assert ds.labels == classes
    assert ds.x.shape == (20, 3, 32, 32) and ds.x.dtype == np.float32
    assert np.bincount(ds.y, minlength=10).tolist() == [2] * 10
    red = ds.x[:, 0].mean(axis=(1, 2)) * 255
    np.testing.assert_allclose(red, ds.y * 25, atol=4)  # each decoded image matches its label


def test_file_lacking_arrays_raises_format_error(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "mnist_test.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DatasetFormatError, match=r"mnist_test\.npz"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_dataset_validates_arrays() -> None:
    with pytest.raises(ValueError, match="float32"):
        Dataset(x=np.zeros((2, 8, 8), np.float32), y=np.zeros(2, np.int64), labels=["a"], name="t")
    with pytest.raises(ValueError, match="int64"):
        Dataset(x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(3, np.int64), labels=["a"], name="t")
    with pytest.raises(ValueError, match="lie in"):
        Dataset(x=np.zeros((1, 1, 8, 8), np.float32), y=np.array([4]), labels=["a"], name="t")


@pytest.mark.shared_data
@needs_shared
def test_real_mnist_test_split() -> None:
    ds = load_dataset("mnist", "test", data_dir=SHARED_DATA)
    assert ds.x.shape == (10000, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and np.bincount(ds.y).tolist()[:2] == [980, 1135]
    assert ds.x.min() >= 0.0 and ds.x.max() == 1.0


@pytest.mark.shared_data
@needs_shared
def test_real_cifar_limit_decodes_a_stratified_subset() -> None:
    ds = load_dataset("cifar10", "test", data_dir=SHARED_DATA, limit=200)
    assert ds.x.shape == (200, 3, 32, 32) and ds.x.dtype == np.float32
    assert np.bincount(ds.y, minlength=10).tolist() == [20] * 10
    assert ds.labels[0] == "airplane" and ds.labels[-1] == "truck"
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0 and ds.x.std() > 0.1
