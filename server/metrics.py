"""Prometheus metrics (``prometheus-client``, the ``server`` extra) served over HTTP.

Counted as they happen: RPCs by service, method and status code, with latencies; uploaded samples (stored /
duplicate) and their bytes; rounds (distillation jobs and federated averages) by kind and state, with their
durations. Read at scrape time from storage: registered and online devices (seen within a window) and the
newest update version. Each server owns its own registry, so several servers can run in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from proto.edgeloop.v1 import common_pb2, device_pb2
from server.interceptors import Behavior, rewrap, split_method
from server.records import RoundRecord
from server.state import ServerState

logger = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # the base (device) install has no prometheus-client
        raise RuntimeError("metrics_port is set but prometheus-client is not installed: "
                           "pip install 'edgeloop[server]', or leave metrics_port unset") from exc
    return prometheus_client


class _StateCollector:
    """Gauges computed from storage when Prometheus scrapes."""

    def __init__(self, state: ServerState, online_window_s: float) -> None:
        self.state = state
        self.window_ms = int(online_window_s * 1000)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        devices = self.state.storage.list_devices()
        cutoff = self.state.clock() - self.window_ms
        yield GaugeMetricFamily("edgeloop_devices_registered", "Devices that ever registered.", len(devices))
        yield GaugeMetricFamily("edgeloop_devices_online", f"Devices seen within the last {self.window_ms} ms.",
                                sum(1 for d in devices if d.last_seen_ms >= cutoff))
        yield GaugeMetricFamily("edgeloop_update_version", "Newest published parameter update version.",
                                self.state.storage.latest_version())


class ServerMetrics:
    """The server's Prometheus registry, its RPC interceptor and the HTTP endpoint."""

    def __init__(self, state: ServerState, online_window_s: float = 300.0) -> None:
        """Create the metrics in a fresh registry over ``state``."""
        prom = _prometheus()
        self.registry = prom.CollectorRegistry()
        reg = self.registry
        self.rpcs = prom.Counter("edgeloop_rpc_requests", "RPCs by service, method and status code.",
                                 ["service", "method", "code"], registry=reg)
        self.latency = prom.Histogram("edgeloop_rpc_latency_seconds", "RPC handling time (streams: until the "
                                      "last message).", ["service", "method"], buckets=LATENCY_BUCKETS, registry=reg)
        self.samples = prom.Counter("edgeloop_uploaded_samples", "Uploaded samples acknowledged, by outcome.",
                                    ["outcome"], registry=reg)
        self.upload_bytes = prom.Counter("edgeloop_upload_bytes", "Bytes received in acknowledged uploads.",
                                         registry=reg)
        self.rounds = prom.Counter("edgeloop_rounds", "Rounds (distill: distillation jobs) by kind and state "
                                   "(queued, done, failed).", ["kind", "state"], registry=reg)
        self.round_seconds = prom.Histogram("edgeloop_round_seconds", "Duration of finished rounds.", ["kind"],
                                            buckets=LATENCY_BUCKETS, registry=reg)
        self.parameter_bytes = prom.Counter("edgeloop_parameter_bytes", "Serialized bytes of parameter messages: "
                                            "federated submissions (up) and parameter updates (down).",
                                            ["direction"], registry=reg)
        reg.register(_StateCollector(state, online_window_s))
        self._httpd: Any = None
        self.port = 0

    def observe_round(self, record: RoundRecord) -> None:
        """Count a round entering ``record.state`` (the round runner's hook)."""
        self.rounds.labels(record.kind, record.state).inc()
        if record.state in ("done", "failed"):
            self.round_seconds.labels(record.kind).observe(record.seconds)

    def _observe_request(self, request: Any) -> None:
        if isinstance(request, device_pb2.FederatedUpdate):
            self.parameter_bytes.labels("up").inc(request.ByteSize())

    def _observe_response(self, response: Any) -> None:
        if isinstance(response, common_pb2.ParameterUpdate):
            self.parameter_bytes.labels("down").inc(response.ByteSize())
        elif isinstance(response, device_pb2.UploadAck):
            self.samples.labels("stored").inc(len(response.stored_ids))
            self.samples.labels("duplicate").inc(len(response.duplicate_ids))
            self.upload_bytes.inc(response.bytes_received)

    def _record(self, service: str, method: str, context: grpc.ServicerContext, t0: float, fallback: str) -> None:
        code = context.code()  # set by abort() / set_code(); otherwise the fallback tells how the call ended
        name = code.name if isinstance(code, grpc.StatusCode) else fallback
        self.rpcs.labels(service, method, name).inc()
        self.latency.labels(service, method).observe(time.perf_counter() - t0)

    def interceptor(self) -> grpc.ServerInterceptor:
        """A server interceptor counting every RPC (put it first, so it sees the guard's rejections)."""
        return _MetricsInterceptor(self)

    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: any free port) in a daemon thread; return the bound port."""
        httpd, _ = _prometheus().start_http_server(port, addr=host, registry=self.registry)
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop_http(self) -> None:
        """Stop the HTTP endpoint (if started)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        m = self.metrics

        def wrap(behavior: Behavior, request_streaming: bool, response_streaming: bool) -> Behavior:
            if response_streaming:
                def timed_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    t0, ending, inner = time.perf_counter(), "UNKNOWN", None
                    try:
                        inner = behavior(request, context)
                        for item in inner:
                            m._observe_response(item)
                            yield item
                        ending = "OK"
                    except GeneratorExit:  # the client went away mid-stream
                        ending = "CANCELLED"
                        raise
                    finally:
                        close = getattr(inner, "close", None)
                        if close is not None:
                            close()  # run the handler's own cleanup now, as ``yield from`` would
                        m._record(service, method, context, t0, ending)
                return timed_stream

            def timed(request: Any, context: grpc.ServicerContext) -> Any:
                t0, ending = time.perf_counter(), "UNKNOWN"
                try:
                    m._observe_request(request)
                    response = behavior(request, context)
                    ending = "OK"
                finally:
                    m._record(service, method, context, t0, ending)
                m._observe_response(response)
                return response
            return timed

        return rewrap(handler, wrap)
