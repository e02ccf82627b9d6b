"""``edgeloop inspect`` / :func:`runtime.bundle_info.inspect_bundle`: every check a device runs, for every model,
each failure named and none stopping the others."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeloop.cli import main
from runtime.bundle_info import inspect_bundle, render_inspection
from runtime.errors import ManifestError
from tests.runtime.test_bundle import _edit_block


def _statuses(inspection: Any) -> dict[str, str]:
    return {c.what: c.status for c in inspection.checks}


def test_a_sound_bundle_is_described_and_verified(digits_bundle: Path, signing_key: Any) -> None:
    from exporter.signing import public_key_raw

    ins = inspect_bundle(digits_bundle, [public_key_raw(signing_key)])
    assert ins.ok and ins.failures == []
    statuses = _statuses(ins)
    assert statuses["signature"] == statuses["manifest"] == statuses["files"] == "ok"
    assert statuses["golden vectors of model 'fp32'"] == statuses["golden vectors of model 'int8'"] == "ok"
    assert "a trusted key" in next(c.detail for c in ins.checks if c.what == "signature")
    models = {m["name"]: m for m in ins.models}
    assert set(models) == {"fp32", "int8"}
    assert models["fp32"]["bytes"] == (digits_bundle / "model_fp32.onnx").stat().st_size
    assert models["fp32"]["parity_top1_agreement"] >= 0.95  # from the export report
    assert "calibration on 256 samples" in models["int8"]["quantization"]
    text = render_inspection(ins)
    assert "verified: every check passed" in text and "fp32 *" in text and "adaptable 3 normalisation" in text
    data = ins.to_dict()
    assert data["ok"] and data["description"]["labels"] == 10 and json.dumps(data)


def test_a_damaged_model_file_is_named_and_no_model_runs(bundle_copy: Path) -> None:
    with open(bundle_copy / "model_int8.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    ins = inspect_bundle(bundle_copy)
    statuses = _statuses(ins)
    assert not ins.ok
    assert statuses["file model_int8.onnx"] == "failed" and statuses["files"] == "failed"
    assert "fails its sha256 check" in next(c.detail for c in ins.checks if c.what == "file model_int8.onnx")
    golden = next(c for c in ins.checks if c.what == "golden vectors of model 'int8'")
    assert golden.status == "failed" and "not run: its files failed (model_int8.onnx)" in golden.detail
    fp32 = next(c for c in ins.checks if c.what == "golden vectors of model 'fp32'")  # a device refuses it too
    assert fp32.status == "failed" and "a device refuses the bundle while model_int8.onnx fail" in fp32.detail
    assert "NOT VERIFIED: 4 check(s) failed" in render_inspection(ins)


def test_golden_outputs_that_do_not_match_are_named(bundle_copy: Path, signing_key: Any) -> None:
    _edit_block(bundle_copy, "golden_fp32.bin", lambda g: g.__setitem__("fp32/logits", g["fp32/logits"] + 1.0),
                signing_key)  # re-hashed and re-signed: only the outputs are wrong
    ins = inspect_bundle(bundle_copy)
    golden = next(c for c in ins.checks if c.what == "golden vectors of model 'fp32'")
    assert golden.status == "failed" and "'logits'" in golden.detail
    assert [c.what for c in ins.failures] == ["golden vectors of model 'fp32'"]


def test_an_export_report_in_another_form_is_named(bundle_copy: Path, signing_key: Any) -> None:
    from tests.runtime.test_bundle import _rehash

    (bundle_copy / "export_report.json").write_text('[1, 2]')
    _rehash(bundle_copy, "export_report.json", signing_key)  # hashed and signed, but not an exporter's report
    ins = inspect_bundle(bundle_copy)
    (failure,) = ins.failures
    assert failure.what == "file export_report.json" and "not in the exporter's form" in failure.detail
    assert all(m["golden"]["status"] == "ok" and m["parity_top1_agreement"] is None for m in ins.models)
    assert "—" in render_inspection(ins)


def test_an_untrusted_signer_runs_nothing(bundle_copy: Path) -> None:
    from exporter.signing import generate_key, public_key_raw

    stranger = public_key_raw(generate_key(bundle_copy.parent / "other.pem"))
    ins = inspect_bundle(bundle_copy, [stranger])
    statuses = _statuses(ins)
    assert statuses["signature"] == "failed" and statuses["files"] == "ok"
    for model in ("fp32", "int8"):  # nothing a stranger wrote is run
        check = next(c for c in ins.checks if c.what == f"golden vectors of model '{model}'")
        assert check.status == "skipped" and "signature did not verify" in check.detail


def test_a_tampered_manifest_and_an_absent_optional_file(bundle_copy: Path) -> None:
    (bundle_copy / "class_statistics.bin").unlink()  # fetched only by methods that need it: absent, not failed
    assert _statuses(inspect_bundle(bundle_copy, golden=False))["file class_statistics.bin"] == "absent"
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["labels"][0] = "zero"
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    ins = inspect_bundle(bundle_copy)
    assert _statuses(ins)["signature"] == "failed" and not ins.ok
    (bundle_copy / "manifest.json").write_text("{not json")
    ins = inspect_bundle(bundle_copy)
    assert _statuses(ins)["manifest"] == "failed" and ins.models == [] and ins.manifest is None
    assert "not valid JSON" in next(c.detail for c in ins.checks if c.what == "manifest")


def test_a_model_whose_runtime_is_missing_is_skipped_not_failed(bundle_copy: Path, signing_key: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A device without LiteRT inspecting a TFLite model: said so, and not a failure."""
    def rename(raw: dict[str, Any]) -> None:
        raw["models"][1]["format"] = "tflite"  # the int8 ONNX file declared as TFLite

    from tests.runtime.test_bundle import _edit_manifest

    _edit_manifest(bundle_copy, rename, signing_key)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    ins = inspect_bundle(bundle_copy)
    check = next(c for c in ins.checks if c.what == "golden vectors of model 'int8'")
    assert check.status == "skipped" and "ai-edge-litert" in check.detail
    assert ins.ok


