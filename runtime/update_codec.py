"""Parameter-update encodings, numpy only, shared by the server (encoder) and the device (decoder).

Three encodings of an update to a bundle's adaptable parameters:

* ``"f32"`` — the full parameter set, float32 (a :mod:`runtime.arrays` blob of ``p/<name>``). Needs no base.
* ``"int8_delta"`` — the difference to the base version the device holds, per tensor symmetric int8 with one
  float32 scale: ``delta ≈ q · s`` with ``s = max|delta| / 127``, so each element's error is at most ``s / 2``.
* ``"int8_topk_delta"`` — only the ``k = ceil(fraction · size)`` largest-magnitude entries of each tensor's
  delta, int8 with a per-tensor scale and flat indices (uint16 for tensors of at most 65536 entries, else
  uint32). Each kept entry costs 3 (or 5) bytes against 1 for a dense int8 delta, so top-k pays off below a
  third (a fifth) of the entries.

Delta payloads use a compact binary layout (little-endian; parameter tensors are small — a BN layer's γ is
tens of floats — so a self-describing header would outweigh the values)::

    b"ELD1", u16 tensor count, then per tensor, names in sorted order:
      u8 name length, name (UTF-8), u32 kept count n, f32 scale,
      u8 flags (bit 0: uint32 indices; bit 1: varint-gap indices; bit 2: dense, every entry, no indices),
      [int8_topk_delta only, unless dense: n strictly increasing flat indices: uint16, uint32, or (bit 1) a u32
       byte count then LEB128 varints of the gaps (first index, then index[i] - index[i-1])], n int8 values

A tensor whose delta is all zero is written with ``n = 0`` in both delta encodings (it decodes as zeros), so
parameters a message does not change cost a header only (e.g. a bundle's full trainable weights when only
its adaptable parameters moved). The encoder writes top-k indices as varint gaps whenever that is shorter than
fixed-width indices (about 1 byte per kept entry when at least 1/128 of a tensor is kept). With
``dense_below`` a top-k delta sends tensors of at most that many entries whole (int8, no indices): small
tensors (convolutions, normalisation statistics) cost little and stay consistent with each other.

Lossy encodings are used with **error feedback** on the sender (Seide et al. 2014, "1-bit SGD"; Karimireddy
et al. 2019, EF-SGD, Alg. 2; Gao et al. 2024, EControl): what a message leaves out is kept as a residual
``e`` and added to the next delta, ``c_t = C(Δ_t + e_t)``, ``e_{t+1} = Δ_t + e_t − D(c_t)``, so the sum of
what the device applies tracks the sum of the true deltas and nothing is lost, only delayed.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from runtime.arrays import decode_arrays, encode_arrays
from runtime.errors import InputError

ENCODINGS = ("f32", "int8_delta", "int8_topk_delta")
DELTA_ENCODINGS = ENCODINGS[1:]
DELTA_MAGIC = b"ELD1"
_TENSOR_HEAD = struct.Struct("<If")  # kept count, scale
_WIDE_INDICES = 1  # flags bit 0: uint32 indices
_VARINT_INDICES = 2  # flags bit 1: LEB128 varint gaps
_DENSE = 4  # flags bit 2: every entry, no indices (top-k of a small tensor)
_FLAGS = _WIDE_INDICES | _VARINT_INDICES | _DENSE


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


def encode_varints(values: np.ndarray) -> bytes:
    """LEB128 (7 bits per byte, high bit = more) of non-negative integers, vectorised."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.size, dtype=np.int64)
    for shift in (7, 14, 21, 28, 35):
        nbytes += (v >> np.uint64(shift)) > 0
    ends = np.cumsum(nbytes)
    out = np.zeros(int(ends[-1]), dtype=np.uint8)
    starts = ends - nbytes
    for j in range(int(nbytes.max())):
        live = nbytes > j
        byte = (v[live] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[live] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[live] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def decode_varints(data: bytes, count: int, what: str) -> np.ndarray:
    """``count`` LEB128 integers from ``data`` (exactly), as int64; :class:`UpdateCodecError` when malformed."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != count or (count and ends[-1] != raw.size - 1) or (count == 0 and raw.size):
        raise UpdateCodecError(f"{what}: {raw.size} varint bytes do not hold exactly {count} integers")
    starts = np.r_[0, ends[:-1] + 1] if count else np.zeros(0, dtype=np.int64)
    if count and int((ends - starts).max()) > 5:
        raise UpdateCodecError(f"{what}: a varint is longer than 6 bytes")
    out = np.zeros(count, dtype=np.int64)
    for j in range(int((ends - starts).max()) + 1 if count else 0):
        live = starts + j <= ends
        out[live] |= (raw[starts[live] + j].astype(np.int64) & 0x7F) << (7 * j)
    return out


def encode_full(params: Mapping[str, np.ndarray]) -> bytes:
    """The ``"f32"`` payload of a full parameter set."""
    return encode_arrays({f"p/{k}": np.asarray(v, dtype=np.float32) for k, v in params.items()})


def encode_delta(delta: Mapping[str, np.ndarray], encoding: str, topk_fraction: float = 1.0,
                 dense_below: int = 0) -> bytes:
    """The payload of ``delta`` in a delta encoding (``topk_fraction`` in (0, 1] for ``"int8_topk_delta"``;
    tensors of at most ``dense_below`` entries are sent whole)."""
    if encoding not in DELTA_ENCODINGS:
        raise UpdateCodecError(f"encoding {encoding!r} is not one of {DELTA_ENCODINGS}")
    if not 0.0 < topk_fraction <= 1.0:
        raise UpdateCodecError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    if dense_below < 0:
        raise UpdateCodecError(f"dense_below must be >= 0, got {dense_below}")
    if len(delta) >= 1 << 16:
        raise UpdateCodecError(f"a delta holds at most 65535 tensors, got {len(delta)}")
    parts = [DELTA_MAGIC, struct.pack("<H", len(delta))]
    for name in sorted(delta):
        raw = name.encode("utf-8")
        if not 0 < len(raw) < 256:
            raise UpdateCodecError(f"parameter name {name!r} must be 1..255 bytes of UTF-8")
        x = np.asarray(delta[name], dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise UpdateCodecError(f"delta of {name!r} contains NaN or infinite values")
        if not np.any(x):  # an unchanged tensor: header only
            parts += [struct.pack("<B", len(raw)), raw, _TENSOR_HEAD.pack(0, 0.0), struct.pack("<B", 0)]
            continue
        dense = encoding == "int8_topk_delta" and x.size <= dense_below
        idx = _topk_indices(x, topk_fraction) if encoding == "int8_topk_delta" and not dense else None
        q, scale = quantize_int8(x if idx is None else x[idx])
        flags, index_bytes = (_DENSE if dense else 0), b""
        if idx is not None:
            fixed = idx.astype("<u4" if idx.dtype == np.uint32 else "<u2").tobytes()
            gaps = encode_varints(np.diff(idx.astype(np.int64), prepend=0))
            if len(gaps) + 4 < len(fixed):
                flags, index_bytes = _VARINT_INDICES, struct.pack("<I", len(gaps)) + gaps
            else:
                flags, index_bytes = (_WIDE_INDICES if idx.dtype == np.uint32 else 0), fixed
        parts += [struct.pack("<B", len(raw)), raw, _TENSOR_HEAD.pack(q.size, float(scale)), struct.pack("<B", flags)]
        parts += [index_bytes, q.tobytes()]
    return b"".join(parts)


def _read(payload: bytes, pos: int, size: int, what: str) -> tuple[bytes, int]:
    if size < 0 or pos + size > len(payload):
        raise UpdateCodecError(f"delta payload truncated while reading {what} ({size} bytes at offset {pos})")
    return payload[pos : pos + size], pos + size


def _parse_delta(payload: bytes, topk: bool) -> dict[str, tuple[np.ndarray, np.float32, np.ndarray | None]]:
    """``name -> (int8 values, scale, indices or None)`` of a delta payload, every length checked."""
    magic, pos = _read(payload, 0, len(DELTA_MAGIC), "the magic")
    if magic != DELTA_MAGIC:
        raise UpdateCodecError(f"delta payload starts with {magic!r}, expected {DELTA_MAGIC!r}")
    (count,), pos = struct.unpack("<H", _read(payload, pos, 2, "the tensor count")[0]), pos + 2
    out: dict[str, tuple[np.ndarray, np.float32, np.ndarray | None]] = {}
    for i in range(count):
        (length,) = struct.unpack("<B", _read(payload, pos, 1, f"tensor {i}'s name length")[0])
        raw, pos = _read(payload, pos + 1, length, f"tensor {i}'s name")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UpdateCodecError(f"tensor {i}'s name is not UTF-8") from exc
        head, pos = _read(payload, pos, _TENSOR_HEAD.size + 1, f"the header of {name!r}")
        n, scale = _TENSOR_HEAD.unpack(head[:-1])
        flags = head[-1]
        if (flags & ~_FLAGS or (flags and not topk) or (flags & _VARINT_INDICES and flags & _WIDE_INDICES)
                or (flags & _DENSE and flags != _DENSE) or not math.isfinite(scale) or name in out):
            raise UpdateCodecError(f"delta of {name!r}: bad flags {flags}, scale {scale} or a repeated name")
        idx = None
        if flags & _DENSE:
            pass
        elif topk and flags & _VARINT_INDICES:
            (length,), pos = struct.unpack("<I", _read(payload, pos, 4, f"the index length of {name!r}")[0]), pos + 4
            data, pos = _read(payload, pos, length, f"the indices of {name!r}")
            idx = np.cumsum(decode_varints(data, n, f"the indices of {name!r}"))
        elif topk:
            width = 4 if flags & _WIDE_INDICES else 2
            data, pos = _read(payload, pos, n * width, f"the indices of {name!r}")
            idx = np.frombuffer(data, dtype="<u4" if width == 4 else "<u2")
        data, pos = _read(payload, pos, n, f"the values of {name!r}")
        out[name] = (np.frombuffer(data, dtype=np.int8), np.float32(scale), idx)
    if pos != len(payload):
        raise UpdateCodecError(f"{len(payload) - pos} unexpected bytes after the last tensor of the delta payload")
    return out


def decode_delta(payload: bytes, encoding: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The float32 delta a delta payload carries; every name must be in ``shapes`` (missing names: zero)."""
    if encoding not in DELTA_ENCODINGS:
        raise UpdateCodecError(f"encoding {encoding!r} is not one of {DELTA_ENCODINGS}")
    out = {}
    for name, (q, scale, idx) in _parse_delta(bytes(payload), encoding == "int8_topk_delta").items():
        if name not in shapes:
            raise UpdateCodecError(f"delta names unknown parameter {name!r}")
        shape, size = tuple(shapes[name]), int(np.prod(shapes[name], dtype=np.int64))
        values = q.astype(np.float32) * scale
        if q.size == 0:  # an unchanged tensor
            out[name] = np.zeros(shape, dtype=np.float32)
            continue
        if idx is not None:
            if idx.size and (int(idx.max()) >= size or int(idx.min()) < 0
                             or np.any(np.diff(idx.astype(np.int64)) <= 0)):
                raise UpdateCodecError(f"top-k delta of {name!r} has indices out of range or not increasing "
                                       f"for shape {shape}")
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
        arrays = decode_arrays(payload)
        bad = [k for k in arrays if not k.startswith("p/") or len(k) == 2]
        if bad:
            raise UpdateCodecError(f"an f32 payload holds only p/<name> entries, got {bad}")
        return {k[2:]: v.astype(np.float32) for k, v in arrays.items()}
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


def decoded_below_zero(decoded: Mapping[str, np.ndarray], exact: Mapping[str, np.ndarray],
                       names: Iterable[str]) -> list[str]:
    """The parameters of ``names`` (ones that must be >= 0: variances, a model's ``nonnegative_params``) that a
    lossy delta decodes below 0 (``decoded``) where the exact values are not: such an update or submission goes
    in full instead (int8 rounding around 0 would otherwise hand its receiver a negative variance)."""
    return sorted(k for k in names if k in decoded and k in exact and np.any((decoded[k] < 0) & (exact[k] >= 0)))


def compress_delta(
    delta: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray] | None, encoding: str,
    topk_fraction: float = 1.0, dense_below: int = 0,
) -> EncodedDelta:
    """Error-feedback compression step: encode ``delta + residual``; the new residual is what was left out."""
    corrected = {k: np.asarray(v, dtype=np.float32) + (np.asarray(residual[k], dtype=np.float32)
                                                       if residual and k in residual else np.float32(0))
                 for k, v in delta.items()}
    payload = encode_delta(corrected, encoding, topk_fraction, dense_below)
    decoded = decode_delta(payload, encoding, {k: v.shape for k, v in corrected.items()})
    return EncodedDelta(payload, decoded, {k: corrected[k] - decoded[k] for k in corrected})


class ErrorFeedbackEncoder:
    """A sender's compressor for one stream of deltas (one cohort), keeping the residual between calls."""

    def __init__(self, encoding: str, topk_fraction: float = 1.0, dense_below: int = 0) -> None:
        """Compress with ``encoding`` (a delta encoding), ``topk_fraction`` and ``dense_below``."""
        encode_delta({}, encoding, topk_fraction, dense_below)  # validates them
        self.encoding = encoding
        self.topk_fraction = topk_fraction
        self.dense_below = dense_below
        self.residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray]) -> EncodedDelta:
        """Compress ``delta`` plus the carried residual; keep the new residual."""
        out = compress_delta(delta, self.residual, self.encoding, self.topk_fraction, self.dense_below)
        self.residual = out.residual
        return out
