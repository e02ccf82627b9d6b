"""Bundle loading and the adaptable model on a real exported digits bundle, and every refusal path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.signing import sign_bundle
from runtime import (
    AdaptableModel,
    BundleIntegrityError,
    GoldenMismatchError,
    InputError,
    ManifestError,
    SignatureError,
    load_bundle,
)
from runtime.blocks import decode_block, encode_block
from runtime.bundle import golden_input, read_golden
from runtime.manifest import SCHEMA_VERSIONS
from runtime.params import params_digest
from runtime.signing import load_public_key


def _edit_manifest(root: Path, edit: object, key: Any | None) -> None:
    """Edit manifest.json and re-sign it with ``key`` (None: leave the old signature)."""
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)  # type: ignore[operator]
    path.write_text(json.dumps(raw))
    if key is not None:
        sign_bundle(root, key)


def _rehash(root: Path, name: str, key: Any) -> None:
    digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
    _edit_manifest(root, lambda raw: raw["files"].__setitem__(name, digest), key)


def _edit_block(root: Path, name: str, edit: Any, key: Any) -> None:
    """Rewrite block file ``name`` with ``edit(arrays)`` applied, re-hash it in the manifest and re-sign."""
    arrays = decode_block((root / name).read_bytes())
    edit(arrays)
    (root / name).write_bytes(encode_block(arrays))
    _rehash(root, name, key)


@pytest.mark.parametrize("model", ["fp32", "int8"])
def test_loads_and_reproduces_golden(digits_bundle: Path, model: str) -> None:
    bundle = load_bundle(digits_bundle, model=model, threads=1)
    assert bundle.model.name == model and bundle.manifest.schema_version == max(SCHEMA_VERSIONS)
    assert bundle.bundle_id == hashlib.sha256((digits_bundle / "manifest.json").read_bytes()).hexdigest()
    golden = read_golden(digits_bundle, f"golden_{model}.bin")
    x = golden_input(golden, "golden")
    assert len(x) == 8 and np.array_equal(x * 255, np.round(x * 255))  # 8 real digits, exactly on the k/255 grid
    out = AdaptableModel(bundle).forward(x, alpha=bundle.manifest.golden_alpha)
    np.testing.assert_allclose(out.logits, golden[f"{model}/logits"], atol=0.05)


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "golden_fp32.bin").unlink()
    with pytest.raises(BundleIntegrityError, match=r"golden_fp32\.bin.*missing"):
        load_bundle(bundle_copy)


def test_golden_mismatch_is_named(bundle_copy: Path, signing_key: Any) -> None:
    _edit_block(bundle_copy, "golden_fp32.bin", lambda g: g.__setitem__("fp32/logits", g["fp32/logits"] + 1.0),
                signing_key)
    with pytest.raises(GoldenMismatchError, match=r"'fp32'.*'logits'"):
        load_bundle(bundle_copy, model="fp32")


def test_changed_golden_input_fails(bundle_copy: Path, signing_key: Any) -> None:
    def flip(g: dict[str, np.ndarray]) -> None:
        g["input_u8_residual"] = g["input_u8_residual"].copy()
        g["input_u8_residual"][0, 0, 3, 3] ^= 0x40
    _edit_block(bundle_copy, "golden_fp32.bin", flip, signing_key)
    with pytest.raises(GoldenMismatchError):
        load_bundle(bundle_copy, model="fp32")


def test_changed_initial_params_fail_golden(bundle_copy: Path, signing_key: Any) -> None:
    _edit_block(bundle_copy, "adaptable_initial.bin",
                lambda a: a.__setitem__("bn1.weight", a["bn1.weight"] * 2), signing_key)
    with pytest.raises(GoldenMismatchError):
        load_bundle(bundle_copy)


def test_bad_initial_block_is_refused(bundle_copy: Path, signing_key: Any) -> None:
    _edit_block(bundle_copy, "adaptable_initial.bin",
                lambda a: a.__setitem__("bn1.var", np.ones(1, np.float32)), signing_key)
    with pytest.raises(ManifestError, match=r"bn1\.var"):
        load_bundle(bundle_copy)
    (bundle_copy / "adaptable_initial.bin").write_bytes(b"ELZ1garbage")
    _rehash(bundle_copy, "adaptable_initial.bin", signing_key)
    with pytest.raises(ManifestError, match=r"adaptable_initial\.bin"):
        load_bundle(bundle_copy)


def test_device_fetches_only_what_its_model_needs(bundle_copy: Path) -> None:
    """``files_for``: the adaptable parameters only with an adaptable graph, the class statistics only on
    request, the export report never; a bundle holding just those files loads and verifies."""
    from runtime import read_manifest

    manifest, _ = read_manifest(bundle_copy)
    for m in manifest.models:
        files = manifest.files_for(m.name)
        assert ("adaptable_initial.bin" in files) == (m.graph == "adaptable")
        assert "class_statistics.bin" not in files and "export_report.json" not in files
        assert "class_statistics.bin" in manifest.files_for(m.name, class_statistics=True)
    kept = set(manifest.files_for("int8")) | {"manifest.json", "manifest.sig"}
    assert kept == {"manifest.json", "manifest.sig", "model_int8.onnx", "golden_int8.bin", "source_features.bin",
                    "adaptable_initial.bin"}
    for p in bundle_copy.iterdir():
        if p.name not in kept:
            p.unlink()
    loaded = load_bundle(bundle_copy, model="int8", threads=1)  # signature, hashes and golden outputs verified
    mean, var = loaded.manifest.source_feature_stats()
    assert mean.dtype == np.float32 and mean.shape == var.shape == (loaded.manifest.feature_dim,)
    assert set(loaded.manifest.source_layer_stats()) == {layer.name for layer in loaded.manifest.layers}
    with pytest.raises(ManifestError, match="fetches it only when it needs it"):
        loaded.manifest.class_gaussians(bundle_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.__setitem__("schema_version", 99), "schema_version"),
        (lambda raw: raw.pop("labels"), r"labels is missing"),
        (lambda raw: raw["input"].__setitem__("shape", [8, 1, 8, 8]), r"input\.shape"),
        (lambda raw: raw["files"].__setitem__("../escape.txt", "0" * 64), "escapes"),
        (lambda raw: raw["adaptable"]["layers"][0].__setitem__("channels", 0), r"channels must be positive"),
        (lambda raw: raw["adaptable"]["initial"].__setitem__("file", "nope.bin"), r"nope\.bin"),
        (lambda raw: raw.__setitem__("default_model", "fp64"), "fp64"),
        (lambda raw: raw["models"][0].__setitem__("session_options", {"graph_level": 1}), r"session_options"),
        (lambda raw: raw["models"][0].__setitem__("session_options", {"disabled_optimizers": "QDQ"}),
         r"disabled_optimizers must be a list"),
        (lambda raw: raw["input"].__setitem__("invariances", ["vflip"]), r"input\.invariances.*'vflip'"),
        (lambda raw: raw["input"].__setitem__("invariances", "hflip"), r"input\.invariances must be a list"),
        (lambda raw: raw["input"].__setitem__("invariances", ["hflip", "hflip"]), r"declared twice"),
    ],
)
def test_bad_manifest_is_refused(bundle_copy: Path, edit: object, message: str, signing_key: Any) -> None:
    _edit_manifest(bundle_copy, edit, signing_key)
    with pytest.raises((ManifestError, BundleIntegrityError), match=message):
        load_bundle(bundle_copy)


def test_declared_invariances_are_read(bundle_copy: Path, signing_key: Any) -> None:
    assert load_bundle(bundle_copy).manifest.input.invariances == ()  # nothing declared unless told
    _edit_manifest(bundle_copy, lambda raw: raw["input"].__setitem__("invariances", ["hflip"]), signing_key)
    assert load_bundle(bundle_copy).manifest.input.invariances == ("hflip",)


def test_scales_a_model_needs_nonnegative_are_enforced(bundle_copy: Path, signing_key: Any) -> None:
    """A model entry's ``nonnegative_params`` (a TFLite graph that max-pools before those scales): a negative
    value is refused, naming it, by set_params and by a forward's overrides, and the parameters stay as they
    were; the other parameters and the bundle's other models take any sign."""
    _edit_manifest(bundle_copy, lambda raw: raw["models"][0].__setitem__("nonnegative_params", ["bn1.weight"]),
                   signing_key)
    bundle = load_bundle(bundle_copy, model="fp32")
    assert bundle.model.nonnegative_params == ("bn1.weight",)
    model = AdaptableModel(bundle)
    before = model.params
    negative = before["bn1.weight"].copy()
    negative[2] = -0.25
    with pytest.raises(InputError, match=r"bn1\.weight\[2\] = -0\.25 is negative: model 'fp32'"):
        model.set_params({"bn1.weight": negative})
    x = np.random.default_rng(0).random((4, *bundle.manifest.input.shape[1:]), dtype=np.float32)
    with pytest.raises(InputError, match=r"bn1\.weight\[2\]"):
        model.forward(x, alpha=0.5, params={"bn1.weight": negative})
    assert all(np.array_equal(v, before[k]) for k, v in model.params.items())
    model.set_params({"bn2.weight": -before["bn2.weight"]})  # not listed
    other = AdaptableModel(load_bundle(bundle_copy, model="int8"))
    other.set_params({"bn1.weight": negative})  # listed for fp32 only
    _edit_manifest(bundle_copy, lambda raw: raw["models"][0].__setitem__("nonnegative_params", ["bn1.mean"]),
                   signing_key)
    with pytest.raises(ManifestError, match=r"nonnegative_params names \['bn1\.mean'\]"):
        load_bundle(bundle_copy)


