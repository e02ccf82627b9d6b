"""A config file's secret file that cannot be read (not UTF-8 text, missing, a directory) is a ValueError naming
the config key and the file (``edgeloop serve`` prints it): a non-UTF-8 file used to give only "'utf-8' codec
can't decode byte 0xff in position 0", naming neither."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import load_config


@pytest.mark.parametrize(("make", "reason"), [
    (lambda p: p.write_bytes(b"\xff\xfe" + b"s" * 20), "not UTF-8 text"),
    (lambda p: None, "No such file"),
    (lambda p: p.mkdir(), "Is a directory"),
])
def test_an_unreadable_secret_file_is_an_error_naming_the_key_and_the_file(tmp_path: Path, make: object,
                                                                         reason: str) -> None:
    secret = tmp_path / "enroll.secret"
    make(secret)  # type: ignore[operator]
    config = tmp_path / "server.toml"
    config.write_text('data_dir = "d"\nenrollment_secret_file = "enroll.secret"\n'
                      'admin_token = "a-long-admin-token-1"\n')
    with pytest.raises(ValueError, match="enrollment_secret_file") as info:
        load_config(config)
    assert str(secret) in str(info.value) and reason in str(info.value)
