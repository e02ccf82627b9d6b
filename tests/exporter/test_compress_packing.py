"""Packed N:M transport of real exported models: fp32 and QDQ int8, byte-identical, measured savings."""

from __future__ import annotations

import copy
import hashlib
import lzma
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.compress import FineTuneConfig, NMSparsity, NMSparsityConfig, compose
from exporter.compress.onnx_nm import check_onnx_nm
from exporter.onnx_export import export_adaptable_onnx, make_feeds, ort_session, params_numpy
from exporter.packing import pack_model
from exporter.quantize import quantize_int8
from exporter.train import torch_threads
from runtime.packing import HEADER, RECORD_HEAD, read_pack, unpack

# bytes after / before of a 2:4 tensor: per group of 4, two kept values and two 2-bit positions
RATIO_2_4 = {4: (2 * 4 + 2 * 2 / 8) / (4 * 4), 1: (2 * 1 + 2 * 2 / 8) / (4 * 1)}  # by itemsize: fp32 53 %, int8 62.5 %


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sparse_models(digits_model: tuple, digits_arrays: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """small_cnn on digits, 2:4 with a short masked fine-tune (first conv excluded), exported fp32 and int8."""
    x_train, y_train, x_test, _ = digits_arrays
    out = tmp_path_factory.mktemp("packing")
    with torch_threads(1):
        model, _ = compose(copy.deepcopy(digits_model[0]), [NMSparsity(NMSparsityConfig(exclude=("features.0",)))],
                           (x_train, y_train), FineTuneConfig(epochs=2))
        export_adaptable_onnx(model, out / "fp32.onnx", torch.from_numpy(x_test[:8]))
    params = params_numpy(model)
    quantize_int8(out / "fp32.onnx", out / "int8.onnx", x_train[:256], params)
    return {"dir": out, "params": params, "x": x_test[:64]}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_pack_is_byte_identical_and_saves_bytes(sparse_models: dict, precision: str) -> None:
    src = sparse_models["dir"] / f"{precision}.onnx"
    dst = src.with_suffix(".nmpack")
    report = pack_model(src, dst, 2, 4)
    original = src.read_bytes()
    decoded = unpack(dst.read_bytes())
    assert decoded == original and hashlib.sha256(decoded).hexdigest() == hashlib.sha256(original).hexdigest()
    # every 2:4 weight (not the excluded first conv) is packed, int8 ones as int8
    verified = check_onnx_nm(src, 2, 4).satisfied
    assert sorted(report.tensors_packed) == sorted(verified) and len(verified) == 3
    records = read_pack(dst.read_bytes())[2]
    expected = sum(RATIO_2_4[r.itemsize] * r.raw_length for r in records)
    assert report.tensor_bytes_after == pytest.approx(expected, abs=len(records))
    overhead = HEADER.size + 12 + sum(2 + len(r.name.encode()) + RECORD_HEAD.size for r in records)
    assert report.bytes_after == report.bytes_before - report.tensor_bytes_before + report.tensor_bytes_after + overhead
    quantized = {r.itemsize for r in records if r.name.endswith("_quantized")}
    assert quantized == ({1} if precision == "int8" else set())  # QDQ weights are packed as int8
    feeds = make_feeds(sparse_models["x"], sparse_models["params"], 0.5)
    unpacked = sparse_models["dir"] / f"{precision}.unpacked.onnx"
    unpacked.write_bytes(decoded)
    got, ref = ort_session(unpacked).run(None, feeds), ort_session(src).run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_general_compression_on_top_of_packing(sparse_models: dict, precision: str) -> None:
    """zlib/lzma shrink a pack further, and packing still beats compressing the plain file."""
    src = sparse_models["dir"] / f"{precision}.onnx"
    sizes = {c: pack_model(src, src.with_suffix(f".{c}.nmpack"), 2, 4, c).bytes_after for c in ("none", "zlib", "lzma")}
    original = src.read_bytes()
    assert unpack(src.with_suffix(".lzma.nmpack").read_bytes()) == original
    plain = {"zlib": len(zlib.compress(original, 9)), "lzma": len(lzma.compress(original, preset=9))}
    print(f"{precision}: file {len(original)} packed {sizes} plain-compressed {plain}")
    assert sizes["zlib"] < sizes["none"] and sizes["lzma"] < sizes["none"]
    assert sizes["zlib"] < plain["zlib"] and sizes["lzma"] < plain["lzma"]


def test_dense_model_packs_nothing(digits_bundle: Path, tmp_path: Path) -> None:
    src = digits_bundle / "model_fp32.onnx"
    report = pack_model(src, tmp_path / "dense.nmpack")
    assert report.tensors_packed == () and report.bytes_after > report.bytes_before
    assert unpack((tmp_path / "dense.nmpack").read_bytes()) == src.read_bytes()


def test_bn_folded_graph_with_negative_zeros_packs_losslessly(digits_model: tuple, tmp_path: Path) -> None:
    """Folding a negative BN γ into a sparse conv turns its zeros into -0.0: they are packed, and restored."""
    model, _ = compose(copy.deepcopy(digits_model[0]), [NMSparsity(NMSparsityConfig(exclude=("features.0",)))])
    with torch.no_grad():
        model.features[4].weight[::2] *= -1
    src = tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(2, 1, 8, 8),), str(src), dynamo=False, opset_version=17)
    report = pack_model(src, tmp_path / "folded.nmpack")
    records = read_pack((tmp_path / "folded.nmpack").read_bytes())[2]
    assert len(report.tensors_packed) == 3 and any(r.negzero for r in records)
    assert unpack((tmp_path / "folded.nmpack").read_bytes()) == src.read_bytes()
