"""Decoder of the packed N:M transport encoding (``.nmpack``) of ONNX and TFLite files: numpy and the standard
library only.

An N:M-sparse weight keeps at most N non-zero values in every group of M consecutive values along its input
dimension (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", the 2:4 pattern of sparse tensor
cores; Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch"). Neither
CPU runtime executes it faster, but it halves what has to travel: a pack stores, per packed tensor, only the N
kept values of every group plus their positions, and everything else of the model file byte for byte.

Decoding needs no ONNX, protobuf or flatbuffers library. The encoder (:mod:`exporter.packing`) cut each packed
tensor's bytes out of the serialized model (an ONNX ``raw_data``, a TFLite buffer) and recorded where they were,
so decoding is byte splicing plus a numpy scatter; the result is **byte-identical** to the original file, which
the decoder proves against the SHA-256 stored in the header (and a bundle manifest's digest of the model can be
checked after it).

Format, versions 1 and 2 (all integers little-endian; version 2 only adds ``spatial`` to each record, and the
encoder writes it only when some record needs axis 2)::

    header (56 bytes)
      0   4  magic  b"NMPK"
      4   2  u16    format version (1 or 2)
      6   1  u8     payload compression: 0 none, 1 zlib, 2 lzma
      7   1  u8     reserved, 0
      8   8  u64    length of the original ONNX file
      16 32  bytes  SHA-256 of the original ONNX file
      48  8  u64    length of the (possibly compressed) payload that follows
    payload
      u32 record count R
      u64 length S, then S bytes: the original file with every packed tensor's raw_data bytes removed
      R records, in increasing ``offset`` order:
        u16 name length, name (UTF-8)
        u64 offset      where the tensor's bytes start in the original file
        u32 rows, u32 cols   the tensor viewed as 2-D: (dims[0], product of the other dims)
        u8 itemsize (1, 2, 4 or 8 bytes), u8 n, u8 m,
        u8 axis         1: groups of m run along each row (Conv/Gemm-transB weights: the input dimension
                        flattened as (C_in, kh, kw)); 0: groups run down each column (MatMul weights (K, N));
                        2: each row is stored channels-last as (spatial, channels) and the groups run along its
                        channels-first flattening (channels, spatial) (TFLite OHWI conv weights of a model pruned
                        in torch's OIHW order)
        u8 flags        bit 0: a negative-zero bitmap follows (floats: pruned -0.0 values, e.g. after BN folding)
        u64 values length, u64 index length, u64 negative-zero bitmap length
        u32 spatial     version 2 only: the spatial size of an axis-2 row (kh·kw), else 1
        values          n kept elements per group (groups in row-major order of the grouped view), raw bytes
        index           each kept element's position in its group, ceil(log2 m) bits (MSB first), bit-packed;
                        strictly increasing within a group (for 2:4: 2 bits, 4 positions per byte)
        negzero         one bit per pruned position (row-major, MSB first): 1 = the value is -0.0

For fp32 2:4 a packed tensor shrinks to 53 % (values 50 % + indices 3 %); for int8 2:4 to 62.5 %.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import BundleError

MAGIC = b"NMPK"
VERSION = 2
VERSIONS = (1, 2)
HEADER = struct.Struct("<4sHBBQ32sQ")
RECORD_HEAD = struct.Struct("<QIIBBBBBQQQ")
RECORD_HEADS = {1: RECORD_HEAD, 2: struct.Struct("<QIIBBBBBQQQI")}
AXES = (0, 1, 2)
COMPRESSIONS = {"none": 0, "zlib": 1, "lzma": 2}
FLAG_NEGZERO = 1
ITEMSIZES = (1, 2, 4, 8)
MAX_MODEL_BYTES = 2 << 30  # protobuf (ONNX) and flatbuffers (TFLite) files are below 2 GiB


class PackFormatError(BundleError, ValueError):
    """A ``.nmpack`` is truncated, corrupted, of another format or version, or decodes to the wrong bytes."""


@dataclass(frozen=True)
class PackHeader:
    """The fixed header of a pack."""

    version: int
    compression: str
    original_length: int
    original_sha256: str
    payload_length: int


@dataclass(frozen=True)
class TensorRecord:
    """One packed tensor: where its raw_data goes in the original file, its 2-D view and its pattern."""

    name: str
    offset: int
    rows: int
    cols: int
    itemsize: int
    n: int
    m: int
    axis: int
    values: bytes
    index: bytes
    negzero: bytes
    spatial: int = 1

    @property
    def raw_length(self) -> int:
        """Length in bytes of the decoded raw_data."""
        return self.rows * self.cols * self.itemsize


def index_bits(m: int) -> int:
    """Bits per stored position for groups of ``m``: ``ceil(log2 m)`` (1 for m = 2)."""
    return max(1, math.ceil(math.log2(m)))


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Bit-pack non-negative integers below ``2**bits``, MSB first, zero-padded to whole bytes."""
    v = np.asarray(values, dtype=np.uint8).reshape(-1, 1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    return np.packbits(((v >> shifts) & 1).astype(np.uint8).ravel()).tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers of ``bits`` bits each, as uint8."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint16)
    return (flat.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint8)


def sign_mask(itemsize: int) -> int:
    """The bit pattern of an IEEE ``-0.0`` of ``itemsize`` bytes, read as an unsigned little-endian integer."""
    return 1 << (8 * itemsize - 1)


def encoded_lengths(rows: int, cols: int, itemsize: int, n: int, m: int) -> tuple[int, int]:
    """``(values length, index length)`` in bytes of a packed ``rows × cols`` tensor."""
    kept = rows * cols // m * n
    return kept * itemsize, math.ceil(kept * index_bits(m) / 8)


def grouped_view(view: np.ndarray, axis: int, spatial: int, m: int) -> np.ndarray:
    """The ``(groups, m)`` view of a 2-D tensor ``view`` (``rows × cols``) for ``axis`` (see the format)."""
    if axis == 2:
        rows, cols = view.shape
        view = view.reshape(rows, spatial, cols // spatial).transpose(0, 2, 1)
    return np.ascontiguousarray(view.T if axis == 0 else view).reshape(-1, m)


def ungrouped_view(grouped: np.ndarray, rows: int, cols: int, axis: int, spatial: int) -> np.ndarray:
    """Inverse of :func:`grouped_view`: the ``rows × cols`` tensor in its stored order."""
    if axis == 0:
        return grouped.reshape(cols, rows).T
    if axis == 2:
        return grouped.reshape(rows, cols // spatial, spatial).transpose(0, 2, 1).reshape(rows, cols)
    return grouped.reshape(rows, cols)


def decode_tensor(record: TensorRecord) -> bytes:
    """The stored bytes of one packed tensor (raises :class:`PackFormatError` on inconsistent records)."""
    _check_record(record)
    groups = record.rows * record.cols // record.m
    dtype = np.dtype(f"<u{record.itemsize}")
    values = np.frombuffer(record.values, dtype=dtype).reshape(groups, record.n)
    index = unpack_bits(record.index, groups * record.n, index_bits(record.m)).reshape(groups, record.n)
    if groups and (index.max() >= record.m or np.any(np.diff(index.astype(np.int16), axis=1) <= 0)):
        raise PackFormatError(f"tensor {record.name!r}: positions out of range or not increasing within a group")
    grouped = np.zeros((groups, record.m), dtype=dtype)
    np.put_along_axis(grouped, index.astype(np.intp), values, axis=1)
    if record.negzero:
        pruned = np.ones((groups, record.m), dtype=bool)
        np.put_along_axis(pruned, index.astype(np.intp), False, axis=1)
        bits = np.unpackbits(np.frombuffer(record.negzero, dtype=np.uint8), count=groups * (record.m - record.n))
        grouped[pruned] = np.where(bits.astype(bool), dtype.type(sign_mask(record.itemsize)), dtype.type(0))
    out = ungrouped_view(grouped, record.rows, record.cols, record.axis, record.spatial)
    return np.ascontiguousarray(out).tobytes()


def _check_record(r: TensorRecord) -> None:
    if r.itemsize not in ITEMSIZES:
        raise PackFormatError(f"tensor {r.name!r}: itemsize {r.itemsize} not in {ITEMSIZES}")
    if not 1 <= r.n < r.m:
        raise PackFormatError(f"tensor {r.name!r}: invalid pattern {r.n}:{r.m}")
    if r.axis not in AXES:
        raise PackFormatError(f"tensor {r.name!r}: axis {r.axis} is not one of {AXES}")
    if r.spatial < 1 or r.cols % r.spatial or (r.axis != 2 and r.spatial != 1):
        raise PackFormatError(
            f"tensor {r.name!r}: spatial size {r.spatial} does not fit axis {r.axis} with {r.cols} columns"
        )
    along = r.rows if r.axis == 0 else r.cols
    if r.rows < 1 or r.cols < 1 or along % r.m:
        raise PackFormatError(f"tensor {r.name!r}: shape ({r.rows}, {r.cols}) axis {r.axis} not divisible by {r.m}")
    values_len, index_len = encoded_lengths(r.rows, r.cols, r.itemsize, r.n, r.m)
    negzero_len = math.ceil(r.rows * r.cols // r.m * (r.m - r.n) / 8) if r.negzero else 0
    got = (len(r.values), len(r.index), len(r.negzero))
    if got != (values_len, index_len, negzero_len):
        raise PackFormatError(
            f"tensor {r.name!r}: section lengths {got} differ from the expected {(values_len, index_len, negzero_len)}"
        )


def read_header(data: bytes) -> PackHeader:
    """Parse and check the fixed header (magic, version, compression, payload length)."""
    if len(data) < HEADER.size:
        raise PackFormatError(f"pack is {len(data)} bytes, shorter than its {HEADER.size}-byte header")
    magic, version, compression, _reserved, original_length, digest, payload_length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PackFormatError(f"bad magic {magic!r}: not an N:M pack (expected {MAGIC!r})")
    if version not in VERSIONS:
        raise PackFormatError(f"unsupported pack format version {version} (this runtime reads versions {VERSIONS})")
    names = {code: name for name, code in COMPRESSIONS.items()}
    if compression not in names:
        raise PackFormatError(f"unknown payload compression code {compression}")
    if original_length > MAX_MODEL_BYTES:
        raise PackFormatError(f"header says the model is {original_length} bytes; models are at most "
                              f"{MAX_MODEL_BYTES} bytes (the ONNX and TFLite file limit)")
    if len(data) - HEADER.size != payload_length:
        raise PackFormatError(
            f"payload length mismatch: header says {payload_length} bytes, pack holds {len(data) - HEADER.size}"
        )
    return PackHeader(version, names[compression], original_length, digest.hex(), payload_length)


def payload_limit(original_length: int) -> int:
    """The most bytes a pack of an ``original_length``-byte model can decompress to: the stripped model and
    the packed tensors' sections are each at most the model's size, the names and record headers far less.
    Decoding stops there (a decompression bomb is refused before it fills memory)."""
    return 4 * original_length + (1 << 20)


def _decompress(payload: bytes, compression: str, original_length: int) -> bytes:
    limit = payload_limit(original_length)
    if compression == "none":
        return payload
    try:
        if compression == "zlib":
            decoder: Any = zlib.decompressobj()
            out = decoder.decompress(payload, limit)
            done = decoder.eof and not decoder.unconsumed_tail
        else:
            decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out = decoder.decompress(payload, max_length=limit)
            done = decoder.eof
    except (zlib.error, lzma.LZMAError) as exc:
        raise PackFormatError(f"{compression} payload does not decompress: {exc}") from exc
    if not done:
        raise PackFormatError(f"{compression} payload is truncated or decompresses to more than {limit} bytes, "
                              f"the most a pack of a {original_length}-byte model can hold")
    return out


class _Reader:
    """Bounds-checked sequential reads from the payload."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise PackFormatError(f"payload truncated while reading {what} ({size} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))


def _read_record(reader: _Reader, i: int, version: int) -> TensorRecord:
    (name_len,) = reader.unpack(struct.Struct("<H"), f"record {i} name length")
    try:
        name = reader.take(name_len, f"record {i} name").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackFormatError(f"record {i}: name is not UTF-8") from exc
    head = reader.unpack(RECORD_HEADS[version], f"record {i} ({name!r}) header")
    offset, rows, cols, itemsize, n, m, axis, flags, values_len, index_len, negzero_len = head[:11]
    spatial = head[11] if version >= 2 else 1
    if bool(flags & FLAG_NEGZERO) != (negzero_len > 0) or flags & ~FLAG_NEGZERO:
        raise PackFormatError(f"tensor {name!r}: flags {flags} inconsistent with a {negzero_len}-byte bitmap")
    values = reader.take(values_len, f"tensor {name!r} values")
    index = reader.take(index_len, f"tensor {name!r} positions")
    negzero = reader.take(negzero_len, f"tensor {name!r} negative-zero bitmap")
    return TensorRecord(name, offset, rows, cols, itemsize, n, m, axis, values, index, negzero, spatial)


def read_pack(data: bytes) -> tuple[PackHeader, bytes, list[TensorRecord]]:
    """Parse a pack: ``(header, stripped model bytes, records)``, checking every length and bound."""
    header = read_header(data)
    reader = _Reader(_decompress(data[HEADER.size :], header.compression, header.original_length))
    (count,) = reader.unpack(struct.Struct("<I"), "record count")
    (stripped_len,) = reader.unpack(struct.Struct("<Q"), "stripped model length")
    stripped = reader.take(stripped_len, "stripped model")
    records = [_read_record(reader, i, header.version) for i in range(count)]
    if reader.pos != len(reader.data):
        raise PackFormatError(f"{len(reader.data) - reader.pos} unexpected trailing bytes after the last record")
    return header, stripped, records


def unpack(pack: bytes) -> bytes:
    """Decode a ``.nmpack`` into the original model file's bytes (ONNX or TFLite), verified against the header's
    SHA-256.

    Raises :class:`PackFormatError` naming what is wrong: magic, version, compression, truncation, a
    record's lengths or positions, the reconstructed length or digest.
    """
    header, stripped, records = read_pack(bytes(pack))
    parts: list[bytes] = []
    cursor, removed = 0, 0
    for record in records:
        at = record.offset - removed  # where the tensor's bytes were cut out of the stripped model
        if at < cursor or at > len(stripped):
            raise PackFormatError(f"tensor {record.name!r}: offset {record.offset} out of order or out of range")
        parts += [stripped[cursor:at], decode_tensor(record)]
        cursor, removed = at, removed + record.raw_length
    parts.append(stripped[cursor:])
    model = b"".join(parts)
    if len(model) != header.original_length:
        raise PackFormatError(f"decoded model is {len(model)} bytes, header says {header.original_length}")
    digest = hashlib.sha256(model).hexdigest()
    if digest != header.original_sha256:
        raise PackFormatError(f"decoded model sha256 {digest} differs from the header's {header.original_sha256}")
    return model


def is_pack(data: bytes) -> bool:
    """True when ``data`` starts with the pack magic (cheap sniffing; decoding still checks everything)."""
    return bytes(data[: len(MAGIC)]) == MAGIC
