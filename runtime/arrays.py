"""A small canonical, pickle-free byte encoding of named numpy arrays (numpy only; device and server share it).

Layout: ``b"ELT1"``, a little-endian uint32 header length, a JSON header listing each array's name, dtype,
shape, offset and byte count (sorted by name), then the arrays' little-endian C-order bytes. The same
arrays always encode to the same bytes, so content addressing deduplicates them and signatures over them
are stable.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

from runtime.errors import InputError

MAGIC = b"ELT1"
_ALLOWED_KINDS = "fiub"


class ArrayCodecError(InputError):
    """Bytes are not a valid array encoding."""


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode ``arrays`` (name → numeric array) canonically; see the module docstring."""
    entries: list[dict[str, object]] = []
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(arrays):
        arr = np.asarray(arrays[name])
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"array {name!r}: dtype {arr.dtype} cannot be encoded")
        data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).tobytes()
        entries.append(
            {"name": name, "dtype": arr.dtype.newbyteorder("<").str, "shape": list(arr.shape),
             "offset": offset, "nbytes": len(data)}
        )
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"arrays": entries}, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def decode_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Decode bytes made by :func:`encode_arrays` into new arrays (native byte order)."""
    if len(blob) < 8 or blob[:4] != MAGIC:
        raise ArrayCodecError("not an encoded array blob (bad magic)")
    (hlen,) = struct.unpack("<I", blob[4:8])
    try:
        header = json.loads(blob[8 : 8 + hlen].decode("utf-8"))
        entries = header["arrays"]
        body = memoryview(blob)[8 + hlen :]
        out: dict[str, np.ndarray] = {}
        for e in entries:
            dtype = np.dtype(e["dtype"])
            start, nbytes = int(e["offset"]), int(e["nbytes"])
            shape = tuple(int(d) for d in e["shape"])
            if dtype.kind not in _ALLOWED_KINDS or min(shape, default=0) < 0 or start < 0 or (
                    start + nbytes > len(body) or nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize):
                raise ArrayCodecError(f"array {e['name']!r}: inconsistent size or dtype in blob")
            arr = np.frombuffer(body[start : start + nbytes], dtype=dtype).reshape(shape)
            out[str(e["name"])] = arr.astype(dtype.newbyteorder("="), copy=True)
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ArrayCodecError):
            raise
        raise ArrayCodecError(f"unreadable array blob: {exc}") from exc
    return out
