"""Server interceptors: the guard in front of every edgeloop RPC (malformed bytes, credentials, rate limits).

The guard wraps the handler of each ``DeviceService`` / ``AdminService`` method (health checking and
reflection pass untouched):

* a request that does not parse is INVALID_ARGUMENT (gRPC itself would say INTERNAL);
* with an :class:`~server.auth.Authenticator`, every device call but ``Enroll`` needs a device token in the
  ``authorization: Bearer …`` metadata (UNAUTHENTICATED), and every request message must name that token's
  device (PERMISSION_DENIED); admin calls need the admin token;
* with a :class:`~server.ratelimit.RateLimiter`, each device's calls (``Enroll``: each peer address's) draw
  from a token bucket (RESOURCE_EXHAUSTED).

Every check runs before the servicer sees the request (for streams: before it sees each message), so a
rejected call stores nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, NoReturn

import grpc

from server.auth import Authenticator
from server.errors import PermissionDeniedError, ServerError
from server.ratelimit import RateLimiter

Behavior = Callable[[Any, grpc.ServicerContext], Any]
BehaviorWrapper = Callable[[Behavior, bool, bool], Behavior]
ENROLL_METHOD = "Enroll"


class Malformed(NamedTuple):
    """Stands in for a request whose bytes did not parse (the guard rejects it)."""

    error: str


def split_method(full: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → ``("pkg.Service", "Method")``."""
    _, service, method = [*full.split("/"), "", ""][:3]
    return service, method


def rewrap(handler: grpc.RpcMethodHandler, wrap: BehaviorWrapper,
           request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """The same kind of handler with its behavior passed through ``wrap(behavior, req_stream, resp_stream)``."""
    deser = request_deserializer or handler.request_deserializer
    ser = handler.response_serializer
    req, resp = handler.request_streaming, handler.response_streaming
    if req and resp:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True, True), deser, ser)
    if req:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, True, False), deser, ser)
    if resp:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, False, True), deser, ser)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False, False), deser, ser)


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """A deserializer that returns :class:`Malformed` instead of raising."""

    def parse(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError and friends; turned into INVALID_ARGUMENT
            return Malformed(f"{type(exc).__name__}: {exc}")

    return parse


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _peer_host(context: grpc.ServicerContext) -> str:
    peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:…"
    kind, _, rest = peer.partition(":")
    return f"peer:{kind}:{rest.rsplit(':', 1)[0] if kind in ('ipv4', 'ipv6') else rest}"


def _abort(context: grpc.ServicerContext, exc: ServerError, rpc: str) -> NoReturn:
    from server.servicers import abort_for  # the one table of domain error → status code

    abort_for(context, exc, rpc)


class GuardInterceptor(grpc.ServerInterceptor):
    """Rejects malformed, unauthenticated, foreign-device and over-limit calls before the servicers run."""

    def __init__(self, device_service: str, admin_service: str, authenticator: Authenticator | None = None,
                 limiter: RateLimiter | None = None) -> None:
        """Guard the methods of the two named services (full names, e.g. ``edgeloop.v1.DeviceService``)."""
        self.device_service = device_service
        self.admin_service = admin_service
        self.authenticator = authenticator
        self.limiter = limiter

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """Wrap the handler of a device or admin method; leave every other service alone."""
        handler = continuation(handler_call_details)
        service, method = split_method(handler_call_details.method)
        if handler is None or service not in (self.device_service, self.admin_service):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        is_admin = service == self.admin_service

        def wrap(behavior: Behavior, request_streaming: bool, response_streaming: bool) -> Behavior:
            if request_streaming:
                def guarded_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                    identity = self._admit(method, is_admin, token, context)
                    return behavior(self._checked(requests, method, identity, context), context)
                return guarded_stream

            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                identity = self._admit(method, is_admin, token, context)
                self._check_message(request, method, identity, context)
                if identity is None and not is_admin:
                    key = _peer_host(context) if method == ENROLL_METHOD else getattr(request, "device_id", "")
                    self._limit(key, method, context)
                return behavior(request, context)
            return guarded

        return rewrap(handler, wrap, tolerant(handler.request_deserializer))

    def _admit(self, method: str, is_admin: bool, token: str | None, context: grpc.ServicerContext) -> str | None:
        """Check the call's credential; return the authenticated device id (None: admin or no auth)."""
        auth = self.authenticator
        if auth is None or method == ENROLL_METHOD:
            return None
        try:
            if is_admin:
                auth.require_admin(token)
                return None
            device = auth.require_device(token)
        except ServerError as exc:
            _abort(context, exc, method)
        self._limit(device, method, context)
        return device

    def _limit(self, key: str, method: str, context: grpc.ServicerContext) -> None:
        if self.limiter is None:
            return
        try:
            self.limiter.acquire(key)
        except ServerError as exc:
            _abort(context, exc, method)

    def _check_message(self, msg: Any, method: str, identity: str | None, context: grpc.ServicerContext) -> None:
        if isinstance(msg, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: malformed request ({msg.error})")
        if identity is not None and getattr(msg, "device_id", identity) != identity:
            _abort(context, PermissionDeniedError(
                f"the token of device {identity!r} cannot act for device {msg.device_id[:140]!r}"), method)

    def _checked(self, requests: Iterator[Any], method: str, identity: str | None,
                 context: grpc.ServicerContext) -> Iterator[Any]:
        first = True
        for msg in requests:
            self._check_message(msg, method, identity, context)
            if first and identity is None and hasattr(msg, "device_id"):
                self._limit(msg.device_id, method, context)
            first = False
            yield msg
