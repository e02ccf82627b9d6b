"""The LiteRT session: logical names (metadata, explicit io_names), batch resizing and its cache, scalars,
quantized inputs/outputs, refusals, backend selection, and the device side importing no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from edgeloop.data import default_data_dir
from runtime.errors import BackendUnavailableError, InputError
from runtime.litert import LiteRTSession, TensorInfo, dequantize, quantize, read_io_names_metadata
from runtime.session import OrtSession, backend_for, open_session

ROOT = Path(__file__).resolve().parents[2]
RESNET_INT8 = default_data_dir() / "models" / "mlperf_tiny_resnet8_cifar10_int8.tflite"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny conv–BN–ReLU net (spec 1×6×6, 3 classes) converted to an adaptable TFLite file; and the model."""
    pytest.importorskip("litert_torch")
    import torch

    from exporter.models import ConvNet, ModelSpec
    from exporter.tflite_export import export_tflite

    torch.manual_seed(0)
    model = ConvNet(ModelSpec(1, 3, 6, (0.5,), (0.25,)), [(4, 1), (8, 2)]).eval()
    x = np.random.default_rng(0).uniform(0, 1, (8, 1, 6, 6)).astype(np.float32)
    path = tmp_path_factory.mktemp("tiny") / "tiny.tflite"
    export_tflite(model, path, form="adaptable", example=torch.from_numpy(x[:1]), parity_x=x)
    return path, model


