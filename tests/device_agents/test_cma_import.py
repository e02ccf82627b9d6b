"""FOA's CMA-ES import stays as small on a development machine as on a device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from device_agents.tta.cma_search import import_cma
cma = import_cma()
heavy = sorted(m for m in ("scipy", "matplotlib", "PIL") if m in sys.modules)
es = cma.CMAEvolutionStrategy([0.0] * 3, 0.5, {"verbose": -9, "seed": 1, "popsize": 4})
assert len(es.ask()) == 4
assert import_cma() is cma
print(",".join(heavy) or "none")
"""


def test_import_cma_leaves_plotting_and_statistics_out() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


def test_hidden_modules_stay_importable_afterwards() -> None:
    """Hiding is only for the duration of cma's import: installed packages import normally afterwards, and
    one the application had already imported is the same module object after."""
    script = """
import importlib.util, sys, json
from device_agents.tta.cma_search import import_cma
before = importlib.import_module("PIL") if importlib.util.find_spec("PIL") else None
import_cma()
assert before is None or sys.modules["PIL"] is before
for name in ("scipy", "PIL"):
    if importlib.util.find_spec(name) is not None:
        module = importlib.import_module(name)
        assert sys.modules[name] is module and module is not None
print("ok")
"""
    script = script.replace("import importlib.util, sys, json", "import importlib, importlib.util, sys, json")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
