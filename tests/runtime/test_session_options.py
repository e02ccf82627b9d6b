"""The onnxruntime session options the runtime chooses: no memory pattern, everything else at its default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.session import MEM_PATTERN, OrtSession, open_session

ROOT = Path(__file__).resolve().parents[2]


def _conv_net(path: Path, channels: int = 16) -> None:
    """Conv → BatchNormalization → Relu → global average pool → flatten, dynamic batch, 3×32×32 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (channels, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "shift"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", channels])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("session") / "net.onnx"
    _conv_net(path)
    return path


def test_sessions_run_without_the_memory_pattern(net: Path) -> None:
    """The memory pattern is off in every onnxruntime session the runtime opens (with or without threads and
    disabled optimizers); the arena, memory reuse and full graph optimisation stay on."""
    import onnxruntime as ort

    assert MEM_PATTERN is False
    for session in (OrtSession(net), open_session(net, "auto", threads=1),
                    open_session(net, "onnx", disabled_optimizers=["QDQPropagationTransformer"])):
        assert isinstance(session, OrtSession)
        opts = session.options
        assert opts.enable_mem_pattern is False
        assert opts.enable_cpu_mem_arena is True and opts.enable_mem_reuse is True
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert open_session(net, threads=1).options.intra_op_num_threads == 1


def test_outputs_equal_a_default_session_across_batch_sizes(net: Path) -> None:
    """Turning the pattern off changes where intermediates live, not what is computed: the same outputs as an
    onnxruntime session with default options, batch size changing from run to run."""
    import onnxruntime as ort

    reference = ort.InferenceSession(str(net), providers=["CPUExecutionProvider"])
    session = OrtSession(net, threads=1)
    rng = np.random.default_rng(1)
    for batch in (8, 64, 1, 8, 64):
        x = rng.uniform(0, 1, (batch, 3, 32, 32)).astype(np.float32)
        got = session.run({"x": x})["y"]
        assert got.shape == (batch, 16)
        np.testing.assert_array_equal(got, reference.run(None, {"x": x})[0])


PEAK_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort
from runtime.session import OrtSession
path, which = sys.argv[1], sys.argv[2]
if which == "default":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    run = lambda x: sess.run(None, {"x": x})
else:
    sess = OrtSession(path, threads=1)
    run = lambda x: sess.run({"x": x})
rng = np.random.default_rng(0)
for batch in (2, 64, 64):  # a self-test batch, then the stream's batches
    run(rng.uniform(0, 1, (batch, 3, 32, 32)).astype(np.float32))
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"vmhwm_kb": hwm}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) for peak memory")
def test_peak_memory_is_lower_than_with_the_pattern(tmp_path: Path) -> None:
    """In separate processes, a session of this module peaks lower than a default onnxruntime session on a graph
    whose intermediates dominate (64 channels at 32×32, batch 64: 16 MiB per activation)."""
    path = tmp_path / "wide.onnx"
    _conv_net(path, channels=64)

    def peak(which: str) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), which], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, check=False, env={"PYTHONPATH": str(ROOT),
                                                                       "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        return int(json.loads(out.stdout)["vmhwm_kb"])

    default, runtime = peak("default"), peak("runtime")
    assert runtime < default - 8 * 1024, (runtime, default)
