"""Tests of edgeloop.data.corruptions: shapes, ranges, determinism, severity monotonicity, validation."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from edgeloop.data import CORRUPTIONS, corrupt, load_dataset, register_corruption

EXPECTED_NAMES = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "contrast",
    "brightness",
    "pixelate",
    "jpeg_compression",
    "elastic_transform",
]
RANDOM_CORRUPTIONS = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "motion_blur",
    "pixelate",
    "elastic_transform",
]
KINDS = ["gray8", "gray28", "rgb32"]
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@functools.cache
def _images(kind: str, n: int = 6) -> np.ndarray:
    """Real digits (always available) as gray 8x8, upsampled gray 28x28, or coloured RGB 32x32."""
    digits = load_dataset("digits", "test").x[: n * 7 : 7]
    if kind == "gray8":
        return np.ascontiguousarray(digits)
    if kind == "gray28":
        return np.clip(ndimage.zoom(digits, (1, 1, 3.5, 3.5), order=1), 0, 1).astype(np.float32)
    big = np.clip(ndimage.zoom(digits, (1, 1, 4, 4), order=1), 0, 1)
    rng = np.random.default_rng(7)
    fg, bg = rng.uniform(0.2, 1.0, (2, n, 3, 1, 1))
    return (big * fg + (1 - big) * bg * 0.6).astype(np.float32)


def test_registry_has_the_contract_names() -> None:
    assert list(CORRUPTIONS) == EXPECTED_NAMES


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", EXPECTED_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_range(kind: str, name: str, severity: int) -> None:
    x = _images(kind)
    before = x.copy()
    out = corrupt(x, name, severity, seed=3)
    assert out.shape == x.shape
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not np.array_equal(out, x), "corruption left the images unchanged"
    np.testing.assert_array_equal(x, before)  # input untouched


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_same_seed_same_output(name: str) -> None:
    x = _images("rgb32")
    np.testing.assert_array_equal(corrupt(x, name, 3, seed=11), corrupt(x, name, 3, seed=11))


@pytest.mark.parametrize("name", RANDOM_CORRUPTIONS)
def test_different_seed_different_output(name: str) -> None:
    x = _images("gray28")
    assert not np.array_equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=2))


def _mean_abs_diffs(x: np.ndarray, name: str) -> list[float]:
    return [float(np.abs(corrupt(x, name, s, seed=5) - x).mean()) for s in range(1, 6)]


@pytest.mark.parametrize("name", EXPECTED_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_severity_monotonic(kind: str, name: str) -> None:
    x = _images(kind, n=24)
    diffs = _mean_abs_diffs(x, name)
    assert all(b > a for a, b in itertools.pairwise(diffs)), f"{name} on {kind}: {diffs}"


@pytest.mark.shared_data
@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_severity_monotonic_on_real_cifar_and_mnist(name: str) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is absent ({SHARED_DATA.resolve()}); real-data check skipped")
    for dataset in ("mnist", "cifar10"):
        x = load_dataset(dataset, "test", data_dir=SHARED_DATA, limit=100).x
        diffs = _mean_abs_diffs(x, name)
        assert all(b > a for a, b in itertools.pairwise(diffs)), f"{name} on {dataset}: {diffs}"


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(EXPECTED_NAMES),
    severity=st.integers(1, 5),
    channels=st.sampled_from([1, 3]),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_any_input_stays_in_range(
    name: str, severity: int, channels: int, height: int, width: int, batch: int, seed: int
) -> None:
    x = np.random.default_rng(seed).random((batch, channels, height, width), dtype=np.float32)
    out = corrupt(x, name, severity, seed=seed)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True, "3", None])
def test_invalid_severity_raises(severity: object) -> None:
    with pytest.raises(ValueError, match="severity"):
        corrupt(_images("gray8"), "contrast", severity)  # type: ignore[arg-type]


def test_numpy_integer_severity_accepted() -> None:
    out = corrupt(_images("gray8"), "contrast", np.int64(2))  # type: ignore[arg-type]
    assert out.shape == _images("gray8").shape


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="fog") as info:
        corrupt(_images("gray8"), "fog", 1)
    assert "gaussian_noise" in str(info.value) and "elastic_transform" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 8, 8), np.float32),
        np.zeros((2, 2, 8, 8), np.float32),
        np.zeros((2, 1, 8, 8), np.uint8),
        np.full((1, 1, 8, 8), np.nan, np.float32),
    ],
)
def test_bad_images_raise(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        corrupt(bad, "gaussian_noise", 1)


def test_float64_input_gives_float32_and_empty_batch_ok() -> None:
    out = corrupt(_images("gray8").astype(np.float64), "defocus_blur", 2)
    assert out.dtype == np.float32
    assert corrupt(np.zeros((0, 3, 32, 32), np.float32), "jpeg_compression", 5).shape == (0, 3, 32, 32)


def test_duplicate_registration_rejected() -> None:
    before = dict(CORRUPTIONS)
    with pytest.raises(ValueError, match="already registered"):
        register_corruption("gaussian_noise", lambda x, s, r: x)
    assert before == CORRUPTIONS
    local: dict = {}
    register_corruption("identity", lambda x, s, r: x, local)
    with pytest.raises(ValueError, match="identity"):
        register_corruption("identity", lambda x, s, r: x, local)
    with pytest.raises(ValueError):
        register_corruption("clean", lambda x, s, r: x, local)


def test_brightness_grayscale_is_shift_and_rgb_keeps_hue() -> None:
    gray = _images("gray8")
    np.testing.assert_allclose(corrupt(gray, "brightness", 1), np.clip(gray + 0.1, 0, 1), atol=1e-6)
    rgb = np.array([[[[0.2]], [[0.4]], [[0.1]]]], np.float32)  # one pixel, V = 0.4
    out = corrupt(rgb, "brightness", 2)[0, :, 0, 0]
    np.testing.assert_allclose(out, np.array([0.2, 0.4, 0.1]) * 0.6 / 0.4, atol=1e-6)


def test_contrast_shrinks_spread_around_mean() -> None:
    x = _images("rgb32")
    out = corrupt(x, "contrast", 3)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 0.2 * x.std(axis=(1, 2, 3)), rtol=1e-4)


def test_pixelate_makes_flat_cells() -> None:
    x = _images("gray28")
    out = corrupt(x, "pixelate", 5, seed=0)  # 2.5 px cells: at most ceil(28 / 2.5) + 1 = 13 levels per row
    for row in out[:, 0, 14]:
        runs = 1 + int(np.count_nonzero(np.abs(np.diff(row)) > 1e-6))
        assert runs <= 13, row


def test_jpeg_output_is_on_the_8bit_grid() -> None:
    out = corrupt(_images("rgb32"), "jpeg_compression", 3)
    np.testing.assert_allclose(out * 255, np.rint(out * 255), atol=1e-3)


def test_impulse_noise_sets_expected_fraction() -> None:
    x = np.full((20, 1, 28, 28), 0.5, np.float32)
    changed = corrupt(x, "impulse_noise", 5, seed=0) != 0.5
    assert abs(changed.mean() - 0.27) < 0.02
