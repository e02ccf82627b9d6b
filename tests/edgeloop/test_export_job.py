"""`edgeloop export` with compression, both formats, packing and foreign models, end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeloop.cli import main
from exporter.bundle import export_details
from runtime import AdaptableModel, load_bundle
from runtime.predictor import Predictor

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "models").is_dir(), reason=f"{SHARED} is absent")


@pytest.fixture(autouse=True)
def _signing_key(tmp_path: Path) -> None:
    """The key the exports below sign with: `export --signing-key PATH` refuses a PATH that does not exist."""
    assert main(["keygen", "--out", str(tmp_path / "k.pem")]) == 0


@pytest.fixture(scope="module")
def compressed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small_cnn on digits, low-rank + 2:4 + int8, ONNX and TFLite, packed."""
    root = tmp_path_factory.mktemp("export_job")
    ckpt = root / "s.pt"
    assert main(["keygen", "--out", str(root / "k.pem")]) == 0
    assert main(["train", "--arch", "small_cnn", "--epochs", "8", "--out", str(ckpt)]) == 0
    args = ["export", str(ckpt), "--out", str(root / "b"), "--sparsity", "2:4", "--low-rank", "energy=0.95",
            "--exclude", "features.0", "--formats", "onnx,tflite", "--signing-key", str(root / "k.pem")]
    assert main(args) == 0
    return root / "b"


def test_every_model_loads_verifies_and_agrees(compressed_bundle: Path) -> None:
    manifest = export_details(compressed_bundle)  # with the export report: parity per model
    names = {m["name"] for m in manifest["models"]}
    assert names == {"fp32", "int8", "folded_fp32", "folded_int8", "tflite_fp32", "tflite_folded_fp32",
                     "tflite_folded_int8"}
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    reference = Predictor(load_bundle(compressed_bundle, model="folded_fp32")).predict(x).probs.argmax(1)
    for entry in manifest["models"]:
        bundle = load_bundle(compressed_bundle, model=entry["name"])  # signature, sha256s, golden vectors
        assert entry["parity"]["top1_agreement"] >= 0.95, entry
        if entry["precision"] == "fp32":
            assert entry["parity"]["max_abs_diff"] < 1e-3, entry
        pred = Predictor(bundle).predict(x).probs.argmax(1)
        assert (pred == reference).mean() >= 0.75, entry["name"]
    assert AdaptableModel(load_bundle(compressed_bundle, model="tflite_fp32")).forward(x, alpha=0.5).logits.shape


def test_nm_pattern_recorded_and_every_model_packed(compressed_bundle: Path) -> None:
    summary = json.loads((compressed_bundle / "manifest.json").read_text())["compression"]
    assert summary["passes"] == ["low_rank", "nm_sparsity"] and summary["nm_check"]["all_sparsified_layers_hold"]
    assert summary["nm_sparsity"]["pattern"] == "2:4" and min(summary["nm_sparsity"]["layers"].values()) >= 0.5
    manifest = export_details(compressed_bundle)  # the full pass reports and per-tensor check
    compression = manifest["compression"]
    assert [p["pass"] for p in compression["passes"]] == ["low_rank", "nm_sparsity"]
    sparsified = compression["passes"][1]["layers"]
    assert set(summary["nm_sparsity"]["layers"]) == set(sparsified)  # per-layer sparsity, in the manifest
    assert compression["nm_check"]["all_sparsified_layers_hold"] is True
    assert set(compression["nm_check"]["verified_tensors"]) == {f"model.{layer}.weight" for layer in sparsified}
    assert all(t["sparsity"] >= 0.5 for t in compression["nm_check"]["verified_tensors"].values())
    assert compression["nm_check"]["dense_tensors"] == ["model.features.0.weight"]  # excluded on purpose
    models = {m["name"]: m for m in manifest["models"]}
    assert all(m["packed"]["bytes"] < m["packed"]["unpacked_bytes"] for m in models.values())
    assert not list(compressed_bundle.glob("*.onnx")) and not list(compressed_bundle.glob("*.tflite"))
    assert models["int8"]["packed"]["bytes"] / models["int8"]["packed"]["unpacked_bytes"] < 0.9
    # TFLite keeps conv filters OHWI: they pack along torch's (C_in, kh, kw) order, labelled by module path
    for name in ("tflite_folded_fp32", "tflite_folded_int8"):
        packed = models[name]["packed"]
        assert packed["bytes"] / packed["unpacked_bytes"] < 0.75, (name, packed)
        assert len(packed["tensors_packed"]) >= len(sparsified), packed["tensors_packed"]


