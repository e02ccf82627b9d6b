"""``edgeloop export --signing-key PATH`` refuses a PATH that does not exist (a typo must not sign the bundle with
a fresh key that devices do not trust); the default key location, and the Python API by default, still create."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeloop.cli import main
from edgeloop.pipeline import signing_key
from exporter.signing import public_key_raw, public_path
from runtime.signing import key_id


def test_cli_export_refuses_a_signing_key_that_does_not_exist(
    tmp_path: Path, digits_checkpoint: tuple[Path, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", str(tmp_path / "default_key.pem"))
    typo = tmp_path / "keys" / "signing_kye.pem"
    bundle = tmp_path / "bundle"
    code = main(["export", str(digits_checkpoint[0]), "--out", str(bundle), "--signing-key", str(typo)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"signing key {typo} does not exist" in err
    assert f"edgeloop keygen --out {typo}" in err
    assert not typo.exists() and not public_path(typo).exists() and not typo.parent.exists()
    assert not bundle.exists() and not (tmp_path / "default_key.pem").exists()


def test_cli_export_refuses_a_foreign_wrap_with_a_missing_signing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, typo = tmp_path / "model.onnx", tmp_path / "nokey.pem"
    model.write_bytes(b"not read: the key is checked first")
    code = main(["export", "--from-onnx", str(model), "--dataset", "digits", "--out", str(tmp_path / "b"),
                 "--signing-key", str(typo)])
    assert code == 2 and f"signing key {typo} does not exist" in capsys.readouterr().err
    assert not typo.exists()


def test_cli_export_signs_with_an_existing_explicit_key(
    tmp_path: Path, digits_checkpoint: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", str(tmp_path / "default_key.pem"))
    key_path = tmp_path / "release.pem"
    assert main(["keygen", "--out", str(key_path)]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", str(digits_checkpoint[0]), "--out", str(bundle), "--signing-key", str(key_path),
                 "--no-int8", "--no-folded", "--calibration-samples", "8"]) == 0
    signature = json.loads((bundle / "manifest.sig").read_text())
    assert signature["key_id"] == key_id(public_key_raw(signing_key(key_path, create=False)))
    assert not (tmp_path / "default_key.pem").exists()  # the default key was neither used nor created


def test_cli_signing_key_help_says_it_must_exist(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "must exist" in text and "edgeloop keygen --out" in text


def test_python_api_creates_by_default_and_refuses_with_create_false(tmp_path: Path) -> None:
    missing = tmp_path / "sub" / "key.pem"
    with pytest.raises(FileNotFoundError, match=r"signing key .*key\.pem does not exist.*edgeloop keygen --out"):
        signing_key(missing, create=False)
    assert not missing.exists()
    created = signing_key(missing)  # the documented default: created, with its public key beside it
    assert missing.is_file() and public_path(missing).is_file()
    assert public_key_raw(signing_key(missing, create=False)) == public_key_raw(created)


def test_default_location_is_created_when_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = tmp_path / "cfg" / "signing_key.pem"
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", str(default))
    key = signing_key()
    assert default.is_file() and public_key_raw(signing_key(default, create=False)) == public_key_raw(key)
