"""Damaged or wrong dataset files, out-of-range images and mistyped partition arguments get clear errors that
name the problem (and the file), never a zip/PIL traceback or silently wrong images."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edgeloop.data import DatasetFormatError, clear_cache, corrupt, load_dataset
from edgeloop.data.partition import dirichlet_partition


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _mnist(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "mnist").mkdir(exist_ok=True)
    path = tmp_path / "mnist" / "mnist_train.npz"
    path.write_bytes(data)
    return path


GOOD_X = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
GOOD_Y = np.arange(20) % 10


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_npz", "crc"])
def test_damaged_npz_names_the_file(tmp_path: Path, damage: str) -> None:
    full = _npz(x=GOOD_X, y=GOOD_Y)
    data = {"truncated": full[: len(full) // 2], "empty": b"", "not_npz": b"hello world",
            "crc": full[: len(full) // 2] + bytes(50) + full[len(full) // 2 + 50 :]}[damage]
    path = _mnist(tmp_path, data)
    with pytest.raises(DatasetFormatError, match=str(path)):
        load_dataset("mnist", "train", data_dir=tmp_path)


@pytest.mark.parametrize(("arrays", "match"), [
    ({"x": GOOD_X / 255.0, "y": GOOD_Y}, "x must be uint8"),
    ({"x": GOOD_X.astype(np.int16) * 10, "y": GOOD_Y}, "x must be uint8"),
    ({"x": GOOD_X, "y": GOOD_Y + 0.5}, "y must be integer labels"),
    ({"x": GOOD_X, "y": np.array(["a"] * 20)}, "y must be integer labels"),
])
def test_wrong_mnist_arrays_are_refused(tmp_path: Path, arrays: dict[str, Any], match: str) -> None:
    _mnist(tmp_path, _npz(**arrays))
    with pytest.raises(DatasetFormatError, match=match):
        load_dataset("mnist", "train", data_dir=tmp_path)


def test_undecodable_cifar_jpeg_names_the_file_and_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "JPEG")
    parts = [buf.getvalue(), b"not a jpeg"]
    (tmp_path / "cifar10_jpeg").mkdir()
    (tmp_path / "cifar10_jpeg" / "cifar10_jpeg_train.npz").write_bytes(_npz(
        jpeg=np.frombuffer(b"".join(parts), np.uint8), offsets=np.cumsum([0, *map(len, parts)]),
        y=np.array([0, 1]), classes=np.array(["cat", "dog"])))
    with pytest.raises(DatasetFormatError, match=r"cifar10_jpeg_train\.npz: image 1 .* not a decodable JPEG"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("scale", [255.0, -1.0])
def test_corrupt_refuses_images_outside_unit_range(scale: float) -> None:
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32) * np.float32(scale)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        corrupt(x, "contrast", 1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_clients": 2.5}, "n_clients must be an integer"),
    ({"n_clients": True}, "n_clients must be an integer"),
    ({"alpha": "1"}, "alpha must be a positive finite number"),
    ({"alpha": None}, "alpha must be a positive finite number"),
    ({"min_size": 1.5}, "min_size must be an integer"),
])
def test_partition_argument_types_are_named(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"labels": np.repeat(np.arange(3), 4), "n_clients": 3, "alpha": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(**args)
