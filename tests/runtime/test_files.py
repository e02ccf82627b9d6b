"""``runtime.files.write_atomically``: the crash-safe write the device (token, pinned key) and the server's blob
store share."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from runtime.files import write_atomically


def test_writes_a_new_file_with_mode_0600_and_replaces_an_old_one(tmp_path: Path) -> None:
    target = tmp_path / "device.token"
    write_atomically(target, b"first")
    assert target.read_bytes() == b"first" and stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomically(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.token"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "update_key.pub"
    write_atomically(target, b"pinned")
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"pinned"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["update_key.pub"]

