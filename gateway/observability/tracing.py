"""OpenTelemetry tracing: a server span per request, a client span per upstream attempt.

Off by default. When ``observability.tracing.enabled`` is false no :class:`Tracing`
exists (``Gateway.tracing is None``), this module is never imported, and the request
path checks that one attribute: no span objects, no context lookups, no header parsing.

When on:

* the client's W3C ``traceparent``/``tracestate`` are extracted and the request's server
  span continues that trace (or starts one); the span is the current OpenTelemetry
  context while the request runs, so log records carry its ``trace_id``;
* every upstream attempt gets its own client span (a retried request shows one per
  attempt, ``http.request.resend_count`` numbering the retries), and its context is
  sent upstream as ``traceparent``/``tracestate`` in place of the client's;
* sampling is ``ParentBased(TraceIdRatioBased(sample_ratio))``: the ratio decides for
  new traces, a caller's sampled flag is honoured. A span that is not sampled records
  nothing but still has ids, so the context keeps propagating upstream;
* spans leave through a batch processor to the configured exporter: OTLP over gRPC
  (``otlp-grpc``) or HTTP/protobuf (``otlp-http``); ``otlp`` picks HTTP when the
  endpoint looks like one (port 4318 or a ``/v1/traces`` path) and gRPC otherwise;
  ``console`` prints spans; ``none`` exports nothing (propagation only). Without an
  endpoint the exporters use their defaults and ``OTEL_EXPORTER_OTLP_*`` variables
  (headers, certificates, timeouts come from there too).

The tracer provider belongs to the gateway, not to the OpenTelemetry globals, so two
gateways in one process (tests) keep separate spans.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("octopus.tracing")

TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
_PROPAGATOR = TraceContextTextMapPropagator()


def inject_headers(span_context: SpanContext) -> list[tuple[str, str]]:
    """W3C trace-context headers (``traceparent`` and, if any, ``tracestate``) for a span.

    For carriers other than the HTTP/1.1 proxy, e.g. gRPC metadata:
    ``metadata.extend(inject_headers(span.get_span_context()))``. An invalid context
    gives no headers.
    """
    if not span_context.is_valid:
        return []
    pairs = [
        (
            "traceparent",
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{int(span_context.trace_flags):02x}",
        )
    ]
    if span_context.trace_state:
        pairs.append(("tracestate", span_context.trace_state.to_header()))
    return pairs


def extract_context(headers: Iterable[tuple[bytes | str, bytes | str]]) -> Context | None:
    """The parent context a caller sent (``traceparent``/``tracestate``), or None.

    Accepts ASGI header pairs (bytes) and gRPC metadata (str) alike; names must be lower
    case, as both carry them.
    """
    carrier: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1") if isinstance(name, bytes) else name
        if key == "traceparent" or key == "tracestate":
            carrier[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    if "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


def header_lines(span_context: SpanContext) -> list[tuple[bytes, bytes]]:
    """:func:`inject_headers` as header pairs for ``build_request_head``."""
    pairs = inject_headers(span_context)
    return [(name.encode(), value.encode("latin-1")) for name, value in pairs]


class ServerSpan:
    """The span of one request (or WebSocket session) and the context it made current."""

    __slots__ = ("method", "span", "token")

    def __init__(self, span: Span, token: object, method: str) -> None:
        self.span = span
        self.token = token
        self.method = method

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def finish(self, status: int, route: str | None) -> None:
        """Record the answer, end the span and restore the previous context."""
        span = self.span
        try:
            if span.is_recording():
                if route is None:
                    span.set_attribute("http.response.status_code", status)
                else:
                    span.set_attributes({"http.response.status_code": status, "http.route": route})
                    span.update_name(f"{self.method} {route}")
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            span.end()
        finally:
            otel_context.detach(self.token)


class ClientSpan:
    """The span of one upstream attempt."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    @property
    def context(self) -> SpanContext:
        return self.span.get_span_context()

    def header_lines(self) -> list[tuple[bytes, bytes]]:
        return header_lines(self.span.get_span_context())

    def finish(
        self,
        upstream_status: int | None = None,
        gateway_status: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End the span with the upstream's status, or why there was none."""
        span = self.span
        if span.is_recording():
            if upstream_status is not None:
                span.set_attribute("http.response.status_code", upstream_status)
                if upstream_status >= 400:
                    span.set_status(Status(StatusCode.ERROR))
            elif error is not None:
                span.set_attribute("error.type", type(error).__name__)
                span.set_status(Status(StatusCode.ERROR, str(error)))
            else:
                # The gateway answered the client itself (timeout, reset, client gone).
                span.set_attribute("error.type", str(gateway_status or "no answer"))
                span.set_status(Status(StatusCode.ERROR))
        span.end()


class Tracing:
    """A tracer provider, its exporter and the span helpers the request path calls."""

    def __init__(self, config: Any, *, exporter: SpanExporter | None = None) -> None:
        """``config`` is ``observability.tracing``; ``exporter`` replaces the configured one
        (tests pass an in-memory exporter, see :meth:`add_exporter`)."""
        self.config = config
        self.version = _version()
        host, pid = socket.gethostname(), os.getpid()
        self.resource = Resource.create(
            {
                "service.name": config.service_name,
                "service.version": self.version,
                # Unique per process: each worker is an instance of its own.
                "service.instance.id": f"{host}-{pid}-{uuid.uuid4().hex[:8]}",
                "host.name": host,
                "process.pid": pid,
            }
        )
        self.provider = TracerProvider(
            resource=self.resource,
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        chosen = exporter if exporter is not None else make_exporter(config)
        if chosen is not None:
            self.provider.add_span_processor(BatchSpanProcessor(chosen))
        self.tracer = self.provider.get_tracer("octopus", self.version)

    def add_exporter(self, exporter: SpanExporter) -> None:
        """Send every span to ``exporter`` as soon as it ends (for tests and debugging:
        ``gateway.tracing.add_exporter(InMemorySpanExporter())``)."""
        self.provider.add_span_processor(SimpleSpanProcessor(exporter))

    def start_server_span(self, scope: dict[str, Any], method: str, path: str) -> ServerSpan:
        """Start the request's span (continuing the caller's trace) and make it current."""
        parent = extract_context(scope["headers"])
        client = scope.get("client")
        # Few attributes: each costs the SDK a validation and a lock (~2 us) per span.
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": path}
        if client:
            attributes["client.address"] = client[0]
        span = self.tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return ServerSpan(span, token, method)

    def start_client_span(
        self, method: str, upstream: str, host: str, port: int, attempt: int = 0
    ) -> ClientSpan:
        """Start the span of one upstream attempt, a child of the current (server) span."""
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "server.address": host,
            "server.port": port,
            "octopus.upstream": upstream,
        }
        if attempt:
            attributes["http.request.resend_count"] = attempt
        return ClientSpan(
            self.tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attributes)
        )

    def flush(self, timeout_millis: int = 5000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop the exporter (blocking: the exporter
        may need a network round trip; call it off the event loop)."""
        self.provider.shutdown()


def make_exporter(config: Any) -> SpanExporter | None:
    """The span exporter ``observability.tracing`` asks for (None for ``none``)."""
    kind = config.exporter
    endpoint: str | None = config.endpoint
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=config.service_name)
    if kind == "otlp":
        kind = "otlp-http" if _looks_like_http(endpoint) else "otlp-grpc"
    if kind == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        if endpoint and urlsplit(endpoint).path in ("", "/"):
            # An explicit endpoint is used as the full URL; users give the collector's.
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=endpoint)


def _looks_like_http(endpoint: str | None) -> bool:
    if not endpoint:
        return False
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    try:
        port = parts.port
    except ValueError:
        port = None
    return port == 4318 or parts.path.rstrip("/").endswith("/v1/traces")


def _version() -> str:
    try:
        return metadata.version("octopus-gateway")
    except metadata.PackageNotFoundError:
        return "0.0.0"
