"""Compact bundle blocks (runtime.blocks) and schema-1 compatibility of the manifest readers."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.signing import sign_bundle
from runtime import blocks as blocks_mod
from runtime import load_bundle
from runtime.blocks import BlockError, checked_float32, decode_block, decode_image_u8, encode_block, encode_image_u8
from runtime.errors import ManifestError
from runtime.manifest import parse_manifest, read_manifest


def test_block_round_trip_is_exact_and_canonical() -> None:
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal(37).astype(np.float32), "n": np.arange(5, dtype=np.int64),
              "u": rng.integers(0, 256, (2, 3, 4), dtype=np.uint8), "s": np.asarray(255.0, np.float32)}
    data = encode_block(arrays)
    assert data[:4] == b"ELZ1" and encode_block(dict(reversed(arrays.items()))) == data  # canonical bytes
    back = decode_block(data)
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)  # bit for bit


def test_bad_blocks_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_block({"x": np.zeros(1000, np.float32)})
    with pytest.raises(BlockError, match="bad magic"):
        decode_block(b"PK\x03\x04" + data[4:], "golden_x.bin")
    with pytest.raises(BlockError, match="truncated"):
        decode_block(data[: len(data) // 2], "golden_x.bin")
    with pytest.raises(BlockError, match="corrupt"):
        decode_block(data[:4] + bytes(b ^ 0xFF for b in data[4:]), "golden_x.bin")
    monkeypatch.setattr(blocks_mod, "MAX_DECODED_BYTES", 1024)  # 4 KB of zeros compress to a few bytes
    with pytest.raises(BlockError, match="more than 1024 bytes"):
        decode_block(data, "bomb.bin")


def test_image_residual_is_lossless_and_smaller() -> None:
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (3, 3, 9, 7), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image_u8(encode_image_u8(noise)), noise)
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([(xx * 4 + yy * 2 + c * 10) % 256 for c in range(3)])[None].astype(np.uint8)
    np.testing.assert_array_equal(decode_image_u8(encode_image_u8(smooth)), smooth)
    plain = len(encode_block({"x": smooth}))
    assert len(encode_block({"x": encode_image_u8(smooth)})) < plain
    with pytest.raises(ValueError, match="uint8"):
        encode_image_u8(noise.astype(np.float32))


def _to_schema_1(root: Path, key: Any) -> None:
    """Rewrite a schema-2 bundle as schema 1 wrote it: everything inline, npz golden files and statistics."""
    manifest = json.loads((root / "manifest.json").read_text())
    initial = decode_block((root / "adaptable_initial.bin").read_bytes())
    features = decode_block((root / "source_features.bin").read_bytes())
    gauss = decode_block((root / "class_statistics.bin").read_bytes())
    manifest["schema_version"] = 1
    manifest["adaptable"]["initial"] = {k: v.tolist() for k, v in initial.items()}
    for layer in manifest["adaptable"]["layers"]:
        layer.update({k: f"{layer['name']}.{k}" for k in ("weight", "bias", "mean", "var", "batch_mean", "batch_var")})
    stats = manifest["source_statistics"]
    stats["features"] = {"mean": features["mean"].tolist(), "var": features["var"].tolist()}
    stats["layers"] = {layer["name"]: {"mean": initial[f"{layer['name']}.mean"].tolist(),
                                       "var": initial[f"{layer['name']}.var"].tolist()}
                       for layer in manifest["adaptable"]["layers"]}
    np.savez_compressed(root / "source_statistics.npz", **gauss)  # type: ignore[arg-type]
    stats["class_conditional"] = {"file": "source_statistics.npz", "shrinkage": 1e-3}
    for name, tol in manifest["golden"]["models"].items():
        golden = decode_block((root / tol["file"]).read_bytes())
        golden["input_u8"] = decode_image_u8(golden.pop("input_u8_residual"))
        buf = io.BytesIO()
        np.savez_compressed(buf, **golden)  # type: ignore[arg-type]
        (root / f"golden_{name}.npz").write_bytes(buf.getvalue())
        (root / tol["file"]).unlink()
        tol["file"] = f"golden_{name}.npz"
    for name in ("adaptable_initial.bin", "source_features.bin", "class_statistics.bin"):
        (root / name).unlink()
    manifest.pop("report")
    (root / "export_report.json").unlink()
    manifest["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())
                         if p.name not in ("manifest.json", "manifest.sig")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    sign_bundle(root, key)


def test_schema_1_bundles_still_load(digits_bundle: Path, tmp_path: Path, signing_key: Any) -> None:
    from server.manifest import parse_manifest as server_parse

    v2 = load_bundle(digits_bundle, model="int8", threads=1).manifest
    root = Path(shutil.copytree(digits_bundle, tmp_path / "v1"))
    _to_schema_1(root, signing_key)
    v1 = load_bundle(root, model="int8", threads=1).manifest  # signature, hashes and golden outputs verified
    assert v1.schema_version == 1 and v2.schema_version == 2
    assert v1.files_for("int8") == ["model_int8.onnx", "golden_int8.npz", "source_statistics.npz"]
    for name, value in v2.initial_params.items():
        np.testing.assert_array_equal(v1.initial_params[name], value)
    for a, b in zip(v1.source_feature_stats(), v2.source_feature_stats(), strict=True):
        np.testing.assert_array_equal(a, b)
    for layer, (mean, var) in v2.source_layer_stats().items():
        np.testing.assert_array_equal(v1.source_layer_stats()[layer][0], mean)
        np.testing.assert_array_equal(v1.source_layer_stats()[layer][1], var)
    for a, b in zip(v1.class_gaussians(root), v2.class_gaussians(digits_bundle), strict=True):
        np.testing.assert_array_equal(a, b)
    spec1 = server_parse((root / "manifest.json").read_bytes())[1]
    spec2 = server_parse((digits_bundle / "manifest.json").read_bytes())[1]
    assert spec1.param_shapes == spec2.param_shapes and spec1.feature_dim == spec2.feature_dim
    init2 = spec2.initial_values((digits_bundle / spec2.initial_file).read_bytes())
    assert all(np.array_equal(spec1.initial_values()[k], init2[k]) for k in init2)


def test_unsupported_version_and_missing_block_are_named(digits_bundle: Path) -> None:
    raw = json.loads((digits_bundle / "manifest.json").read_text())
    with pytest.raises(ManifestError, match=r"schema_version is 3; this runtime reads versions 1, 2"):
        parse_manifest({**raw, "schema_version": 3})
    detached = parse_manifest(raw)  # no bundle directory: the blocks cannot be read
    assert detached.param_shapes() == read_manifest(digits_bundle)[0].param_shapes()
    with pytest.raises(ManifestError, match="parsed without its bundle directory"):
        _ = detached.initial_params


def test_checked_float32_names_the_offender() -> None:
    good = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
    expected = {"b": (2,), "a": (3,)}
    assert list(checked_float32(good, expected, "blk")) == ["b", "a"]
    with pytest.raises(BlockError, match=r"blk holds .*differing: \['c'\]"):
        checked_float32({**good, "c": np.ones(1, np.float32)}, expected, "blk")
    with pytest.raises(BlockError, match=r"blk: 'a' is float64 \(3,\), expected finite float32 \(3,\)"):
        checked_float32({**good, "a": np.ones(3)}, expected, "blk")
    with pytest.raises(BlockError, match=r"blk: 'b' is float32 \(2,\)"):
        checked_float32({**good, "b": np.array([0.0, np.nan], np.float32)}, expected, "blk")