def test_the_command_line(digits_bundle: Path, bundle_copy: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(digits_bundle), "--json", str(tmp_path / "i.json")]) == 0
    assert "verified: every check passed" in capsys.readouterr().out
    assert json.loads((tmp_path / "i.json").read_text())["ok"] is True
    (bundle_copy / "golden_fp32.bin").unlink()
    assert main(["inspect", str(bundle_copy), "--no-golden"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  file golden_fp32.bin: bundle file 'golden_fp32.bin' is missing" in out
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "bundle directory not found" in capsys.readouterr().err
    with pytest.raises(ManifestError, match=r"has no manifest\.json"):
        inspect_bundle(tmp_path)


def test_a_model_file_its_runtime_cannot_load_fails(bundle_copy: Path, signing_key: Any) -> None:
    from tests.runtime.test_bundle import _rehash

    (bundle_copy / "model_int8.onnx").write_bytes(b"not an onnx model")
    _rehash(bundle_copy, "model_int8.onnx", signing_key)  # hashed and signed: only the runtime can tell
    ins = inspect_bundle(bundle_copy)
    check = next(c for c in ins.checks if c.what == "golden vectors of model 'int8'")
    assert check.status == "failed" and "onnxruntime cannot load" in check.detail
    assert not ins.ok and _statuses(ins)["golden vectors of model 'fp32'"] == "ok"


def test_a_missing_file_fails_only_the_models_that_need_it(bundle_copy: Path) -> None:
    (bundle_copy / "model_int8.onnx").unlink()
    ins = inspect_bundle(bundle_copy)
    statuses = _statuses(ins)
    assert statuses["file model_int8.onnx"] == "failed"
    assert statuses["golden vectors of model 'fp32'"] == "ok"  # a device running fp32 loads this bundle
    int8 = next(c for c in ins.checks if c.what == "golden vectors of model 'int8'")
    assert int8.status == "failed" and "its files failed (model_int8.onnx)" in int8.detail
    assert next(m for m in ins.models if m["name"] == "int8")["bytes"] is None


def test_odd_but_signed_values_do_not_break_the_report(bundle_copy: Path, signing_key: Any) -> None:
    from tests.runtime.test_bundle import _edit_manifest, _rehash

    for created in (1e300, -1e20):
        _edit_manifest(bundle_copy, lambda raw, c=created: raw.__setitem__("created_unix_ms", c), signing_key)
        ins = inspect_bundle(bundle_copy, golden=False)
        assert ins.to_dict()["description"]["created"] is None and "created ?" in render_inspection(ins)
    report = json.loads((bundle_copy / "export_report.json").read_text())
    report["models"]["fp32"].update(name="other", file="../../outside.onnx", packed={"file": "../../../etc/passwd"})
    (bundle_copy / "export_report.json").write_text(json.dumps(report))
    _rehash(bundle_copy, "export_report.json", signing_key)
    fp32 = next(m for m in inspect_bundle(bundle_copy, golden=False).models if m["name"] == "fp32")
    assert fp32["file"] == "model_fp32.onnx"  # the signed manifest's entry stands; the report only adds to it
    assert fp32["bytes"] == (bundle_copy / "model_fp32.onnx").stat().st_size


def test_a_symlink_loop_is_a_named_failure_on_the_device_too(bundle_copy: Path) -> None:
    from runtime import BundleIntegrityError, load_bundle

    (bundle_copy / "model_int8.onnx").unlink()
    (bundle_copy / "model_int8.onnx").symlink_to(bundle_copy / "model_int8.onnx")
    ins = inspect_bundle(bundle_copy)
    assert "cannot be read" in next(c.detail for c in ins.checks if c.what == "file model_int8.onnx")
    assert _statuses(ins)["golden vectors of model 'fp32'"] == "failed"  # a device refuses the whole bundle
    with pytest.raises(BundleIntegrityError, match=r"model_int8\.onnx' cannot be read"):
        load_bundle(bundle_copy, model="fp32")