def test_negative_variances_are_refused(digits_bundle: Path) -> None:
    """A layer's variance (``<layer>.var``, ``Manifest.variance_params``) below 0 makes every output NaN:
    set_params and a forward's overrides refuse it, naming the parameter and its most negative value, and the
    parameters stay as they were; 0 is allowed (the graph's epsilon keeps the normalisation finite)."""
    model = AdaptableModel(load_bundle(digits_bundle, model="fp32", threads=1))
    before = model.params
    negative = before["bn2.var"].copy()
    negative[[1, 3]] = [-0.25, -2.5]
    with pytest.raises(InputError, match=r"bn2\.var\[3\] = -2\.5 is negative \(the most negative of 2 negative "
                                         r"values\): a variance is never negative"):
        model.set_params({"bn1.weight": -before["bn1.weight"], "bn2.var": negative})
    x = np.random.default_rng(0).random((4, *model.manifest.input.shape[1:]), dtype=np.float32)
    with pytest.raises(InputError, match=r"bn2\.var\[3\] = -2\.5"):
        model.forward(x, alpha=0.5, params={"bn2.var": negative})
    assert all(np.array_equal(v, before[k]) for k, v in model.params.items())
    model.set_params({"bn2.var": np.zeros_like(negative)})
    assert np.isfinite(model.forward(x, alpha=0.0).logits).all()
    assert model.manifest.variance_params == tuple(f"{layer.name}.var" for layer in model.manifest.layers)


