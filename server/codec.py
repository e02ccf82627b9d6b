"""The server's blob encoding of named numpy arrays: :mod:`runtime.arrays` (shared with the device), with
decoding errors raised as :class:`CodecError` (a storage error).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtime.arrays import MAGIC, ArrayCodecError
from runtime.arrays import decode_arrays as _decode_arrays
from runtime.arrays import encode_arrays as _encode_arrays
from server.errors import StorageError

__all__ = ["MAGIC", "CodecError", "decode_array", "decode_arrays", "encode_array", "encode_arrays"]


class CodecError(StorageError):
    """Bytes are not a valid array encoding."""


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode ``arrays`` (name → numeric array) canonically; see :mod:`runtime.arrays`."""
    return _encode_arrays(arrays)


def decode_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Decode bytes made by :func:`encode_arrays` into new arrays (native byte order)."""
    try:
        return _decode_arrays(blob)
    except ArrayCodecError as exc:
        raise CodecError(str(exc)) from exc


def encode_array(array: np.ndarray) -> bytes:
    """Encode one unnamed array (stored under the empty name)."""
    return encode_arrays({"": array})


def decode_array(blob: bytes) -> np.ndarray:
    """Decode a blob made by :func:`encode_array`."""
    arrays = decode_arrays(blob)
    if list(arrays) != [""]:
        raise CodecError(f"expected one unnamed array, found {sorted(arrays)}")
    return arrays[""]
