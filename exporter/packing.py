"""Encoder of the packed N:M transport encoding: an ONNX or TFLite file → one ``.nmpack`` (format:
:mod:`runtime.packing`).

ONNX: every weight initializer (see :func:`exporter.compress.onnx_nm.weight_initializers`; fp32, int8 or any other
fixed-size type) whose values are N:M sparse along its input dimension is stored as its N kept values per group
plus ``ceil(log2 M)``-bit positions; the rest of the file is kept byte for byte. The encoder finds each
initializer's ``raw_data`` bytes in the serialized ``ModelProto`` with a small protobuf wire-format walk, cuts
them out and records the offsets, so the device decodes by splicing, without ONNX or protobuf, into a
byte-identical file. Zeros are tested bitwise (a float ``-0.0`` in a pruned position is kept in a bitmap), so
the encoding is lossless for any content; :func:`pack_model` decodes its own output and compares before writing.

TFLite: every constant buffer of two or more dimensions (fp32, fp16 or int8) is tried, in the flatbuffer's own
layout: 4-D OHWI convolution filters along torch's input flattening (C_in, kh, kw) — the order the sparsity pass
pruned in — (axis 2), and any tensor along its innermost dimension (axis 1: fully connected ``[out, in]``,
1×1 filters). A buffer's byte range comes from the flatbuffer (``ai_edge_litert``'s generated schema, an
exporter-side dependency); the device decodes by splicing as for ONNX.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from exporter.compress.nm import check_pattern
from exporter.compress.onnx_nm import weight_initializers
from runtime.packing import (
    COMPRESSIONS,
    FLAG_NEGZERO,
    HEADER,
    MAGIC,
    RECORD_HEADS,
    TensorRecord,
    grouped_view,
    index_bits,
    pack_bits,
    sign_mask,
    unpack,
)

logger = logging.getLogger(__name__)

# ONNX TensorProto.DataType → (itemsize, is IEEE float); float8 and packed 4-bit types are not packed.
DTYPES: dict[int, tuple[int, bool]] = {
    1: (4, True), 2: (1, False), 3: (1, False), 4: (2, False), 5: (2, False), 6: (4, False), 7: (8, False),
    9: (1, False), 10: (2, True), 11: (8, True), 12: (4, False), 13: (8, False), 16: (2, True),
}
_GRAPH, _INITIALIZER, _NAME, _RAW_DATA, _DATA_LOCATION = 7, 5, 8, 9, 14


class PackError(RuntimeError):
    """The ONNX file cannot be packed (malformed protobuf, or the pack does not decode to the original)."""


@dataclass(frozen=True)
class PackReport:
    """Sizes before/after packing, the packed tensors and the bytes those tensors took before/after."""

    bytes_before: int
    bytes_after: int
    tensors_packed: tuple[str, ...]
    compression: str = "none"
    tensor_bytes_before: int = 0
    tensor_bytes_after: int = 0

    @property
    def saved_fraction(self) -> float:
        """``1 - bytes_after / bytes_before``."""
        return 1.0 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise PackError(f"malformed protobuf varint at byte {pos}")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, value start, value end)`` of each field of the message in ``buf[start:end]``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            nxt = pos + length
        elif wire == 5:
            nxt = pos + 4
        else:
            raise PackError(f"unsupported protobuf wire type {wire} at byte {pos}")
        if nxt > end:
            raise PackError(f"protobuf field {field} at byte {pos} runs past its message end {end}")
        yield field, wire, pos, nxt
        pos = nxt


def raw_data_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """``name → (start, end)`` of every main-graph initializer's ``raw_data`` bytes in a serialized ModelProto
    (initializers stored externally or without raw_data are left out)."""
    spans: dict[str, tuple[int, int]] = {}
    for field, wire, g0, g1 in _fields(data, 0, len(data)):
        if field != _GRAPH or wire != 2:
            continue
        for f, w, t0, t1 in _fields(data, g0, g1):
            if f != _INITIALIZER or w != 2:
                continue
            name, raw, external = None, None, False
            for tf, tw, v0, v1 in _fields(data, t0, t1):
                if tf == _NAME and tw == 2:
                    name = data[v0:v1].decode("utf-8")
                elif tf == _RAW_DATA and tw == 2:
                    raw = (v0, v1)
                elif tf == _DATA_LOCATION and tw == 0:
                    external = _varint(data, v0, v1)[0] == 1
            if name is not None and raw is not None and not external:
                spans[name] = raw
    return spans


def encode_tensor(
    name: str, offset: int, raw: bytes, itemsize: int, is_float: bool, shape: tuple[int, int], axis: int,
    n: int, m: int, spatial: int = 1,
) -> TensorRecord | None:
    """The pack record of one tensor's raw bytes, or None when it is not ``n:m`` along ``axis`` (bitwise zeros;
    for floats ``±0.0``; axis 2: channels-last rows of ``spatial`` positions, see :mod:`runtime.packing`) or
    packing would not make it smaller."""
    rows, cols = shape
    if (rows if axis == 0 else cols) % m or len(raw) != rows * cols * itemsize or cols % spatial:
        return None
    dtype = np.dtype(f"<u{itemsize}")
    view = np.frombuffer(raw, dtype=dtype).reshape(rows, cols)
    groups = grouped_view(view, axis, spatial, m)
    magnitude = groups & dtype.type(sign_mask(itemsize) - 1) if is_float else groups
    nonzero = magnitude != 0
    if np.any(nonzero.sum(axis=1) > n):
        return None
    # keep the non-zeros, then the earliest zeros, up to n per group; positions ascending
    rank = np.where(nonzero, 0, m) + np.arange(m)
    index = np.sort(np.argsort(rank, axis=1, kind="stable")[:, :n], axis=1)
    values = np.take_along_axis(groups, index, axis=1)
    pruned = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(pruned, index, False, axis=1)
    negative = groups[pruned] != 0  # only -0.0 can remain in a pruned position
    negzero = np.packbits(negative).tobytes() if negative.any() else b""
    record = TensorRecord(name, offset, rows, cols, itemsize, n, m, axis, values.tobytes(),
                          pack_bits(index.ravel(), index_bits(m)), negzero, spatial if axis == 2 else 1)
    overhead = 2 + len(name.encode()) + RECORD_HEADS[2].size
    if len(record.values) + len(record.index) + len(negzero) + overhead >= len(raw):
        return None
    return record


def _records(data: bytes, n: int, m: int) -> list[TensorRecord]:
    model = onnx.load_from_string(data)
    inits = {i.name: i for i in model.graph.initializer}
    spans = raw_data_spans(data)
    records = []
    for weight in weight_initializers(model):
        init = inits[weight.name]
        if weight.name not in spans or init.data_type not in DTYPES:
            continue
        start, end = spans[weight.name]
        if data[start:end] != init.raw_data:
            raise PackError(f"raw_data of {weight.name!r} found at bytes {start}..{end} differs from the parsed model")
        itemsize, is_float = DTYPES[init.data_type]
        shape = (int(init.dims[0]), math.prod(int(d) for d in init.dims[1:]))
        record = encode_tensor(weight.name, start, data[start:end], itemsize, is_float, shape, weight.axis, n, m)
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: r.offset)


def _serialize(data: bytes, records: list[TensorRecord], compression: str) -> bytes:
    stripped, cursor = [], 0
    for r in records:
        stripped.append(data[cursor : r.offset])
        cursor = r.offset + r.raw_length
    stripped.append(data[cursor:])
    body = b"".join(stripped)
    version = 2 if any(r.axis == 2 for r in records) else 1  # version 1 readers stay able to read the rest
    parts = [struct.pack("<IQ", len(records), len(body)), body]
    for r in records:
        name = r.name.encode("utf-8")
        flags = FLAG_NEGZERO if r.negzero else 0
        head = (r.offset, r.rows, r.cols, r.itemsize, r.n, r.m, r.axis, flags, len(r.values), len(r.index),
                len(r.negzero), *((r.spatial,) if version == 2 else ()))
        parts += [struct.pack("<H", len(name)), name, RECORD_HEADS[version].pack(*head), r.values, r.index, r.negzero]
    payload = b"".join(parts)
    if compression == "zlib":
        payload = zlib.compress(payload, 9)
    elif compression == "lzma":
        payload = lzma.compress(payload, format=lzma.FORMAT_XZ, preset=9)
    header = HEADER.pack(MAGIC, version, COMPRESSIONS[compression], 0, len(data), hashlib.sha256(data).digest(),
                         len(payload))
    return header + payload


# TFLite TensorType → (itemsize, is IEEE float): FLOAT32, FLOAT16, INT8
TFLITE_DTYPES: dict[int, tuple[int, bool]] = {0: (4, True), 1: (2, True), 9: (1, False)}


def _tflite_buffer_span(model: object, buffer: object, data: bytes) -> tuple[int, int] | None:
    """``(start, end)`` of a TFLite buffer's bytes in ``data``: inline flatbuffer vector or appended data."""
    if buffer.Offset() > 1:  # type: ignore[attr-defined]  # large models keep buffers after the flatbuffer
        start = int(buffer.Offset())  # type: ignore[attr-defined]
        return start, start + int(buffer.Size())  # type: ignore[attr-defined]
    length = int(buffer.DataLength())  # type: ignore[attr-defined]
    field = buffer._tab.Offset(4)  # type: ignore[attr-defined]  # Buffer.data is field 0 (vtable slot 4)
    if not length or not field:
        return None
    start = int(buffer._tab.Vector(field))  # type: ignore[attr-defined]
    return start, start + length