def test_unparseable_manifest(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(SignatureError):  # the signature is checked before the manifest is parsed
        load_bundle(bundle_copy)
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_bundle(bundle_copy, verify=False)


def test_input_validation(digits_bundle: Path) -> None:
    model = AdaptableModel(load_bundle(digits_bundle))
    good = np.zeros((4, 1, 8, 8), np.float32)
    for bad, message in [
        (np.zeros((4, 1, 9, 8), np.float32), "expected"),
        (np.zeros((0, 1, 8, 8), np.float32), "empty"),
        (np.full((2, 1, 8, 8), np.nan, np.float32), "NaN"),
        (np.array([["a"]]), "shape"),
    ]:
        with pytest.raises(InputError, match=message):
            model.forward(bad)
    with pytest.raises(InputError, match="alpha"):
        model.forward(good, alpha=1.5)
    assert model.forward(good.astype(np.float64)).logits.shape == (4, 10)


def test_params_are_validated_and_swapped_atomically(digits_bundle: Path) -> None:
    model = AdaptableModel(load_bundle(digits_bundle))
    before = params_digest(model.params)
    with pytest.raises(InputError, match="unknown"):
        model.set_params({"bn1.weight": np.ones(16), "bn9.weight": np.ones(3)})
    with pytest.raises(InputError, match="NaN"):
        model.set_params({"bn1.weight": np.full(16, np.nan)})
    with pytest.raises(InputError, match="shape"):
        model.set_params({"bn1.weight": np.ones(15)})
    assert params_digest(model.params) == before
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    base = model.forward(x).logits
    model.set_params({"bn1.weight": model.params["bn1.weight"] * 0.5})
    assert np.abs(model.forward(x).logits - base).max() > 1e-3
    model.reset_params()
    np.testing.assert_array_equal(model.forward(x).logits, base)


def test_params_view_shares_read_only_arrays_and_forward_validated_matches_forward(digits_bundle: Path) -> None:
    model = AdaptableModel(load_bundle(digits_bundle))
    view = model.params_view
    assert set(view) == set(model.params)
    with pytest.raises(ValueError, match="read-only"):
        view["bn1.weight"][0] = 5.0  # the model's own arrays cannot be written through the view
    with pytest.raises(TypeError):
        view["bn1.weight"] = np.ones(16, np.float32)  # type: ignore[index]
    mine = model.params
    mine["bn1.weight"][0] = 5.0  # params stays a private, writable copy
    assert model.params_view["bn1.weight"][0] != 5.0
    model.set_params({"bn1.weight": mine["bn1.weight"]})
    assert view["bn1.weight"][0] != 5.0 and model.params_view["bn1.weight"][0] == 5.0  # a view is a snapshot
    x = model.check_input(np.random.default_rng(1).random((8, 1, 8, 8)))
    feeds = {"bn2.mean": np.zeros(32, np.float32)}
    a, b = model.forward(x, alpha=0.3, params=feeds), model.forward_validated(x, 0.3, feeds)
    np.testing.assert_array_equal(a.logits, b.logits)
    with pytest.raises(InputError, match="alpha"):
        model.forward_validated(x, 1.5)


def test_alpha_one_uses_batch_statistics(digits_bundle: Path) -> None:
    model = AdaptableModel(load_bundle(digits_bundle))
    x = np.random.default_rng(1).random((32, 1, 8, 8), dtype=np.float32)
    out = model.forward(x, alpha=1.0)
    shifted = {k: v + 3.0 for k, v in model.params.items() if k.endswith(".mean")}
    # with α = 1 the reference statistics do not matter
    np.testing.assert_allclose(model.forward(x, alpha=1.0, params=shifted).logits, out.logits, atol=1e-5)
    assert set(out.batch_stats) == {layer.name for layer in model.manifest.layers}


def test_unsigned_or_forged_bundle_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        load_bundle(bundle_copy)


def test_edit_without_resigning_breaks_the_signature(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda raw: raw.__setitem__("name", "evil"), None)
    with pytest.raises(SignatureError, match="does not match"):
        load_bundle(bundle_copy)


def test_trusted_keys_restrict_the_signer(digits_bundle: Path, tmp_path: Path, signing_key: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from exporter.signing import generate_key, public_key_raw, public_path

    ours = public_key_raw(signing_key)
    assert load_bundle(digits_bundle, trusted_keys=[ours]).signer.trusted  # type: ignore[union-attr]
    stranger = public_key_raw(Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError, match="not among the 1 trusted keys"):
        load_bundle(digits_bundle, trusted_keys=[stranger])
    generate_key(tmp_path / "k.pem")
    assert len(load_public_key(public_path(tmp_path / "k.pem"))) == 32
