"""Compact binary blocks of a bundle (schema version 2): named arrays, LZMA-compressed (numpy and the standard
library only; the device, the server and the exporter share it).

A block file is ``b"ELZ1"`` followed by a raw LZMA2 stream (dictionary 1 MiB) of the canonical array encoding
of :mod:`runtime.arrays` (``ELT1``: a JSON header naming each array's dtype and shape, then little-endian bytes).
Values are stored exactly (float32 stays float32); the manifest lists every block file's sha256, so the
signature over the manifest covers them. Decoding is bounded (:data:`MAX_DECODED_BYTES`) against
decompression bombs.

Golden inputs on the k/255 grid (``uint8``, N×C×H×W images) are stored as the residual of a lossless
prediction — each pixel minus (left + up − up-left), then each channel minus the previous channel's residual,
modulo 256 (:func:`encode_image_u8`) — which LZMA compresses to about 60 % of the plain bytes for CIFAR-10
photographs; decoding is two cumulative sums and one across channels (:func:`decode_image_u8`), exact.
"""

from __future__ import annotations

import lzma
from collections.abc import Mapping

import numpy as np

from runtime.arrays import ArrayCodecError, decode_arrays, encode_arrays

MAGIC = b"ELZ1"
MAX_DECODED_BYTES = 256 << 20
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]
_DECODE_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]


class BlockError(ArrayCodecError):
    """Bytes are not a valid compressed block."""


def encode_block(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode named arrays into a compressed block (canonical: the same arrays give the same bytes)."""
    return MAGIC + lzma.compress(encode_arrays(arrays), format=lzma.FORMAT_RAW, filters=_FILTERS)


def decode_block(data: bytes, what: str = "block") -> dict[str, np.ndarray]:
    """Decode a block made by :func:`encode_block`; :class:`BlockError` naming ``what`` when it is not one."""
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise BlockError(f"{what} is not a compressed array block (bad magic {bytes(data[:4])!r})")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_DECODE_FILTERS)
    try:
        raw = decoder.decompress(bytes(data[len(MAGIC) :]), max_length=MAX_DECODED_BYTES)
    except lzma.LZMAError as exc:
        raise BlockError(f"{what} is corrupt: {exc}") from exc
    if not decoder.eof:
        raise BlockError(f"{what} is truncated or decodes to more than {MAX_DECODED_BYTES} bytes")
    try:
        return decode_arrays(raw)
    except ArrayCodecError as exc:
        raise BlockError(f"{what}: {exc}") from exc


def checked_float32(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str
) -> dict[str, np.ndarray]:
    """``arrays`` (a decoded block) when it holds exactly the names of ``expected``, each a finite float32 array
    of its shape (in ``expected``'s order); :class:`BlockError` naming ``what`` and the first offender otherwise."""
    if set(arrays) != set(expected):
        raise BlockError(f"{what} holds {sorted(arrays)[:6]}…, expected {sorted(expected)[:6]}… "
                         f"(differing: {sorted(set(arrays) ^ set(expected))[:8]})")
    for name, shape in expected.items():
        values = arrays[name]
        if values.dtype != np.float32 or values.shape != tuple(shape) or not np.all(np.isfinite(values)):
            raise BlockError(f"{what}: {name!r} is {values.dtype} {values.shape}, expected finite float32 "
                             f"{tuple(shape)}")
    return {name: arrays[name] for name in expected}


def encode_image_u8(images: np.ndarray) -> np.ndarray:
    """The prediction residual of uint8 images (N, C, H, W) (see the module docstring); same shape, uint8."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
    r = np.diff(np.diff(x.astype(np.int16), axis=3, prepend=0), axis=2, prepend=0)
    r[:, 1:] -= r[:, :-1].copy()
    return (r % 256).astype(np.uint8)


def decode_image_u8(residual: np.ndarray) -> np.ndarray:
    """Invert :func:`encode_image_u8` exactly."""
    r = np.asarray(residual)
    if r.dtype != np.uint8 or r.ndim != 4:
        raise BlockError(f"an image residual must be uint8 (N, C, H, W), got {r.dtype} {r.shape}")
    x = np.cumsum(r.astype(np.int64), axis=1)
    x = np.cumsum(np.cumsum(x, axis=2), axis=3)
    return (x % 256).astype(np.uint8)
