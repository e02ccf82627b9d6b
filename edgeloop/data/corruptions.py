"""Common image corruptions at five severities, for grayscale and RGB NCHW float32 batches in [0, 1].

An own, vectorised re-implementation of the corruptions of ImageNet-C (Hendrycks & Dietterich 2019,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR) and MNIST-C
(Mu & Gilmer 2019, "MNIST-C: A Robustness Benchmark for Computer Vision"). The ``imagecorruptions`` /
Wand packages do not work under numpy 2, hence this module.

Noise, contrast and brightness use ImageNet-C's parameter tables directly (they are defined on [0, 1]
intensities, so they do not depend on image size). Spatial parameters (blur radii, motion length,
elastic displacement) are given in pixels for a 32x32 image and scaled by ``(min(H, W) / 32) ** (1/3)``, so
an 8x8 digit is blurred by ~0.63x the pixels of a CIFAR image: hurt, but recognisable at severity 3.
Pixelation cells are 1/0.85..1/0.4 px wide at any size, as in ImageNet-C, on a randomly offset grid.

Every function in :data:`CORRUPTIONS` takes ``(images, severity, rng)`` and returns an array of the same
shape; :func:`corrupt` validates its arguments, seeds the generator and clips to [0, 1] as float32.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, signal

logger = logging.getLogger(__name__)

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 32
_ELASTIC_CHUNK = 256

# Tables, one entry per severity 1..5. Intensity tables are ImageNet-C's own values.
GAUSSIAN_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_NOISE_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)
IMPULSE_NOISE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)
BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)
JPEG_QUALITY = (25, 18, 15, 10, 7)
# Spatial tables, in pixels of a 32x32 image (scaled by (size / 32) ** (1/3)); pixelate: kept side fraction.
DEFOCUS_RADIUS_ALIAS = ((1.0, 0.3), (1.3, 0.4), (1.6, 0.4), (2.0, 0.5), (2.5, 0.5))
MOTION_LENGTH = (2.0, 3.0, 4.0, 5.5, 7.0)
MOTION_MAX_ANGLE_DEG = 45.0
PIXELATE_FRACTION = (0.85, 0.7, 0.6, 0.5, 0.4)
ELASTIC_ALPHA_SIGMA = ((0.4, 3.0), (0.6, 3.0), (0.8, 3.0), (1.05, 3.0), (1.3, 3.0))


def _param(table: Sequence[Any], severity: int) -> Any:
    """The table entry for ``severity``; ValueError outside 1..5."""
    _check_severity(severity)
    return table[int(severity) - 1]


def _check_severity(severity: object) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def _spatial_scale(images: np.ndarray) -> float:
    """Factor turning a 32x32 pixel length into one for these images: (min(H, W) / 32) ** (1/3)."""
    return (min(images.shape[-2:]) / REFERENCE_SIZE) ** (1.0 / 3.0)


def _convolve(images: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Same-size convolution with reflect padding. ``kernels``: (k, k) for all images or (N, k, k) each."""
    k = kernels.shape[-1]
    pad = k // 2
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    kern = kernels.reshape((1, 1, k, k) if kernels.ndim == 2 else (-1, 1, k, k)).astype(np.float32)
    return signal.fftconvolve(padded, kern, mode="valid", axes=(-2, -1)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- noise


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive i.i.d. Gaussian noise, std 0.08..0.38 (ImageNet-C, Hendrycks & Dietterich 2019)."""
    std = np.float32(_param(GAUSSIAN_NOISE_STD, severity))
    return images + std * rng.standard_normal(images.shape, dtype=np.float32)


def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise ``Poisson(x * c) / c``, c = 60..3 (ImageNet-C, Hendrycks & Dietterich 2019)."""
    photons = _param(SHOT_NOISE_PHOTONS, severity)
    return (rng.poisson(images.astype(np.float64) * photons) / photons).astype(np.float32)


def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise on a fraction 0.03..0.27 of values (ImageNet-C, Hendrycks & Dietterich 2019)."""
    amount = _param(IMPULSE_NOISE_AMOUNT, severity)
    u = rng.random(images.shape, dtype=np.float32)
    return np.where(u < amount / 2, 0.0, np.where(u < amount, 1.0, images)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ blur


def _disk_kernel(radius: float, alias_sigma: float, supersample: int = 8) -> np.ndarray:
    """Anti-aliased disk (area fraction inside ``radius``) smoothed by a Gaussian of ``alias_sigma``."""
    half = math.ceil(radius + 3 * alias_sigma)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    coords = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    inside = (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius**2
    size = 2 * half + 1
    disk = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    if alias_sigma > 0:
        disk = ndimage.gaussian_filter(disk, alias_sigma, mode="constant")
    return disk / disk.sum()


def defocus_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Defocus: convolution with an anti-aliased disk, radius 1.0..2.5 px at 32x32 scaled by
    (size/32)^(1/3), plus a small Gaussian alias blur (ImageNet-C, Hendrycks & Dietterich 2019)."""
    radius, alias = _param(DEFOCUS_RADIUS_ALIAS, severity)
    scale = _spatial_scale(images)
    return _convolve(images, _disk_kernel(radius * scale, alias * scale))


def _motion_kernels(length: float, angles: np.ndarray, samples_per_px: int = 8) -> np.ndarray:
    """(N, k, k) kernels: a centred uniform line of ``length`` px at each angle, bilinearly splatted."""
    half = math.ceil(length / 2) + 1
    size = 2 * half + 1
    t = np.linspace(-length / 2, length / 2, max(2, math.ceil(length * samples_per_px)) + 1)
    rows = half - np.sin(angles)[:, None] * t[None, :]
    cols = half + np.cos(angles)[:, None] * t[None, :]
    r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    fr, fc = rows - r0, cols - c0
    kernels = np.zeros((len(angles), size * size))
    n_idx = np.broadcast_to(np.arange(len(angles))[:, None], rows.shape)
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        np.add.at(kernels, (n_idx, (r0 + dr) * size + (c0 + dc)), w)
    kernels /= kernels.sum(axis=1, keepdims=True)
    return kernels.reshape(len(angles), size, size)


def motion_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Linear camera motion: each image is blurred along a line of 2..7 px at 32x32 (scaled by
    (size/32)^(1/3)) at its own random angle in [-45, 45] degrees (ImageNet-C, Hendrycks & Dietterich 2019;
    centred and uniform here rather than ImageNet-C's one-sided Gaussian-weighted Wand kernel)."""
    length = _param(MOTION_LENGTH, severity) * _spatial_scale(images)
    max_angle = math.radians(MOTION_MAX_ANGLE_DEG)
    angles = rng.uniform(-max_angle, max_angle, size=len(images))
    return _convolve(images, _motion_kernels(length, angles))


# ----------------------------------------------------------------------------------------- photometric


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Contrast reduction towards each image's mean, ``(x - m) * c + m``, c = 0.4..0.05
    (ImageNet-C, Hendrycks & Dietterich 2019)."""
    factor = np.float32(_param(CONTRAST_FACTOR, severity))
    means = images.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float32)
    return (images - means) * factor + means


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Brightness: the HSV value channel is raised by 0.1..0.5 and clipped, keeping hue and saturation
    (ImageNet-C, Hendrycks & Dietterich 2019); for grayscale this is ``clip(x + c)``."""
    shift = np.float32(_param(BRIGHTNESS_SHIFT, severity))
    value = images.max(axis=1, keepdims=True)
    new_value = np.clip(value + shift, 0.0, 1.0)
    ratio = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    # With V = max(R, G, B), RGB scales with V at fixed hue and saturation; black pixels become gray.
    return np.where(value > 0, images * ratio, new_value).astype(np.float32)


def _cell_matrices(size: int, cell: float, phases: np.ndarray) -> np.ndarray:
    """(N, size, size) matrices replacing each pixel by the area average of its grid cell.

    The grid has cells ``cell`` pixels wide, shifted by ``phases`` (N,) in [0, cell); cells are clipped
    to the image. Output pixel ``i`` takes the cell holding its centre ``i + 0.5``.
    """
    centres = np.arange(size) + 0.5
    cell_index = np.floor((centres[None, :] + phases[:, None]) / cell)
    lo = np.clip(cell_index * cell - phases[:, None], 0.0, size)[..., None]  # (N, size, 1)
    hi = np.clip((cell_index + 1) * cell - phases[:, None], 0.0, size)[..., None]
    pix = np.arange(size)[None, None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return (overlap / overlap.sum(axis=2, keepdims=True)).astype(np.float32)


def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Pixelation: each image is replaced by flat cells of 1/0.85..1/0.4 = 1.2..2.5 px, i.e. down-sampled
    to 0.85..0.4 of its side by area averaging and blown back up (ImageNet-C's fractions, Hendrycks &
    Dietterich 2019). The cell grid gets a random per-image offset so that the damage grows smoothly
    with severity instead of depending on how the side divides into cells."""
    cell = 1.0 / _param(PIXELATE_FRACTION, severity)
    n, _, h, w = images.shape
    rows = _cell_matrices(h, cell, rng.uniform(0.0, cell, size=n))
    cols = _cell_matrices(w, cell, rng.uniform(0.0, cell, size=n))
    return rows[:, None] @ images @ cols.transpose(0, 2, 1)[:, None]


def jpeg_compression(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Real JPEG encode/decode with Pillow at quality 25, 18, 15, 10, 7 (ImageNet-C, Hendrycks &
    Dietterich 2019); RGB uses Pillow's default 4:2:0 chroma subsampling."""
    from PIL import Image

    quality = _param(JPEG_QUALITY, severity)
    pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    out = np.empty(pixels.shape, dtype=np.uint8)
    for i, pix in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pix[..., 0] if pix.shape[-1] == 1 else pix).save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded).reshape(pix.shape)
    return out.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)


