"""``edgeloop agent`` and ``edgeloop simulate``: bad input ends with a one-line error naming it, exit code 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edgeloop.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agent_against_an_unreachable_server_names_the_failed_call(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["agent", "--server", f"127.0.0.1:{_closed_port()}", "--device-id", "cam-1", "--work-dir",
                 str(tmp_path / "w"), "--samples-per-domain", "1", "--domains", "clean:0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("edgeloop agent: error: Register failed with UNAVAILABLE") and "Traceback" not in err


def test_agent_refuses_a_bad_batch_size_before_it_registers(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # the server's port is closed: a check that came after registering would fail there instead
    code = main(["agent", "--server", f"127.0.0.1:{_closed_port()}", "--device-id", "cam-1", "--work-dir",
                 str(tmp_path / "w"), "--samples-per-domain", "1", "--domains", "clean:0", "--batch-size", "0"])
    assert code == 2 and "batch_size must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--aggregator-option", "beta=0.3"], "bad options for aggregator 'fedavg'"),
    (["--aggregator", "trimmed_mean", "--aggregator-option", "beta=0.9"], "beta 0.9 must be in"),
])
def test_simulate_refuses_bad_aggregator_options_before_any_work(tmp_path: Path, args: list[str], message: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # --cache-dir points at an empty directory: a check that came after the model would start training here
    code = main(["simulate", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--quiet",
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and "--aggregator-option" in err and message in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
