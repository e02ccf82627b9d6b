"""Client channels to the edgeloop server: plaintext or TLS (optionally mutual), with a bearer token attached
to every call by a client interceptor. Used by the device transport and the operator's admin client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc


@dataclass(frozen=True)
class TlsOptions:
    """How a client speaks TLS to the server.

    ``root_ca``: PEM of the CA that signed the server's certificate (None: the system's roots).
    ``client_cert`` / ``client_key``: PEM of this client's certificate and key, for mutual TLS.
    ``server_name``: the name to check the server's certificate against when it differs from the target host.
    Paths are read when the channel is opened.
    """

    root_ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        """Coerce paths; a client certificate needs its key and the other way round."""
        for name in ("root_ca", "client_cert", "client_key"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be given together")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials read from the PEM files."""
        def read(p: Path | None) -> bytes | None:
            return None if p is None else p.read_bytes()

        return grpc.ssl_channel_credentials(read(self.root_ca), read(self.client_key), read(self.client_cert))


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call while ``token()`` returns a token."""

    def __init__(self, token: Callable[[], str | None]) -> None:
        """``token`` is asked on every call, so a token obtained later (enrollment) is used from then on."""
        self._token = token

    def _details(self, details: Any) -> Any:
        token = self._token()
        if not token:
            return details
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Attach the token to a unary call."""
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Attach the token to a server-streaming call."""
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        """Attach the token to a client-streaming call."""
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        """Attach the token to a bidirectional call."""
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(target: str, options: Sequence[tuple[str, Any]] = (), tls: TlsOptions | None = None,
                 token: Callable[[], str | None] | None = None) -> grpc.Channel:
    """A channel to ``target``: TLS when ``tls`` is given, with ``token()`` sent as a bearer token on each call."""
    opts = list(options)
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    channel = (grpc.secure_channel(target, tls.credentials(), options=opts) if tls is not None
               else grpc.insecure_channel(target, options=opts))
    if token is None:
        return channel
    return grpc.intercept_channel(channel, BearerTokenInterceptor(token))
