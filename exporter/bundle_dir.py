"""Where a bundle is written: the output directory check and the atomic install (torch-free, shared by the
torch exporter in :mod:`exporter.bundle` and the foreign-model wrapper in :mod:`exporter.foreign`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from runtime.manifest import MANIFEST_NAME
from runtime.signing import SIGNATURE_NAME


def out_path(out_dir: Path | str) -> Path:
    """``out_dir`` made absolute and normalised (``.`` and ``..`` resolved, symlinks kept): the bundle is built
    beside it and renamed into place, which ``.`` or ``x/..`` cannot be."""
    return Path(os.path.abspath(out_dir))


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """:func:`check_out_dir`, then create the parent directory."""
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``overwrite`` and it is a bundle holding nothing but its
    own files (what would be lost otherwise is named)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite on the "
                                  "command line) to replace it")
        _check_replaceable(out_dir)


def _check_replaceable(out_dir: Path) -> None:
    """Overwriting deletes ``out_dir``: only a bundle (a ``manifest.json``) whose entries are all its own files."""
    manifest = out_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise FileExistsError(f"{out_dir} is not empty and is not a bundle (no {MANIFEST_NAME}); overwriting "
                              "replaces only a bundle directory, so nothing in it was touched: choose another "
                              "output directory or empty this one")
    try:
        files = json.loads(manifest.read_bytes()).get("files", {})
        own = {MANIFEST_NAME, SIGNATURE_NAME, *(f for f in files if isinstance(f, str))}
    except (ValueError, AttributeError, OSError):  # a damaged manifest: replacing the bundle is the point
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in own)
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out_dir} holds {shown}, which its manifest does not list; overwriting would delete "
                              "them, so nothing was touched: move them out of the bundle directory first")


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
