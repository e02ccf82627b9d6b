"""The server's configuration: :class:`ServerConfig` (validated at construction) and the TOML config file.

A config file holds ``ServerConfig`` field names as top-level keys (see README, "Running the server")::

    data_dir = "/var/lib/edgeloop"
    host = "0.0.0.0"
    port = 50051
    tls_cert = "server.crt"               # relative paths are relative to the config file
    tls_key = "server.key"
    enrollment_secret_file = "enroll.secret"
    admin_token_file = "admin.token"
    metrics_port = 9102

Secrets can be given inline (``enrollment_secret``, ``admin_token``) or, better, as ``*_file`` keys naming a
file whose stripped content is the secret. An unknown key or a value of the wrong type is an error naming it.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MESSAGE_OVERHEAD = 4096  # room for a chunk's other fields within max_message_bytes
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1  # gRPC's message length options are C ints
MIN_SECRET_LENGTH = 16
_SECRET_FILE_KEYS = {"enrollment_secret_file": "enrollment_secret", "admin_token_file": "admin_token"}
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server is configured with; validated at construction.

    Each open ``WatchUpdates`` stream holds one of the ``max_workers`` RPC threads, so at most
    ``max_watchers`` (0: three quarters of ``max_workers``) may be open; more are refused with
    RESOURCE_EXHAUSTED. Sizes are bytes; ``device`` is where distillation runs ("auto": CUDA if present).

    Security: ``tls_cert``/``tls_key`` turn on TLS, ``tls_client_ca`` additionally requires client
    certificates signed by that CA (mutual TLS). ``enrollment_secret`` turns on device tokens (every device
    call but ``Enroll`` needs one) and must come with ``admin_token`` (the admin service's credential).
    A host other than loopback is refused unless the server has TLS and tokens, or ``insecure`` is set.
    ``rate_limit_per_second`` > 0 gives each device a token bucket of ``rate_limit_burst`` calls (0: twice the
    rate, at least 1). ``metrics_port`` (None: off, 0: any free port) serves Prometheus metrics over HTTP on
    ``metrics_host`` (None: ``host``); a device counts as online when seen within ``online_window_seconds``.

    Updates: ``update_signing_key`` is the PEM Ed25519 key that signs parameter updates (``edgeloop keygen``;
    None: ``data_dir/update_signing.pem``, generated on first start). ``update_encoding`` is ``"f32"``,
    ``"int8_delta"`` or ``"int8_topk_delta"`` (keeping ``update_topk_fraction`` of each tensor's entries).

    Federated rounds: ``aggregator`` names the rule that combines device submissions (``server.aggregation``:
    fedavg, fedau, fedbuff, trimmed_mean, median, krum, dp_fedavg) and ``aggregator_options`` its settings (a
    TOML table, e.g. ``{ byzantine = 2 }`` for krum); both are checked at start-up.

    Round limits: a distillation round runs ``distill_steps`` optimizer steps (default 100) over at most
    ``round_max_samples`` unused samples (default 4096). ``StartRound`` may ask for other values up to
    ``max_distill_steps`` steps (default 10 000, a hundred times the default) and ``round_max_samples`` samples;
    a request beyond either limit is refused with INVALID_ARGUMENT naming the field, its value and the limit, and
    queues nothing (rounds run one at a time, so one oversized round would hold up every later one).
    ``distill_steps`` must not exceed ``max_distill_steps``.
    """

    data_dir: Path = Path("edgeloop_data")
    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 32
    max_watchers: int = 0
    max_message_bytes: int = 16 << 20
    chunk_size: int = 64 << 10
    max_upload_bytes: int = 64 << 20
    max_samples_per_upload: int = 4096
    max_bundle_bytes: int = 512 << 20
    distill_steps: int = 100  # optimizer steps of a distillation round (StartRound may ask for others)
    max_distill_steps: int = 10_000  # the most steps StartRound may ask for; more is INVALID_ARGUMENT
    round_max_samples: int = 4096  # the most samples a distillation round uses (StartRound may ask for fewer)
    teacher_ckpt: Path | None = None
    student_ckpt: Path | None = None
    distill_alpha: float = 0.5
    device: str = "auto"
    grace_seconds: float = 5.0
    trusted_publisher_keys: tuple[Path, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    enrollment_secret: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    insecure: bool = False
    rate_limit_per_second: float = 0.0
    rate_limit_burst: int = 0
    reflection: bool = True
    metrics_port: int | None = None
    metrics_host: str | None = None
    online_window_seconds: float = 300.0
    update_signing_key: Path | None = None
    update_encoding: str = "int8_delta"
    update_topk_fraction: float = 0.25
    aggregator: str = "fedavg"
    aggregator_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Coerce paths and reject out-of-range or unsafe values, naming the field."""
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "trusted_publisher_keys", tuple(Path(p) for p in self.trusted_publisher_keys))
        for name in ("teacher_ckpt", "student_ckpt", "tls_cert", "tls_key", "tls_client_ca", "update_signing_key"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        self._check_finite()
        if self.max_watchers == 0:  # default: leave a quarter of the RPC threads for non-watch calls
            object.__setattr__(self, "max_watchers", max(1, self.max_workers * 3 // 4))
        if self.rate_limit_burst == 0 and self.rate_limit_per_second > 0:
            object.__setattr__(self, "rate_limit_burst", max(1, round(2 * self.rate_limit_per_second)))
        self._check_sizes()
        self._check_distillation()
        self._check_security()
        self._check_updates()
        self.create_aggregator()  # unknown names and bad options fail here, not at the first round

    def _check_finite(self) -> None:
        """NaN or infinity in a float setting is refused, naming it (NaN passes every range check below, and
        an infinite rate would overflow the burst it implies)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")

    def _check_sizes(self) -> None:
        if not 0 < self.max_watchers < self.max_workers:
            raise ValueError(f"max_watchers {self.max_watchers} must be in 1..max_workers-1 ({self.max_workers - 1})"
                             " so that watchers cannot take every RPC thread")
        if not self.host:
            raise ValueError("host must not be empty")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} {value} is outside 0..65535")
        for name in ("max_workers", "max_message_bytes", "chunk_size", "max_upload_bytes",
                     "max_samples_per_upload", "max_bundle_bytes", "distill_steps", "max_distill_steps",
                     "round_max_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_message_bytes > MAX_GRPC_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes {self.max_message_bytes} exceeds gRPC's limit of "
                             f"{MAX_GRPC_MESSAGE_BYTES} bytes")
        if self.chunk_size > self.max_message_bytes - MESSAGE_OVERHEAD:
            raise ValueError(f"chunk_size {self.chunk_size} does not fit in max_message_bytes "
                             f"{self.max_message_bytes} (minus {MESSAGE_OVERHEAD} bytes overhead)")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.online_window_seconds <= 0:
            raise ValueError(f"online_window_seconds must be positive, got {self.online_window_seconds}")

    def _check_distillation(self) -> None:
        if self.distill_steps > self.max_distill_steps:
            raise ValueError(f"distill_steps {self.distill_steps} exceeds max_distill_steps {self.max_distill_steps}: "
                             "raise max_distill_steps too, or lower distill_steps")
        if (self.teacher_ckpt is None) != (self.student_ckpt is None):
            raise ValueError("teacher_ckpt and student_ckpt must be given together")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha {self.distill_alpha} is outside [0, 1]")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"device {self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def _check_security(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if (self.enrollment_secret is None) != (self.admin_token is None):
            raise ValueError("enrollment_secret and admin_token must be given together: device tokens without "
                             "an admin credential would leave the admin service open")
        for name in ("enrollment_secret", "admin_token"):
            value = getattr(self, name)
            if value is not None and (len(value) < MIN_SECRET_LENGTH or not value.isprintable()):
                raise ValueError(f"{name} must be at least {MIN_SECRET_LENGTH} printable characters")
        if self.enrollment_secret is not None and self.enrollment_secret == self.admin_token:
            raise ValueError("enrollment_secret and admin_token must differ")
        if self.rate_limit_per_second < 0 or self.rate_limit_burst < 0:
            raise ValueError(f"rate_limit_per_second {self.rate_limit_per_second} and rate_limit_burst "
                             f"{self.rate_limit_burst} must be >= 0")
        if not is_loopback(self.host) and not self.insecure and not (self.tls and self.auth):
            raise ValueError(f"host {self.host!r} is reachable from other machines but the server has "
                             f"{'no TLS' if not self.tls else 'no device tokens'}: configure tls_cert/tls_key "
                             "and enrollment_secret/admin_token, or set insecure = true for a trusted network")

    def _check_updates(self) -> None:
        from runtime.update_codec import ENCODINGS

        if self.update_encoding not in ENCODINGS:
            raise ValueError(f"update_encoding {self.update_encoding!r} is not one of {ENCODINGS}")
        if not 0.0 < self.update_topk_fraction <= 1.0:
            raise ValueError(f"update_topk_fraction {self.update_topk_fraction} is outside (0, 1]")

    def create_aggregator(self) -> Any:
        """A fresh instance of the configured aggregation rule (``server.aggregation``)."""
        from server.aggregation import create_aggregator

        return create_aggregator(self.aggregator, **dict(self.aggregator_options))

    @property
    def tls(self) -> bool:
        """Whether the server speaks TLS."""
        return self.tls_cert is not None

    @property
    def auth(self) -> bool:
        """Whether device tokens and the admin credential are required."""
        return self.enrollment_secret is not None


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ServerConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check one TOML value against the field's annotation; paths come as strings, tuples as arrays."""
    args = set(typing.get_args(hint))
    if type(None) in args and value is None:
        return None
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, bool | int | float | str) for v in value.values()):
            raise ValueError(f"config key {name!r} must be a table of numbers, strings or booleans, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"config key {name!r} must be an array of strings, got {value!r}")
        return tuple(value)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool),
          str: isinstance(value, str), Path: isinstance(value, str)}.get(base)
    if ok is None:
        raise ValueError(f"config key {name!r} has an unsupported type {base}")
    if not ok:
        raise ValueError(f"config key {name!r} must be {getattr(base, '__name__', base)}, got {value!r}")
    return float(value) if base is float else value


