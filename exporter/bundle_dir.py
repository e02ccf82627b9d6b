"""Where a bundle is written: the output directory check and the atomic install (torch-free, shared by the
torch exporter in :mod:`exporter.bundle` and the foreign-model wrapper in :mod:`exporter.foreign`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``overwrite``; create the parent directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite on the "
                              "command line) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished bundle ``tmp`` to ``out_dir``, replacing what is there."""
    os.chmod(tmp, 0o755)
    prepare_out_dir(out_dir, overwrite)  # again: something may have appeared while the bundle was built
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def golden_file(model: str) -> str:
    """The golden block's file name of model entry ``model`` (exported and foreign bundles alike)."""
    return f"golden_{model}.bin"
