"""The device side runs with torch made unimportable: load a verified bundle, adapt, detect, select, queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from device_agents.agent import Agent, AgentConfig
from device_agents.drift import PageHinkley
from device_agents.outbox import SqliteOutbox
from device_agents.selection import EntropyBandSelector
from device_agents.tta import create_tta_method
from runtime import AdaptableModel, load_bundle

bundle = load_bundle(sys.argv[1])
model = AdaptableModel(bundle)
x = np.random.default_rng(0).random((32, *bundle.manifest.input.shape[1:]), dtype=np.float32)
agent = Agent(model, create_tta_method("alpha_bn"), PageHinkley(), EntropyBandSelector(),
              SqliteOutbox(sys.argv[2], max_bytes=1 << 20), None, AgentConfig("dev", bundle.bundle_id))
result = agent.process_batch(x)
assert result.pred.shape == (32,) and np.all(np.isfinite(result.entropy))
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok", agent.stats.samples_seen)
"""


def test_device_side_runs_without_torch(digits_bundle: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(digits_bundle), str(tmp_path / "outbox.db")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok 32"


def test_inspect_runs_without_torch(digits_bundle: Path) -> None:
    """``edgeloop inspect`` is a device-side tool: it verifies every model of a bundle without torch."""
    script = ("import sys; sys.modules['torch'] = None\n"
              "from edgeloop.cli import main\n"
              "code = main(['inspect', sys.argv[1]])\n"
              "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(digits_bundle)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "verified: every check passed" in proc.stdout


def test_device_install_requirements_exclude_torch() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    device = project["dependencies"] + project["optional-dependencies"]["litert"]
    assert not [d for d in device if d.lower().startswith("torch")], device
    assert any(d.startswith("torch==2.13.0") for d in project["optional-dependencies"]["export"])


def test_admin_runs_without_torch() -> None:
    """``edgeloop admin`` is an operator tool for any machine: it imports no torch (here against a closed port,
    which it names)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ("import sys; sys.modules['torch'] = None\n"
              "from edgeloop.cli import main\n"
              "code = main(['admin', 'devices', '--server', sys.argv[1], '--timeout', '10'])\n"
              "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script, f"127.0.0.1:{port}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot reach the server at 127.0.0.1:{port}" in proc.stderr