def tflite_tensor_label(name: str) -> str:
    """A short label for a litert-torch tensor name: its module path as torch spells it.

    ``FoldedGraph/…Sequential_stages/…_ResidualBlock_2/…Conv2d_conv1;`` → ``stages.2.conv1``; names of
    another shape are kept (cut to 64 characters).
    """
    parts = name.split(";")[0].split("/")[1:]
    return ".".join(part.rsplit("_", 1)[-1] for part in parts) if parts else name[:64]


def _tflite_records(data: bytes, n: int, m: int) -> list[TensorRecord]:
    try:
        from ai_edge_litert import schema_py_generated as tfl
    except ImportError as exc:  # pragma: no cover - litert-torch (export extra) brings ai-edge-litert
        raise PackError("packing TFLite files needs ai-edge-litert (the litert extra)") from exc
    try:
        model = tfl.Model.GetRootAsModel(data, 0)
        tensors = [sg.Tensors(i) for sg in (model.Subgraphs(j) for j in range(model.SubgraphsLength()))
                   for i in range(sg.TensorsLength())]
    except Exception as exc:
        raise PackError(f"not a readable TFLite flatbuffer: {exc}") from exc
    records, seen = [], set()
    for tensor in tensors:
        index, dims = tensor.Buffer(), [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
        if index == 0 or index in seen or len(dims) < 2 or tensor.Type() not in TFLITE_DTYPES:
            continue
        seen.add(index)
        span = _tflite_buffer_span(model, model.Buffers(index), data)
        itemsize, is_float = TFLITE_DTYPES[tensor.Type()]
        if span is None or span[1] - span[0] != math.prod(dims) * itemsize:
            continue
        name, raw = tflite_tensor_label(tensor.Name().decode("utf-8", "replace")), data[span[0] : span[1]]
        shape = (dims[0], math.prod(dims[1:]))
        tries = [(2, dims[1] * dims[2])] if len(dims) == 4 and dims[1] * dims[2] > 1 else []
        for axis, spatial in [*tries, (1, 1)]:
            record = encode_tensor(name, span[0], raw, itemsize, is_float, shape, axis, n, m, spatial)
            if record is not None:
                records.append(record)
                break
    return sorted(records, key=lambda r: r.offset)


RECORD_FINDERS = {"onnx": _records, "tflite": _tflite_records}


def pack_bytes(data: bytes, n: int = 2, m: int = 4, compression: str = "none", model_format: str = "onnx"
               ) -> tuple[bytes, PackReport]:
    """Pack a serialized ONNX or TFLite model (``model_format``); return ``(pack bytes, report)``. The pack is
    decoded and compared with ``data`` before it is returned (:class:`PackError` on any difference)."""
    check_pattern(n, m)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got {compression!r}")
    if model_format not in RECORD_FINDERS:
        raise ValueError(f"model_format must be one of {sorted(RECORD_FINDERS)}, got {model_format!r}")
    records = RECORD_FINDERS[model_format](data, n, m)
    pack = _serialize(data, records, compression)
    if unpack(pack) != data:
        raise PackError("the pack does not decode to the original model")
    tensor_before = sum(r.raw_length for r in records)
    tensor_after = sum(len(r.values) + len(r.index) + len(r.negzero) for r in records)
    report = PackReport(len(data), len(pack), tuple(r.name for r in records), compression, tensor_before, tensor_after)
    return pack, report


def pack_model(
    src_path: Path | str, dst_path: Path | str, n: int = 2, m: int = 4, compression: str = "none"
) -> PackReport:
    """Pack the ONNX or TFLite file ``src_path`` (told apart by its suffix) into ``dst_path`` (``.nmpack``);
    ``compression``: none | zlib | lzma applied to the payload. Tensors that are not ``n:m`` stay in the
    stripped model unchanged."""
    suffix = Path(src_path).suffix.lower()
    if suffix not in (".onnx", ".tflite"):
        raise PackError(f"cannot pack {src_path}: only .onnx and .tflite files")
    pack, report = pack_bytes(Path(src_path).read_bytes(), n, m, compression, suffix[1:])
    Path(dst_path).write_bytes(pack)
    logger.info("packed %s: %d → %d bytes (%d tensors %d:%d, %s)", Path(src_path).name, report.bytes_before,
                report.bytes_after, len(report.tensors_packed), n, m, compression)
    return report
