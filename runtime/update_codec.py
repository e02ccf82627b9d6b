"""Parameter-update encodings, numpy only, shared by the server (encoder) and the device (decoder).

Three encodings of an update to a bundle's adaptable parameters (payloads are :mod:`runtime.arrays` blobs):

* ``"f32"`` — the full parameter set, float32 (``p/<name>``). Needs no base.
* ``"int8_delta"`` — the difference to the base version the device holds, per tensor symmetric int8 with one
  float32 scale (``q/<name>`` int8, ``s/<name>`` scale): ``delta ≈ q · s`` with ``s = max|delta| / 127``, so
  each element's error is at most ``s / 2``.
* ``"int8_topk_delta"`` — only the ``k = ceil(fraction · size)`` largest-magnitude entries of each tensor's
  delta, int8 with a per-tensor scale (``i/<name>`` flat indices, uint16 for tensors of at most 65536
  entries else uint32; ``q/<name>``, ``s/<name>``). Each kept entry costs 3 (or 5) bytes against 1 for a
  dense int8 delta, so top-k pays off below a third (a fifth) of the entries.

Lossy encodings are used with **error feedback** on the sender (Seide et al. 2014, "1-bit SGD"; Karimireddy
et al. 2019, EF-SGD, Alg. 2; Gao et al. 2024, EControl): what a message leaves out is kept as a residual
``e`` and added to the next delta, ``c_t = C(Δ_t + e_t)``, ``e_{t+1} = Δ_t + e_t − D(c_t)``, so the sum of
what the device applies tracks the sum of the true deltas and nothing is lost, only delayed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from runtime.arrays import decode_arrays, encode_arrays
from runtime.errors import InputError

ENCODINGS = ("f32", "int8_delta", "int8_topk_delta")
DELTA_ENCODINGS = ENCODINGS[1:]


class UpdateCodecError(InputError):
    """An update payload cannot be encoded or decoded (unknown encoding, names or shapes that do not fit)."""


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric int8 of ``x`` with one scale ``max|x| / 127`` (0 for an all-zero tensor): ``(q, scale)``."""
    x = np.asarray(x, dtype=np.float32)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(peak / 127.0)
    if scale == 0.0:
        return np.zeros(x.shape, dtype=np.int8), np.float32(0.0)
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale


def _topk_indices(x: np.ndarray, fraction: float) -> np.ndarray:
    flat = np.abs(x.reshape(-1))
    k = max(1, math.ceil(fraction * flat.size))
    dtype = np.uint16 if flat.size <= 1 << 16 else np.uint32  # 2-byte indices for tensors up to 65536 entries
    if k >= flat.size:
        return np.arange(flat.size, dtype=dtype)
    return np.sort(np.argpartition(flat, flat.size - k)[flat.size - k :]).astype(dtype)


def encode_full(params: Mapping[str, np.ndarray]) -> bytes:
    """The ``"f32"`` payload of a full parameter set."""
    return encode_arrays({f"p/{k}": np.asarray(v, dtype=np.float32) for k, v in params.items()})


def encode_delta(delta: Mapping[str, np.ndarray], encoding: str, topk_fraction: float = 1.0) -> bytes:
    """The payload of ``delta`` in a delta encoding (``topk_fraction`` in (0, 1] for ``"int8_topk_delta"``)."""
    if encoding not in DELTA_ENCODINGS:
        raise UpdateCodecError(f"encoding {encoding!r} is not one of {DELTA_ENCODINGS}")
    if not 0.0 < topk_fraction <= 1.0:
        raise UpdateCodecError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        x = np.asarray(value, dtype=np.float32)
        if encoding == "int8_topk_delta":
            idx = _topk_indices(x, topk_fraction)
            arrays[f"i/{name}"] = idx
            x = x.reshape(-1)[idx]
        arrays[f"q/{name}"], scale = quantize_int8(x)
        arrays[f"s/{name}"] = np.asarray(scale, dtype=np.float32)
    return encode_arrays(arrays)


