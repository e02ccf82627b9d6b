"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def bundle_copy(digits_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the shared bundle that a test may damage."""
    return Path(shutil.copytree(digits_bundle, tmp_path / "bundle"))
