"""Malformed bundles and feeds on a real exported digits bundle: each is refused with the runtime's own error
naming the problem (no TypeError, KeyError, onnxruntime exception or silent acceptance)."""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.signing import sign_bundle
from runtime import (
    AdaptableModel,
    BundleError,
    GoldenMismatchError,
    InputError,
    ManifestError,
    SignatureError,
    load_bundle,
)
from runtime.blocks import decode_block, encode_block
from runtime.bundle import BundleIntegrityError, golden_feeds
from runtime.packing import HEADER, PackFormatError, unpack
from runtime.predictor import Predictor


def _edit_manifest(root: Path, edit: Any, key: Any) -> None:
    """Apply ``edit`` to manifest.json and re-sign it, so only the edit can be what is refused."""
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    sign_bundle(root, key)


def _edit_block(root: Path, name: str, edit: Any, key: Any) -> None:
    """Rewrite block ``name`` with ``edit(arrays)`` applied, re-hash it in the manifest and re-sign."""
    arrays = decode_block((root / name).read_bytes())
    edit(arrays)
    (root / name).write_bytes(encode_block(arrays))
    digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
    _edit_manifest(root, lambda raw: raw["files"].__setitem__(name, digest), key)


def _duplicate_first_model(raw: dict[str, Any]) -> None:
    raw["models"].append(dict(raw["models"][1], name=raw["models"][0]["name"]))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["input"].__setitem__("shape", [-1, "a", 8, 8]), r"input\.shape \[-1, 'a', 8, 8\]"),
        (lambda raw: raw["input"].__setitem__("shape", [-1, 1.5, 8, 8]), r"input\.shape .*positive integer"),
        (lambda raw: raw["input"].__setitem__("shape", [-1, None, 8, 8]), r"input\.shape"),
        (lambda raw: raw["input"].__setitem__("value_range", [0, 1, 2]), r"input\.value_range must be \[low, high\]"),
        (lambda raw: raw["input"].__setitem__("value_range", ["a", "b"]), r"input\.value_range must be a finite"),
        (lambda raw: raw["input"].__setitem__("value_range", [float("nan"), 1.0]), r"input\.value_range.*nan"),
        (lambda raw: raw["input"].__setitem__("value_range", [1.0, 0.0]), r"input\.value_range.*increasing"),
        (lambda raw: raw["models"].__setitem__(0, "fp32"), r"models\[0\] must be an object"),
        (lambda raw: raw["models"][0].__setitem__("io_names", {"inputs": 5}), r"models\[0\]\.io_names"),
        (_duplicate_first_model, r"model 'fp32' twice"),
        (lambda raw: raw["adaptable"]["layers"].append(dict(raw["adaptable"]["layers"][0])), r"layer 'bn1' twice"),
        (lambda raw: raw["golden"]["models"].__setitem__("fp32", "x"), r"golden\.models\.fp32 must be an object"),
        (lambda raw: raw["golden"]["models"]["fp32"].__setitem__("atol", "x"), r"golden\.models\.fp32\.atol"),
        (lambda raw: raw["golden"]["models"]["fp32"].__setitem__("rtol", -1.0), r"must be >= 0"),
        (lambda raw: raw["golden"]["models"]["fp32"].__setitem__("outputs", {"logits": {"atol": "x"}}),
         r"golden\.models\.fp32\.outputs\.logits\.atol"),
        (lambda raw: raw["golden"].__setitem__("alpha", "x"), r"golden\.alpha must be a finite number"),
    ],
)
def test_malformed_manifest_fields_are_named(bundle_copy: Path, edit: Any, message: str, signing_key: Any) -> None:
    _edit_manifest(bundle_copy, edit, signing_key)
    with pytest.raises(ManifestError, match=message):
        load_bundle(bundle_copy, model="fp32", threads=1)


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b"{not json"])
def test_an_unparseable_manifest_fails_its_signature_before_it_is_parsed(bundle_copy: Path, content: bytes,
                                                                        signing_key: Any) -> None:
    (bundle_copy / "manifest.json").write_bytes(content)
    with pytest.raises(SignatureError):  # nobody signed these bytes: they are never parsed
        load_bundle(bundle_copy)
    with pytest.raises(ManifestError, match="not valid JSON"):  # unchecked, they are parsed: a clear error
        load_bundle(bundle_copy, verify=False)
    sign_bundle(bundle_copy, signing_key)  # signed by the trusted key, they are parsed, and refused
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [  # signed manifests that disagree with the model they describe: found at load, not at the first batch
        (lambda raw: raw["outputs"].__setitem__("logits", "scores"), ManifestError, r"no output\(s\) \['scores'\]"),
        (lambda raw: raw["outputs"].__setitem__("features", "feats"), ManifestError, r"no output\(s\) \['feats'\]"),
        (lambda raw: raw.__setitem__("labels", ["a", "b", "c"]), ManifestError, r"shape \(8, 10\).* 3 labels"),
        (lambda raw: raw["input"].__setitem__("shape", [-1, 3, 8, 8]), BundleIntegrityError,
         r"golden input has shape \(8, 1, 8, 8\), the manifest's input is \[-1, 3, 8, 8\]"),
        (lambda raw: raw["input"].__setitem__("dtype", "uint8"), ManifestError,
         r"'fp32' does not take the inputs.*'input' is uint8, graph expects float32"),
    ],
)
def test_manifest_that_disagrees_with_its_model_is_refused_at_load(
    bundle_copy: Path, edit: Any, error: type[Exception], message: str, signing_key: Any
) -> None:
    _edit_manifest(bundle_copy, edit, signing_key)
    for model in ("fp32", "int8"):
        with pytest.raises(error, match=message.replace("'fp32'", f"'{model}'")):
            load_bundle(bundle_copy, model=model, threads=1)


