"""The TOML config file, ``edgeloop serve --config`` flag merging, and a secured server run from the CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from device_agents.channel import TlsOptions
from device_agents.client import DeviceClient
from edgeloop.cli import build_parser, serve_config
from server.config import load_config
from tests.server.certs import TestCA
from tests.server.server_testkit import make_bundle_files

ROOT = Path(__file__).resolve().parents[2]
ENROLL = "enroll-secret-0123456789"
ADMIN = "admin-token-0123456789abcdef"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_resolves_paths_and_reads_secret_files(tmp_path: Path) -> None:
    (tmp_path / "enroll.secret").write_text(ENROLL + "\n")
    (tmp_path / "admin.token").write_text(ADMIN)
    cfg = load_config(_write(tmp_path / "server.toml", """
data_dir = "state"
host = "0.0.0.0"
port = 6000
tls_cert = "s.crt"
tls_key = "/abs/s.key"
enrollment_secret_file = "enroll.secret"
admin_token_file = "admin.token"
rate_limit_per_second = 5
metrics_port = 9102
trusted_publisher_keys = ["ops.pub"]
"""))
    assert cfg.data_dir == tmp_path / "state" and cfg.port == 6000 and cfg.host == "0.0.0.0"
    assert cfg.tls_cert == tmp_path / "s.crt" and cfg.tls_key == Path("/abs/s.key")
    assert cfg.enrollment_secret == ENROLL and cfg.admin_token == ADMIN
    assert cfg.rate_limit_per_second == 5.0 and cfg.rate_limit_burst == 10 and cfg.metrics_port == 9102
    assert cfg.trusted_publisher_keys == (tmp_path / "ops.pub",)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('data_dir = "d"\nprot = 5\n', r"unknown config key\(s\) \['prot'\]"),
        ('data_dir = "d"\nport = "5"\n', "'port' must be int"),
        ('data_dir = "d"\ninsecure = 1\n', "'insecure' must be bool"),
        ('data_dir = "d"\ntrusted_publisher_keys = "k.pub"\n', "array of strings"),
        ('data_dir = "d"\nport = 70000\n', "port 70000"),
        ('data_dir = "d"\nadmin_token = "x"\nadmin_token_file = "f"\n', "both given"),
        ("data_dir = \n", "not valid TOML"),
        ('data_dir = "d"\naggregator = "mean"\n', "unknown aggregator 'mean'"),
        ('data_dir = "d"\naggregator = "krum"\naggregator_options = { byzantin = 1 }\n', "bad options"),
        ('data_dir = "d"\naggregator_options = 3\n', "must be a table"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        load_config(_write(tmp_path / "bad.toml", text))


def test_aggregator_is_configured_from_a_table(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "agg.toml", 'data_dir = "d"\naggregator = "trimmed_mean"\n'
                             "aggregator_options = { beta = 0.2 }\n"))
    assert cfg.aggregator == "trimmed_mean" and cfg.aggregator_options == {"beta": 0.2}
    assert type(cfg.create_aggregator()).__name__ == "TrimmedMean"


def test_cli_flags_override_the_file_and_the_file_overrides_cli_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.toml", 'data_dir = "d"\nport = 7000\ndistill_steps = 7\n')
    cfg = serve_config(build_parser().parse_args(["serve", "--config", str(path), "--port", "0"]))
    assert (cfg.port, cfg.distill_steps, cfg.host, cfg.data_dir) == (0, 7, "127.0.0.1", tmp_path / "d")
    cfg = serve_config(build_parser().parse_args(["serve", "--data-dir", str(tmp_path)]))
    assert (cfg.port, cfg.distill_steps) == (50051, 100)  # the CLI's historic defaults
    cfg = serve_config(build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--distill-steps", "20000",
                                                  "--max-distill-steps", "50000"]))
    assert (cfg.distill_steps, cfg.max_distill_steps) == (20000, 50000)
    with pytest.raises(ValueError, match="data directory"):
        serve_config(build_parser().parse_args(["serve", "--port", "0"]))
    with pytest.raises(ValueError, match="insecure"):
        serve_config(build_parser().parse_args(["serve", "--data-dir", "d", "--host", "0.0.0.0"]))


def test_edgeloop_serve_with_a_config_file_runs_tls_and_tokens_then_stops_on_sigterm(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("localhost", server=True)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name, data in make_bundle_files().items():
        (bundle / name).write_bytes(data)
    (tmp_path / "enroll.secret").write_text(ENROLL)
    (tmp_path / "admin.token").write_text(ADMIN)
    config = _write(tmp_path / "server.toml", f"""
data_dir = "data"
port = 0
max_workers = 4
grace_seconds = 1
tls_cert = "{server.cert}"
tls_key = "{server.key}"
enrollment_secret_file = "enroll.secret"
admin_token_file = "admin.token"
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop.cli", "serve", "--config", str(config), "--bundle",
                             str(bundle)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        lines, port = [], None
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if found := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))
                break
        assert port, "".join(lines)
        bundle_id = next(re.search(r"published bundle (\w+)", x).group(1) for x in lines if "published" in x)  # type: ignore[union-attr]
        with DeviceClient(f"127.0.0.1:{port}", "cam-1", timeout=5, tls=TlsOptions(root_ca=ca.pem)) as client:
            client.enroll(ENROLL)
            assert client.register().bundle_id == bundle_id
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "data" / "registry.sqlite3").is_file() and (tmp_path / "data" / "auth.sqlite3").is_file()