def _feeds(model: object, x: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    from exporter.onnx_export import make_feeds, params_numpy

    return make_feeds(x, params_numpy(model), alpha)  # type: ignore[arg-type]


def test_names_come_from_the_model_metadata(tiny: tuple) -> None:
    path, _ = tiny
    session = LiteRTSession(path, threads=1)
    assert session.input_names == ["input", "alpha", *[f"bn{i}.{k}" for i in (1, 2)
                                                          for k in ("weight", "bias", "mean", "var")]]
    assert {"logits", "features", "bn2.batch_var"} <= set(session.output_names)
    assert read_io_names_metadata(path.read_bytes())["inputs"]["bn2.var"] == "bn2_var"
    raw = LiteRTSession(path, io_names={"inputs": {}, "outputs": {}})
    assert "bn1_weight" in raw.input_names  # an explicit mapping overrides the metadata


def test_resize_cache_and_scalars(tiny: tuple) -> None:
    path, model = tiny
    from exporter.onnx_export import torch_reference

    session = LiteRTSession(path, threads=1, max_cached_batches=2)
    rng = np.random.default_rng(3)
    for batch in (3, 1, 5, 3, 9):
        x = rng.uniform(0, 1, (batch, 1, 6, 6)).astype(np.float32)
        feeds = _feeds(model, x, 0.5)
        feeds["alpha"] = np.array([0.5], np.float32)  # a size-1 array for the scalar is accepted
        out = session.run(feeds)
        ref = torch_reference(model, x, {k: v for k, v in feeds.items() if k.startswith("bn")}, 0.5)  # type: ignore
        for name, expected in ref.items():
            np.testing.assert_allclose(out[name], expected, atol=1e-4, rtol=1e-3, err_msg=f"{name} batch {batch}")
    assert len(session._interpreters) == 2  # least recently used batch sizes were evicted


def test_strided_and_float64_inputs_give_the_contiguous_float32_answer(tiny: tuple) -> None:
    path, model = tiny
    session = LiteRTSession(path, threads=1)
    x = np.random.default_rng(4).uniform(0, 1, (4, 1, 6, 12)).astype(np.float32)
    strided, contiguous = x[..., ::2], np.ascontiguousarray(x[..., ::2])
    expected = session.run(_feeds(model, contiguous, 0.5))
    for variant in (strided, contiguous.astype(np.float64), np.asfortranarray(contiguous)):
        for out in (session.run(_feeds(model, variant, 0.5)), session.run_checked(_feeds(model, variant, 0.5))):
            for name, value in expected.items():
                np.testing.assert_array_equal(out[name], value, err_msg=name)
    with pytest.raises(InputError, match="'input' has shape"):  # run_checked still checks each value
        session.run_checked({**_feeds(model, contiguous, 0.5), "input": np.zeros((2, 1, 5, 5), np.float32)})


def test_an_immutable_input_fed_again_is_not_copied_again_and_nothing_else_is_skipped(tiny: tuple) -> None:
    """Read-only arrays that own their memory (a model's parameters) are set once per interpreter and skipped when
    fed again; anything else is set on every call, so the answers equal a fresh session's."""
    path, model = tiny
    session, fresh = LiteRTSession(path, threads=1), lambda f: LiteRTSession(path, threads=1).run(f)
    x = np.random.default_rng(5).uniform(0, 1, (4, 1, 6, 6)).astype(np.float32)
    base = _feeds(model, x, 0.5)
    frozen = {k: v.copy() for k, v in base.items()}
    for arr in frozen.values():
        arr.flags.writeable = False
    frozen["input"] = base["input"]  # the batch stays writable, as a camera's frames are
    other = {**frozen, "bn1.weight": np.ascontiguousarray(frozen["bn1.weight"] * 2.0)}
    other["bn1.weight"].flags.writeable = False
    calls: list[str] = []
    interp = session._interpreter_for(4)
    original = interp.set_tensor
    interp.set_tensor = lambda index, value: (calls.append(str(index)), original(index, value))[1]
    for feeds in (frozen, frozen, other, frozen):
        out = session.run(feeds)
        for name, value in fresh(feeds).items():
            np.testing.assert_array_equal(out[name], value, err_msg=name)
    n_inputs = len(session.input_names)
    # first call: every input; again: only the writable batch; then bn1.weight changes, and changes back
    assert len(calls) == n_inputs + 1 + 2 + 2
    writable = dict(frozen, **{"bn2.var": frozen["bn2.var"].copy()})  # a writable array, changed in place
    session.run(writable)
    writable["bn2.var"] *= 3.0
    np.testing.assert_array_equal(session.run(writable)["logits"], fresh(writable)["logits"])


def test_refusals_name_the_tensor(tiny: tuple) -> None:
    path, model = tiny
    session = LiteRTSession(path)
    feeds = _feeds(model, np.zeros((2, 1, 6, 6), np.float32), 0.0)
    with pytest.raises(InputError, match="missing \\['alpha'\\]"):
        session.run({k: v for k, v in feeds.items() if k != "alpha"})
    with pytest.raises(InputError, match="unknown \\['extra'\\]"):
        session.run({**feeds, "extra": np.zeros(1)})
    with pytest.raises(InputError, match="'input' has shape \\(2, 1, 5, 5\\)"):
        session.run({**feeds, "input": np.zeros((2, 1, 5, 5), np.float32)})
    with pytest.raises(InputError, match=r"'bn1\.weight' has shape \(5,\)"):
        session.run({**feeds, "bn1.weight": np.ones(5, np.float32)})
    with pytest.raises(InputError, match="rank"):
        session.run({**feeds, "input": np.zeros((1, 6, 6), np.float32)})
    with pytest.raises(BackendUnavailableError, match="io_names inputs \\['nope'\\]"):
        LiteRTSession(path, io_names={"inputs": {"x": "nope"}, "outputs": {}})
    with pytest.raises(InputError, match="two logical names"):
        LiteRTSession(path, io_names={"inputs": {"a": "input", "b": "input"}})
    with pytest.raises(ValueError, match="threads"):
        LiteRTSession(path, threads=0)
    with pytest.raises(BackendUnavailableError, match="cannot read"):
        LiteRTSession(path.with_name("missing.tflite"))


def test_quantize_round_trip() -> None:
    info = TensorInfo("x", 0, (1, 4), (1, 4), np.dtype(np.int8), scale=0.5, zero_point=-10, batched=True)
    q = quantize(np.array([[-100.0, 0.0, 1.24, 200.0]]), info)
    assert q.dtype == np.int8 and q.tolist() == [[-128, -10, -8, 127]]
    np.testing.assert_allclose(dequantize(q, info), [[-59.0, 0.0, 1.0, 68.5]])
    plain = TensorInfo("y", 0, (1,), (1,), np.dtype(np.float32), None, None, False)
    with pytest.raises(InputError, match="not quantized"):
        quantize(np.zeros(1), plain)


def test_quantized_input_and_output() -> None:
    if not RESNET_INT8.is_file():
        pytest.skip(f"shared data absent: {RESNET_INT8}")
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    session = LiteRTSession(RESNET_INT8, threads=1)
    info = session.input_info("input_1_int8")
    assert info.quantized and info.dtype == np.int8 and (info.scale, info.zero_point) == (1.0, -128)
    raw = session.run({"input_1_int8": (x.astype(np.int16) - 128).astype(np.int8)})["Identity_int8"]
    from_uint8 = session.run({"input_1_int8": x})["Identity_int8"]
    from_float = session.run({"input_1_int8": x.astype(np.float32)})["Identity_int8"]
    np.testing.assert_array_equal(raw, from_uint8)
    np.testing.assert_array_equal(raw, from_float)
    assert raw.dtype == np.float32 and np.all((raw >= 0) & (raw <= 1))
    ints = LiteRTSession(RESNET_INT8, dequantize_outputs=False).run({"input_1_int8": x})["Identity_int8"]
    assert ints.dtype == np.int8
    assert read_io_names_metadata(RESNET_INT8.read_bytes()) is None


def test_backend_selection(tiny: tuple, tmp_path: Path) -> None:
    path, _ = tiny
    assert backend_for(path) == "tflite" and backend_for("m.ONNX") == "onnx"
    assert isinstance(open_session(path, backend="auto"), LiteRTSession)
    with pytest.raises(BackendUnavailableError, match="extensions"):
        backend_for("model.pb")
    with pytest.raises(BackendUnavailableError, match="TFLite model"):
        open_session(path, backend="onnx")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        open_session(path, backend="coreml")
    onnx_file = tmp_path / "m.onnx"
    _tiny_onnx(onnx_file)
    assert isinstance(open_session(onnx_file, "auto", io_names={"inputs": {"x": "x"}}), OrtSession)
    with pytest.raises(BackendUnavailableError, match="cannot rename"):
        open_session(onnx_file, "onnx", io_names={"inputs": {"image": "x"}})


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run_python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def test_device_modules_import_no_torch(tiny: tuple) -> None:
    path, _ = tiny
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
import runtime.litert, runtime.predictor, runtime.session
from runtime.litert import LiteRTSession
session = LiteRTSession({str(path)!r}, threads=1)
feeds = {{n: np.zeros(session.input_info(n).shape, np.float32) for n in session.input_names}}
feeds["input"] = np.zeros((3, 1, 6, 6), np.float32)
assert session.run(feeds)["logits"].shape == (3, 3)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""
    proc = _run_python(script)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_missing_litert_is_a_clear_error(tiny: tuple) -> None:
    path, _ = tiny
    script = f"""
import sys
sys.modules["ai_edge_litert"] = None
sys.modules["ai_edge_litert.interpreter"] = None
from runtime.errors import BackendUnavailableError
from runtime.session import open_session
try:
    open_session({str(path)!r}, backend="tflite")
except BackendUnavailableError as exc:
    print("refused:", exc)
"""
    proc = _run_python(script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "edgeloop[litert]" in proc.stdout