# ----------------------------------------------------------------------------------------------- warps


def elastic_transform(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Elastic deformation (Simard et al. 2003, as in MNIST-C, Mu & Gilmer 2019, and ImageNet-C):
    uniform random displacement fields smoothed by a Gaussian (sigma 3 px at 32x32), normalised to unit
    RMS and scaled to 0.4..1.3 px RMS at 32x32 (both scaled by (size/32)^(1/3)); bilinear resampling with
    ``scipy.ndimage.map_coordinates``, reflecting at the borders."""
    alpha, sigma = _param(ELASTIC_ALPHA_SIGMA, severity)
    scale = _spatial_scale(images)
    n, c, h, w = images.shape
    fields = rng.uniform(-1.0, 1.0, size=(2, n, h, w))
    fields = ndimage.gaussian_filter(fields, sigma=(0, 0, sigma * scale, sigma * scale), mode="reflect")
    rms = np.sqrt((fields**2).mean(axis=(0, 2, 3), keepdims=True))
    fields *= (alpha * scale) / np.maximum(rms, 1e-12)
    planes = images.reshape(n * c, h, w)  # interpolate 2-D planes; the plane index stays integral
    out = np.empty_like(planes)
    grid_y, grid_x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for start in range(0, n, _ELASTIC_CHUNK):
        stop = min(n, start + _ELASTIC_CHUNK)
        coords = np.empty((3, stop - start, c, h, w), dtype=np.float32)
        coords[0] = np.arange(start * c, stop * c).reshape(-1, c)[:, :, None, None]
        coords[1] = (grid_y + fields[0, start:stop])[:, None]
        coords[2] = (grid_x + fields[1, start:stop])[:, None]
        out[start * c : stop * c] = ndimage.map_coordinates(
            planes, coords.reshape(3, -1, h, w), order=1, mode="reflect"
        )
    return out.reshape(images.shape)


# -------------------------------------------------------------------------------------------- registry


def register_corruption(name: str, fn: CorruptionFn, registry: dict[str, CorruptionFn] | None = None) -> None:
    """Add ``fn`` under ``name`` to ``registry`` (default :data:`CORRUPTIONS`); ValueError if taken.

    ``fn(images, severity, rng)`` must return an array of the images' shape; :func:`corrupt` clips it.
    """
    target = CORRUPTIONS if registry is None else registry
    if not name or not isinstance(name, str) or name == "clean":
        raise ValueError(f"corruption name must be a non-empty string other than 'clean', got {name!r}")
    if name in target:
        raise ValueError(f"corruption {name!r} is already registered (by {target[name].__qualname__})")
    target[name] = fn


def _build_registry(entries: Sequence[tuple[str, CorruptionFn]]) -> dict[str, CorruptionFn]:
    registry: dict[str, CorruptionFn] = {}
    for name, fn in entries:
        register_corruption(name, fn, registry)
    return registry


CORRUPTIONS: dict[str, CorruptionFn] = _build_registry(
    [
        ("gaussian_noise", gaussian_noise),
        ("shot_noise", shot_noise),
        ("impulse_noise", impulse_noise),
        ("defocus_blur", defocus_blur),
        ("motion_blur", motion_blur),
        ("contrast", contrast),
        ("brightness", brightness),
        ("pixelate", pixelate),
        ("jpeg_compression", jpeg_compression),
        ("elastic_transform", elastic_transform),
    ]
)


def _validate_images(images: object) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be NCHW with C in (1, 3), got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    x = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("images hold NaN or inf values")
    if x.size and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(f"images must lie in [0, 1], got range [{float(x.min())}, {float(x.max())}]")
    return x


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5) to an NCHW float batch, deterministically.

    Implements the corruption families of ImageNet-C (Hendrycks & Dietterich 2019) and MNIST-C
    (Mu & Gilmer 2019) for grayscale (C=1) and RGB (C=3) images of any size.

    Args:
        images: float array (N, C, H, W), values in [0, 1]; not modified.
        name: a key of :data:`CORRUPTIONS`.
        severity: 1 (mild) .. 5 (severe).
        seed: seeds ``np.random.default_rng``; equal seeds give equal outputs.

    Returns:
        A new float32 array of the same shape, clipped to [0, 1].

    Raises:
        ValueError: unknown name (the message lists the choices), severity outside 1..5, bad shape/dtype.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid choices: {', '.join(CORRUPTIONS)}")
    _check_severity(severity)
    x = _validate_images(images)
    if len(x) == 0:
        return x.copy()
    out = CORRUPTIONS[name](x, int(severity), np.random.default_rng(seed))
    if out.shape != x.shape:
        raise RuntimeError(f"corruption {name!r} returned shape {out.shape} for input {x.shape}")
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