def _split(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        tag, sep, name = key.partition("/")
        if not sep or tag not in "pqsi" or not name:
            raise UpdateCodecError(f"payload entry {key!r} is not <p|q|s|i>/<name>")
        parts.setdefault(name, {})[tag] = value
    return parts


def decode_delta(payload: bytes, encoding: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The float32 delta a delta payload carries; every name must be in ``shapes`` (missing names: zero)."""
    if encoding not in DELTA_ENCODINGS:
        raise UpdateCodecError(f"encoding {encoding!r} is not one of {DELTA_ENCODINGS}")
    out = {}
    for name, part in _split(decode_arrays(payload)).items():
        if name not in shapes:
            raise UpdateCodecError(f"delta names unknown parameter {name!r}")
        shape, size = tuple(shapes[name]), int(np.prod(shapes[name], dtype=np.int64))
        q, scale = part.get("q"), part.get("s")
        if q is None or scale is None or q.dtype != np.int8 or scale.shape != () or not np.isfinite(scale):
            raise UpdateCodecError(f"delta of {name!r} needs int8 q/ and a finite scalar s/ entry")
        values = q.astype(np.float32) * np.float32(scale)
        if encoding == "int8_topk_delta":
            idx = part.get("i")
            if (idx is None or idx.dtype.kind != "u" or idx.shape != q.shape or q.ndim != 1
                    or (idx.size and int(idx.max()) >= size)):
                raise UpdateCodecError(f"top-k delta of {name!r} has bad indices for shape {shape}")
            dense = np.zeros(size, dtype=np.float32)
            dense[idx.astype(np.int64)] = values
            values = dense
        if values.size != size:
            raise UpdateCodecError(f"delta of {name!r} has {values.size} values, parameter shape {shape}")
        out[name] = values.reshape(shape)
    return out


def decode_update(
    payload: bytes, encoding: str, base: Mapping[str, np.ndarray] | None, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """The parameters an update yields: the full set for ``"f32"``, ``base + delta`` for a delta encoding."""
    if encoding == "f32":
        parts = _split(decode_arrays(payload))
        if any(set(p) != {"p"} for p in parts.values()):
            raise UpdateCodecError("an f32 payload holds only p/<name> entries")
        return {name: p["p"].astype(np.float32) for name, p in parts.items()}
    if base is None:
        raise UpdateCodecError(f"a {encoding} update needs the base parameters")
    delta = decode_delta(payload, encoding, shapes)
    return {k: (np.asarray(v, dtype=np.float32) + delta[k]).astype(np.float32) if k in delta
            else np.asarray(v, dtype=np.float32).copy() for k, v in base.items()}


@dataclass(frozen=True)
class EncodedDelta:
    """One compressed delta: its payload, what the receiver will decode from it, and the residual left."""

    payload: bytes
    decoded: dict[str, np.ndarray] = field(repr=False)
    residual: dict[str, np.ndarray] = field(repr=False)


def compress_delta(
    delta: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray] | None, encoding: str,
    topk_fraction: float = 1.0,
) -> EncodedDelta:
    """Error-feedback compression step: encode ``delta + residual``; the new residual is what was left out."""
    corrected = {k: np.asarray(v, dtype=np.float32) + (np.asarray(residual[k], dtype=np.float32)
                                                       if residual and k in residual else np.float32(0))
                 for k, v in delta.items()}
    payload = encode_delta(corrected, encoding, topk_fraction)
    decoded = decode_delta(payload, encoding, {k: v.shape for k, v in corrected.items()})
    return EncodedDelta(payload, decoded, {k: corrected[k] - decoded[k] for k in corrected})


class ErrorFeedbackEncoder:
    """A sender's compressor for one stream of deltas (one cohort), keeping the residual between calls."""

    def __init__(self, encoding: str, topk_fraction: float = 1.0) -> None:
        """Compress with ``encoding`` (a delta encoding) and ``topk_fraction``."""
        encode_delta({}, encoding, topk_fraction)  # validates both
        self.encoding = encoding
        self.topk_fraction = topk_fraction
        self.residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray]) -> EncodedDelta:
        """Compress ``delta`` plus the carried residual; keep the new residual."""
        out = compress_delta(delta, self.residual, self.encoding, self.topk_fraction)
        self.residual = out.residual
        return out
