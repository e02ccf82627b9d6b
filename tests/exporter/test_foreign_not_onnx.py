"""``edgeloop export --from-onnx`` / ``wrap_onnx`` on a file that is not an ONNX model: a clear error naming
the file, not a protobuf traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeloop.cli import main
from exporter.foreign import ForeignModelError, wrap_onnx

TFLITE_HEADER = b"\x1c\x00\x00\x00TFL3" + bytes(64)  # the start of a TFLite flatbuffer


@pytest.mark.parametrize("content", [TFLITE_HEADER, b"garbage \xff\xfe" * 40, b""])
def test_wrap_onnx_names_a_file_that_is_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ForeignModelError, match=r"model\.onnx is not a valid ONNX model"):
        wrap_onnx(path, tmp_path / "out", labels=["a", "b"], output_kind="logits",
                  input_spec={"name": "x", "shape": [-1, 1, 8, 8], "dtype": "float32"},
                  golden_x=np.zeros((2, 1, 8, 8), np.float32))
    assert not (tmp_path / "out").exists()


def test_cli_export_from_onnx_on_a_non_onnx_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(TFLITE_HEADER)
    assert main(["keygen", "--out", str(tmp_path / "key.pem")]) == 0
    code = main(["export", "--from-onnx", str(path), "--dataset", "digits", "--out", str(tmp_path / "out"),
                 "--signing-key", str(tmp_path / "key.pem")])
    assert code == 2
    err = capsys.readouterr().err
    assert "edgeloop export: error:" in err and "model.tflite is not a valid ONNX model" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