def _empty_golden(arrays: dict[str, np.ndarray]) -> None:
    for key in [k for k in arrays if k != "input_denominator"]:
        arrays[key] = arrays[key][:0]


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda a: a.__setitem__("fp32/logits", a["fp32/logits"][:, :3]), GoldenMismatchError,
         r"'logits' has shape \(8, 10\), its golden vector is float32 \(8, 3\)"),
        (lambda a: a.__setitem__("fp32/logits", a["fp32/logits"].ravel()), GoldenMismatchError, r"\(80,\)"),
        (_empty_golden, BundleIntegrityError, r"golden input has shape \(0, 1, 8, 8\).*N >= 1"),
        (lambda a: a.__setitem__("input_denominator", np.ones(3, np.float32)), BundleIntegrityError,
         r"input_denominator must be one positive number"),
        (lambda a: a.__setitem__("input_denominator", np.float32(0)), BundleIntegrityError,
         r"input_denominator must be one positive number"),
    ],
)
def test_malformed_golden_vectors_are_named(
    bundle_copy: Path, edit: Any, error: type[Exception], message: str, signing_key: Any
) -> None:
    _edit_block(bundle_copy, "golden_fp32.bin", edit, signing_key)
    with pytest.raises(error, match=message):
        load_bundle(bundle_copy, model="fp32", threads=1)


def test_onnx_session_refuses_a_wrong_dtype_or_dimension_with_input_error(digits_bundle: Path) -> None:
    """The onnxruntime session behind the Session interface: a feed of the wrong dtype or a fixed dimension of
    the wrong size is an InputError naming the input (not onnxruntime's own exception)."""
    bundle = load_bundle(digits_bundle, model="fp32", threads=1)
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    feeds = golden_feeds(bundle.manifest, bundle.model, x)
    assert bundle.session.run(feeds)["logits"].shape == (4, 10)
    with pytest.raises(InputError, match=r"input 'input' is float64, graph expects float32"):
        bundle.session.run({**feeds, "input": x.astype(np.float64)})
    with pytest.raises(InputError, match=r"input 'input' is int64"):
        bundle.session.run({**feeds, "input": x.astype(np.int64)})
    with pytest.raises(InputError, match=r"onnxruntime refuses the feeds.*input"):
        bundle.session.run({**feeds, "input": np.zeros((4, 1, 9, 8), np.float32)})


@pytest.mark.parametrize("alpha", ["0.5", None, np.array([0.1, 0.2]), True])
def test_forward_refuses_an_alpha_that_is_not_a_number(digits_bundle: Path, alpha: Any) -> None:
    model = AdaptableModel(load_bundle(digits_bundle, model="fp32", threads=1))
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    with pytest.raises(InputError, match=r"alpha must be a number in \[0, 1\]"):
        model.forward(x, alpha=alpha)
    assert model.forward(x, alpha=np.float32(0.5)).logits.shape == (4, 10)  # numpy scalars are numbers


@pytest.mark.parametrize("static", ["x", -3, 2.5, 0])
def test_predictor_refuses_a_malformed_static_batch(bundle_copy: Path, static: Any, signing_key: Any) -> None:
    _edit_manifest(bundle_copy, lambda raw: raw["models"][0].update(static_batch=static, batch_resizable=False),
                   signing_key)
    with pytest.raises(BundleError, match=r"static_batch .* must be a positive int"):
        Predictor(load_bundle(bundle_copy, model="fp32", threads=1))


def test_pack_decompression_bomb_is_refused_without_filling_memory() -> None:
    """A pack whose 10 KB payload decompresses to 64 MiB while its header claims a 100-byte model: refused
    once decoding passes what such a pack can hold, not after the whole payload is in memory."""
    size = 64 << 20
    payload = lzma.compress(struct.pack("<IQ", 0, size) + bytes(size), format=lzma.FORMAT_XZ, preset=1)
    pack = HEADER.pack(b"NMPK", 1, 2, 0, 100, bytes(32), len(payload)) + payload
    assert len(pack) < 64 << 10
    tracemalloc.start()
    try:
        with pytest.raises(PackFormatError, match=r"decompresses to more than \d+ bytes.*100-byte model"):
            unpack(pack)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    too_big = HEADER.pack(b"NMPK", 1, 2, 0, 1 << 40, bytes(32), len(payload)) + payload
    with pytest.raises(PackFormatError, match=r"model is 1099511627776 bytes"):
        unpack(too_big)