def test_packed_model_tampering_is_caught(compressed_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from runtime import BundleIntegrityError

    copy = Path(shutil.copytree(compressed_bundle, tmp_path / "b"))
    pack = copy / "model_int8.onnx.nmpack"
    data = bytearray(pack.read_bytes())
    data[-10] ^= 0x01
    pack.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"model_int8\.onnx\.nmpack"):
        load_bundle(copy, model="int8")


def test_unsupported_layer_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "s.pt"
    assert main(["train", "--arch", "small_cnn", "--epochs", "1", "--out", str(ckpt)]) == 0
    code = main(["export", str(ckpt), "--out", str(tmp_path / "b"), "--sparsity", "2:4",
                 "--signing-key", str(tmp_path / "k.pem")])
    err = capsys.readouterr().err
    assert code == 2 and "features.0" in err and "Conv2d" in err and "exclude" in err
    assert not (tmp_path / "b").exists()


def test_model_argument_is_required_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--out", str(tmp_path / "b")]) == 2
    assert "exactly one of MODEL" in capsys.readouterr().err


@needs_shared
def test_foreign_onnx_zoo_mnist_keeps_its_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    args = ["export", "--from-onnx", str(SHARED / "models" / "onnx_zoo_mnist8.onnx"), "--dataset", "mnist",
            "--value-range", "0,255", "--out", str(out), "--signing-key", str(tmp_path / "k.pem")]
    assert main(args) == 0
    assert main(["eval", str(out), "--dataset", "mnist", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] >= 0.989


@needs_shared
@pytest.mark.parametrize(("name", "dtype", "floor"), [("mlperf_tiny_resnet8_cifar10", "float32", 0.754),
                                                       ("mlperf_tiny_resnet8_cifar10_int8", "uint8", 0.753)])
def test_foreign_tflite_resnet8_keeps_its_accuracy(tmp_path: Path, name: str, dtype: str, floor: float) -> None:
    out = tmp_path / name
    args = ["export", "--from-tflite", str(SHARED / "models" / f"{name}.tflite"), "--dataset", "cifar10",
            "--layout", "NHWC", "--value-range", "0,255", "--input-dtype", dtype, "--output-kind",
            "probabilities", "--out", str(out), "--signing-key", str(tmp_path / "k.pem")]
    assert main(args) == 0
    assert main(["eval", str(out), "--dataset", "cifar10", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] >= floor


def test_import_path_model_exports_and_adapts(tmp_path: Path) -> None:
    out = tmp_path / "b"
    args = ["export", "tests.edgeloop.importable_models:build_net", "--dataset", "digits", "--out", str(out),
            "--no-folded", "--calibration-samples", "64", "--signing-key", str(tmp_path / "k.pem"),
            "--invariance", "hflip"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["invariances"] == ["hflip"]
    assert manifest["arch"] == "import:tests.edgeloop.importable_models:build_net"
    assert [layer["name"] for layer in manifest["adaptable"]["layers"]] == ["bn1", "bn2"]
    model = AdaptableModel(load_bundle(out))
    result = model.forward(np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32), alpha=0.5)
    assert result.features.shape == (4, 16) and result.logits.shape == (4, 10)


def test_invariances_come_from_the_checkpoint_unless_the_flag_names_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from exporter.checkpoint import load_checkpoint, save_checkpoint

    plain = tmp_path / "plain.pt"
    assert main(["train", "--arch", "small_cnn", "--epochs", "1", "--limit", "200", "--out", str(plain)]) == 0
    model, info = load_checkpoint(plain)
    declared, bad = tmp_path / "declared.pt", tmp_path / "bad.pt"
    save_checkpoint(model, info["arch"], info["spec"], declared, {**info["meta"], "invariances": ["hflip"]})
    save_checkpoint(model, info["arch"], info["spec"], bad, {**info["meta"], "invariances": ["shear"]})
    base = ["--no-folded", "--no-int8", "--calibration-samples", "8", "--signing-key", str(tmp_path / "k.pem")]

    def invariances(ckpt: Path, *flags: str) -> tuple[str, ...]:
        out = tmp_path / f"b-{ckpt.stem}-{len(flags)}"
        assert main(["export", str(ckpt), "--out", str(out), *base, *flags]) == 0
        return load_bundle(out).manifest.input.invariances

    assert invariances(plain) == ()
    assert invariances(declared) == ("hflip",)
    flipped = tmp_path / "flipped.pt"  # `train --flip-crop` declares it in the checkpoint
    assert main(["train", "--arch", "small_cnn", "--epochs", "1", "--limit", "200", "--flip-crop", "--out",
                 str(flipped)]) == 0
    assert load_checkpoint(flipped)[1]["meta"]["invariances"] == ["hflip"]
    assert invariances(flipped) == ("hflip",)
    assert invariances(plain, "--invariance", "hflip") == ("hflip",)
    assert main(["export", str(bad), "--out", str(tmp_path / "bad"), *base]) == 2
    assert "bad.pt: checkpoint meta: unknown invariance 'shear'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["export", str(plain), "--out", str(tmp_path / "x"), "--invariance", "vflip"])
    assert "invalid choice: 'vflip'" in capsys.readouterr().err


def test_import_path_model_without_linear_head_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["export", "tests.edgeloop.importable_models:build_headless", "--dataset", "digits", "--out",
            str(tmp_path / "b"), "--signing-key", str(tmp_path / "k.pem")]
    assert main(args) == 2
    assert "nn.Linear" in capsys.readouterr().err


def test_eval_output_methods_on_a_folded_model(compressed_bundle: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", str(compressed_bundle), "--model", "folded_fp32", "--corruption", "contrast", "--limit", "200"]
    assert main([*args, "--tta", "t3a", "--json", str(tmp_path / "t3a.json")]) == 0
    assert 0.0 < json.loads((tmp_path / "t3a.json").read_text())["accuracy"] <= 1.0
    assert main([*args, "--tta", "alpha_bn"]) == 2
    assert "needs an adaptable graph" in capsys.readouterr().err


@pytest.mark.parametrize(("shape", "count"), [((1, 8, 8), 8), ((1, 28, 28), 8), ((3, 32, 32), 2), ((3, 224, 224), 2)])
def test_golden_vectors_fit_a_byte_budget(shape: tuple[int, ...], count: int) -> None:
    """Every device downloads its model's golden vectors: large inputs carry fewer (at least 2)."""
    from edgeloop.exporting import GOLDEN_INPUT_BUDGET, golden_count

    assert golden_count(shape) == count
    assert count * int(np.prod(shape)) <= GOLDEN_INPUT_BUDGET or count == 2


def test_import_path_model_is_found_beside_the_user(tmp_path: Path) -> None:
    """`edgeloop export my_models:build_net` from the directory holding my_models.py, as `python -m` would find
    it (a console script does not put the working directory on sys.path)."""
    src = Path(__file__).with_name("importable_models.py").read_text()
    (tmp_path / "user_models_beside.py").write_text(src)
    script = Path(sys.executable).with_name("edgeloop")
    done = subprocess.run([str(script), "export", "user_models_beside:build_net", "--dataset", "digits", "--out",
                           "b", "--no-folded", "--no-int8", "--calibration-samples", "8", "--signing-key", "k.pem"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["arch"] == "import:user_models_beside:build_net"
    assert "user_models_beside" not in sys.modules  # the test process itself imported nothing


def test_inspect_verifies_every_packed_model_in_both_runtimes(compressed_bundle: Path) -> None:
    from runtime.bundle_info import describe, inspect_bundle

    ins = inspect_bundle(compressed_bundle)
    assert ins.ok, ins.failures
    assert {m["name"]: m["golden"]["status"] for m in ins.models} == dict.fromkeys(
        ("fp32", "int8", "folded_fp32", "folded_int8", "tflite_fp32", "tflite_folded_fp32", "tflite_folded_int8"),
        "ok")
    for m in ins.models:  # shipped in the packed N:M transport encoding, smaller than the model it decodes to
        assert m["packing"] == "2:4 N:M, lzma" and m["unpacked_bytes"] > m["bytes"] > 0, m
    lines = describe(ins.manifest)["compression"]  # type: ignore[arg-type]
    assert any(line.startswith("low-rank on") for line in lines)
    assert any(line.startswith("N:M sparsity 2:4") for line in lines)
    assert any("all sparsified layers hold: True" in line for line in lines)
