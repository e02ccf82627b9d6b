"""The packed N:M transport encoding: byte-identical decoding, general N:M, named corruption errors, no torch/onnx.

Packs are made by :mod:`exporter.packing` from micro-graphs built with ``onnx.helper``; decoding uses only
:mod:`runtime.packing`.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.compress.nm import check_nm
from exporter.packing import pack_bytes, pack_model
from runtime.packing import (
    HEADER,
    PackFormatError,
    index_bits,
    pack_bits,
    read_header,
    read_pack,
    unpack,
    unpack_bits,
)

ROOT = Path(__file__).resolve().parents[2]


def nm_sparse(shape: tuple[int, ...], n: int, m: int, axis: int = 1, seed: int = 0) -> np.ndarray:
    """A random fp32 tensor with exactly ``n`` non-zeros in each group of ``m`` along ``axis`` of its 2-D view."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    view = w.reshape(shape[0], -1) if axis == 1 else w.reshape(shape[0], -1).T
    groups = np.ascontiguousarray(view).reshape(-1, m)
    for g in groups:
        g[rng.permutation(m)[: m - n]] = 0.0
    out = groups.reshape(view.shape)
    return (out if axis == 1 else out.T).reshape(shape).copy()


def micro_model(n: int = 2, m: int = 4) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv (fp32, n:m) → QDQ Conv (int8, n:m) → Flatten → Gemm(transB=1) → MatMul, plus one dense Gemm weight."""
    conv_w = nm_sparse((32, 4, 3, 3), n, m, seed=1)
    conv_w[0, :, 0, 0][conv_w[0, :, 0, 0] == 0] = -0.0  # pruned -0.0 values (as after BN folding)
    q_float = nm_sparse((16, 32, 1, 1), n, m, seed=2)
    scale = np.abs(q_float).reshape(16, -1).max(axis=1) / 127 + 1e-3
    int8_w = np.clip(np.round(q_float / scale[:, None, None, None]), -127, 127)
    gemm_w = nm_sparse((16, 16 * 4 * 4), n, m, seed=3)
    matmul_w = nm_sparse((16, 8), n, m, axis=0, seed=4)
    dense_w = np.random.default_rng(5).normal(size=(8, 8)).astype(np.float32)
    inits = [
        numpy_helper.from_array(conv_w, "conv.w"),
        numpy_helper.from_array(int8_w.astype(np.int8), "q.w"),
        numpy_helper.from_array(scale.astype(np.float32), "q.scale"),
        numpy_helper.from_array(np.zeros(16, np.int8), "q.zp"),
        numpy_helper.from_array(gemm_w, "gemm.w"),
        numpy_helper.from_array(matmul_w, "matmul.w"),
        numpy_helper.from_array(dense_w, "dense.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.w"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["q.w", "q.scale", "q.zp"], ["q.deq"], axis=0),
        helper.make_node("Conv", ["c1", "q.deq"], ["c2"]),
        helper.make_node("Flatten", ["c2"], ["flat"]),
        helper.make_node("Gemm", ["flat", "gemm.w"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "matmul.w"], ["h"]),
        helper.make_node("MatMul", ["h", "dense.w"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "micro", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, {"conv.w": conv_w, "q.w": int8_w, "gemm.w": gemm_w, "matmul.w": matmul_w}


def run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": x})[0]


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 2**bits, size=37).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert len(packed) == -(-37 * bits // 8)
    assert np.array_equal(unpack_bits(packed, 37, bits), values)
    assert pack_bits(np.array([0, 1, 2, 3]), 2) == bytes([0b00011011])  # MSB first, 4 positions per byte


@pytest.mark.parametrize("compression", ["none", "zlib", "lzma"])
def test_micro_model_round_trips_byte_identically(compression: str) -> None:
    model, weights = micro_model()
    data = model.SerializeToString()
    pack, report = pack_bytes(data, 2, 4, compression)
    assert set(report.tensors_packed) == {"conv.w", "q.w", "gemm.w", "matmul.w"}  # not the dense one
    assert unpack(pack) == data
    records = {r.name: r for r in read_pack(pack)[2]}
    assert records["conv.w"].negzero and not records["gemm.w"].negzero  # pruned -0.0 kept in a bitmap
    assert (records["matmul.w"].axis, records["q.w"].itemsize) == (0, 1)
    header = read_header(pack)
    assert header.original_sha256 == hashlib.sha256(data).hexdigest()
    assert header.version == 1  # no channels-last record: version 1 readers can still decode ONNX packs
    x = np.random.default_rng(0).random((2, 4, 4, 4), dtype=np.float32)
    assert np.array_equal(run(unpack(pack), x), run(data, x))
    assert all(check_nm(w, 2, 4, axis=0 if k == "matmul.w" else 1) for k, w in weights.items())


@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 4), (1, 4), (2, 8), (3, 8), (2, 7), (4, 16)])
def test_general_n_m_uses_ceil_log2_m_bits(n: int, m: int) -> None:
    w = nm_sparse((4, 2 * m * 4), n, m, seed=m)
    graph = helper.make_graph([helper.make_node("Gemm", ["input", "w"], ["output"], transB=1)], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, w.shape[1]])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, "w")])
    data = helper.make_model(graph).SerializeToString()
    pack, report = pack_bytes(data, n, m)
    assert unpack(pack) == data and report.tensors_packed == ("w",)
    kept = w.size // m * n
    assert report.tensor_bytes_after == kept * 4 + -(-kept * index_bits(m) // 8)
    assert index_bits(m) == max(1, int(np.ceil(np.log2(m))))


@pytest.mark.parametrize(("itemsize", "dtype"), [(4, np.float32), (1, np.int8), (2, np.float16)])
def test_channels_last_filters_pack_along_torch_input_order(itemsize: int, dtype: type) -> None:
    """A TFLite OHWI filter pruned 2:4 along torch's (C_in, kh, kw) flattening packs with axis 2 and decodes
    to the same bytes; read as plain rows it is not 2:4."""
    from exporter.packing import encode_tensor
    from runtime.packing import decode_tensor

    out_c, in_c, kh, kw = 8, 4, 3, 3
    torch_order = nm_sparse((out_c, in_c * kh * kw), 2, 4, seed=3).reshape(out_c, in_c, kh, kw)
    ohwi = np.ascontiguousarray(torch_order.transpose(0, 2, 3, 1)).astype(dtype)
    raw, shape = ohwi.tobytes(), (out_c, kh * kw * in_c)
    assert encode_tensor("w", 0, raw, itemsize, dtype != np.int8, shape, 1, 2, 4) is None
    record = encode_tensor("w", 0, raw, itemsize, dtype != np.int8, shape, 2, 2, 4, spatial=kh * kw)
    assert record is not None and record.spatial == kh * kw
    assert decode_tensor(record) == raw
    assert len(record.values) == ohwi.size // 2 * itemsize


def test_tensors_that_are_not_n_m_stay_as_they_are() -> None:
    model, _ = micro_model(2, 4)
    data = model.SerializeToString()
    pack, report = pack_bytes(data, 1, 4)  # the 2:4 weights are not 1:4
    assert report.tensors_packed == () and unpack(pack) == data
    assert report.bytes_after == len(data) + HEADER.size + 12


@pytest.fixture(scope="module")
def micro_pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    model, _ = micro_model()
    src = tmp_path_factory.mktemp("pack") / "micro.onnx"
    onnx.save(model, str(src))
    pack_model(src, src.with_suffix(".nmpack"))
    return src.read_bytes(), src.with_suffix(".nmpack").read_bytes()


def _patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: b"ONNX" + p[4:], r"bad magic b'ONNX'"),
        (lambda p: _patched(p, 4, struct.pack("<H", 9)), r"unsupported pack format version 9"),
        (lambda p: _patched(p, 6, b"\x07"), r"unknown payload compression code 7"),
        (lambda p: p[:-5], r"payload length mismatch: header says \d+ bytes, pack holds \d+"),
        (lambda p: p[:30], r"shorter than its 56-byte header"),
        (lambda p: _patched(p, 8, struct.pack("<Q", 1)), r"decoded model is \d+ bytes, header says 1"),
        (lambda p: _patched(p, 16, bytes(32)), r"decoded model sha256 [0-9a-f]{64} differs from the header's 0{64}"),
        (lambda p: p[:-1] + bytes([p[-1] ^ 0x40]), r"sha256 .* differs|positions out of range"),
        (lambda p: _patched(p, HEADER.size, struct.pack("<I", 9)), r"payload truncated while reading"),
    ],
)
def test_corrupted_pack_is_refused_with_a_named_reason(micro_pack: tuple[bytes, bytes], corrupt: object,
                                                       message: str) -> None:
    _, pack = micro_pack
    with pytest.raises(PackFormatError, match=message):
        unpack(corrupt(pack))  # type: ignore[operator]


def test_corrupted_compressed_payload_is_named() -> None:
    pack, _ = pack_bytes(micro_model()[0].SerializeToString(), compression="zlib")
    broken = pack[: HEADER.size + 10] + bytes(len(pack) - HEADER.size - 10)
    with pytest.raises(PackFormatError, match="zlib payload does not decompress"):
        unpack(broken)


def test_pack_error_is_a_bundle_error() -> None:
    from runtime.errors import BundleError

    assert issubclass(PackFormatError, BundleError) and issubclass(PackFormatError, ValueError)


DEVICE_SCRIPT = """
import hashlib, sys
sys.modules["torch"] = None  # any import of torch or onnx now raises ImportError
sys.modules["onnx"] = None
from runtime.packing import unpack
model = unpack(open(sys.argv[1], "rb").read())
loaded = [m for m in sys.modules if sys.modules[m] is not None]
assert not [m for m in loaded if m.split(".")[0] in ("torch", "onnx", "exporter")], loaded
print(hashlib.sha256(model).hexdigest())
"""


def test_decoder_needs_neither_torch_nor_onnx(micro_pack: tuple[bytes, bytes], tmp_path: Path) -> None:
    original, pack = micro_pack
    (tmp_path / "m.nmpack").write_bytes(pack)
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(tmp_path / "m.nmpack")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == hashlib.sha256(original).hexdigest()