def config_values(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Validate a parsed config table into ``ServerConfig`` keyword arguments (paths resolved from ``base_dir``).

    Raises ``ValueError`` naming every unknown key, or the first key whose value has the wrong type.
    """
    hints = _field_types()
    unknown = sorted(set(raw) - set(hints) - set(_SECRET_FILE_KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted([*hints, *_SECRET_FILE_KEYS])}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECRET_FILE_KEYS:
            target = _SECRET_FILE_KEYS[key]
            if target in raw:
                raise ValueError(f"config keys {key!r} and {target!r} are both given; use one")
            path = base_dir / _coerce(key, value, str)
            try:
                out[target] = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
                raise ValueError(f"config key {key!r}: cannot read the {target} from {path}: {reason}") from exc
            continue
        out[key] = _coerce(key, value, hints[key])
    path_keys = {f.name for f in fields(ServerConfig) if "Path" in str(hints[f.name])}
    for key in path_keys & set(out):
        if isinstance(out[key], tuple):
            out[key] = tuple(base_dir / p for p in out[key])
        elif out[key] is not None:
            out[key] = base_dir / out[key]
    return out


def load_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML table of ``path`` (``ValueError`` naming the file when it is not valid TOML)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc


def load_config(path: Path, **overrides: Any) -> ServerConfig:
    """Read a TOML config file into a :class:`ServerConfig`; ``overrides`` (e.g. from the CLI) win."""
    path = Path(path)
    values = config_values(load_toml(path), path.parent)
    return ServerConfig(**{**values, **overrides})
