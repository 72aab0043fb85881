"""OpenTelemetry tracing: server and client spans, W3C context in and out (HTTP and
WebSocket), retries, sampling, and the OTLP exporters against fake collectors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags, TraceState
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import Server as WsServer
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from gateway.observability.tracing import (
    _looks_like_http,
    extract_context,
    inject_headers,
    make_exporter,
)
from settings.models import TracingSettings
from tests.support.gateway import GatewayServer, MakeGateway, gateway_config, route
from tests.support.servers import free_port
from tests.support.upstream import UpstreamApp, UpstreamServer
from tests.support.waiting import eventually

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def traceparent(flags: str = "01", trace_id: str = TRACE_ID) -> str:
    return f"00-{trace_id}-{CALLER_SPAN}-{flags}"


def traced(
    make_gateway: MakeGateway,
    upstreams: dict[str, Any],
    routes: list[dict[str, Any]],
    **tracing: Any,
) -> tuple[GatewayServer, InMemorySpanExporter]:
    """A gateway with tracing on, its spans collected in memory as each one ends."""
    config = gateway_config(
        upstreams,
        routes,
        observability={"tracing": {"enabled": True, "exporter": "none", **tracing}},
    )
    gw = make_gateway(config)
    assert gw.gateway.tracing is not None
    exporter = InMemorySpanExporter()
    gw.gateway.tracing.add_exporter(exporter)
    return gw, exporter


def finished(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """Wait for ``count`` spans (the server span ends just after the response is sent)."""
    return eventually(
        lambda: (
            list(exporter.get_finished_spans())
            if len(exporter.get_finished_spans()) >= count
            else None
        ),
        timeout=5,
    )


def one(spans: list[ReadableSpan], kind: SpanKind) -> ReadableSpan:
    (span,) = [s for s in spans if s.kind == kind]
    return span


def sent_header(upstream: UpstreamApp, name: str, index: int = -1) -> list[str]:
    return [v for k, v in upstream.requests[index]["headers"] if k == name]


def test_server_and_client_spans_continue_the_callers_trace(
    make_gateway: MakeGateway, upstream: UpstreamApp, upstream_server: UpstreamServer
) -> None:
    gw, exporter = traced(
        make_gateway,
        {"svc": upstream_server.url},
        [route("users", "/users/{id}", "svc")],
        service_name="edge",
    )
    headers = {"traceparent": traceparent(), "tracestate": "vendor=abc"}
    with gw.client() as client:
        assert client.get("/users/7", headers=headers).status_code == 200

    spans = finished(exporter, 2)
    server, upstream_call = one(spans, SpanKind.SERVER), one(spans, SpanKind.CLIENT)
    assert server.context.trace_id == upstream_call.context.trace_id == int(TRACE_ID, 16)
    assert server.parent is not None and server.parent.span_id == int(CALLER_SPAN, 16)
    assert upstream_call.parent is not None
    assert upstream_call.parent.span_id == server.context.span_id
    assert server.name == "GET /users/{id}"
    assert server.attributes["http.route"] == "/users/{id}"
    assert server.attributes["http.response.status_code"] == 200
    assert upstream_call.attributes["http.request.method"] == "GET"
    assert upstream_call.attributes["server.address"] == "127.0.0.1"
    assert upstream_call.attributes["server.port"] == upstream_server.port
    assert upstream_call.attributes["http.response.status_code"] == 200
    resource = server.resource.attributes
    assert resource["service.name"] == "edge"
    assert resource["service.version"] and resource["service.instance.id"]

    # The upstream hears of the gateway's client span, in place of the caller's.
    client_span = f"{upstream_call.context.span_id:016x}"
    assert sent_header(upstream, "traceparent") == [f"00-{TRACE_ID}-{client_span}-01"]
    assert sent_header(upstream, "tracestate") == ["vendor=abc"]


def test_a_retried_request_shows_one_client_span_per_attempt(
    make_gateway: MakeGateway, upstream: UpstreamApp, upstream_server: UpstreamServer
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw, exporter = traced(
        make_gateway,
        {"svc": {"endpoints": [{"url": dead}, {"url": upstream_server.url}], "retries": 2}},
        [route("users", "/users/{id}", "svc")],
    )
    with gw.client() as client:
        # Round-robin: one of the two starts on the dead endpoint and is retried.
        for index in range(2):
            assert client.get(f"/users/{index}").status_code == 200

    spans = finished(exporter, 5)
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    retried = next(t for t in by_trace.values() if len(t) == 3)
    server = one(retried, SpanKind.SERVER)
    first, second = sorted(
        (s for s in retried if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0
    )
    assert first.parent is not None and second.parent is not None
    assert first.parent.span_id == second.parent.span_id == server.context.span_id
    assert first.status.status_code == StatusCode.ERROR
    assert first.attributes["error.type"] == "ConnectFailed"
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["http.response.status_code"] == 200
    assert server.attributes["http.response.status_code"] == 200


def test_sampling_ratio_zero_records_nothing_but_still_propagates(
    make_gateway: MakeGateway, upstream: UpstreamApp, upstream_server: UpstreamServer
) -> None:
    gw, exporter = traced(
        make_gateway,
        {"svc": upstream_server.url},
        [route("users", "/users/{id}", "svc")],
        sample_ratio=0,
    )
    with gw.client() as client:
        client.get("/users/1", headers={"traceparent": traceparent("00")})
        client.get("/users/2")
        # A caller that sampled its trace is followed (ParentBased), whatever the ratio.
        client.get("/users/3", headers={"traceparent": traceparent("01")})

    spans = finished(exporter, 2)  # only the third request's, and nothing more
    assert {s.name for s in spans} == {"GET /users/{id}", "GET"}
    assert all(s.context.trace_flags.sampled for s in spans)

    unsampled, fresh, sampled = (sent_header(upstream, "traceparent", i) for i in range(3))
    _, trace_id, span_id, flags = unsampled[0].split("-")
    assert (trace_id, flags) == (TRACE_ID, "00") and span_id != CALLER_SPAN
    _, new_trace, _, new_flags = fresh[0].split("-")
    # A new trace, not sampled (bit 0 clear; bit 1 may say its id is random).
    assert new_trace != TRACE_ID and int(new_trace, 16) and not int(new_flags, 16) & 1
    assert sampled[0].startswith(f"00-{TRACE_ID}-") and sampled[0].endswith("-01")


def test_without_tracing_the_callers_context_passes_through_untouched(
    make_gateway: MakeGateway, upstream: UpstreamApp, upstream_server: UpstreamServer
) -> None:
    gw = make_gateway(gateway_config({"svc": upstream_server.url}, [route("u", "/u", "svc")]))
    assert gw.gateway.tracing is None and gw.app.proxy.tracing is None
    with gw.client() as client:
        client.get("/u", headers={"traceparent": traceparent(), "tracestate": "a=b"})
    assert sent_header(upstream, "traceparent") == [traceparent()]
    assert sent_header(upstream, "tracestate") == ["a=b"]


class _WebSocketUpstream:
    """An echo WebSocket server in a thread that records each handshake's headers."""

    def __init__(self) -> None:
        self.handshakes: list[dict[str, str]] = []

        def record(connection: ServerConnection, request: Any) -> None:
            self.handshakes.append({k.lower(): v for k, v in request.headers.raw_items()})

        def echo(connection: ServerConnection) -> None:
            for message in connection:
                connection.send(message)

        self.server: WsServer = ws_serve(echo, "127.0.0.1", 0, process_request=record)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def ws_upstream() -> Iterator[_WebSocketUpstream]:
    server = _WebSocketUpstream()
    yield server
    server.close()


def test_websocket_upgrades_carry_the_trace_upstream(
    make_gateway: MakeGateway, ws_upstream: _WebSocketUpstream
) -> None:
    gw, exporter = traced(
        make_gateway, {"chat": f"http://127.0.0.1:{ws_upstream.port}"}, [route("ws", "/ws", "chat")]
    )
    url = gw.url.replace("http://", "ws://") + "/ws"
    with ws_connect(url, additional_headers={"traceparent": traceparent()}) as socket:
        socket.send("hello")
        assert socket.recv(timeout=5) == "hello"

    spans = finished(exporter, 2)
    server, upstream_call = one(spans, SpanKind.SERVER), one(spans, SpanKind.CLIENT)
    assert server.name == "GET /ws"
    assert server.context.trace_id == upstream_call.context.trace_id == int(TRACE_ID, 16)
    (handshake,) = ws_upstream.handshakes
    assert handshake["traceparent"] == f"00-{TRACE_ID}-{upstream_call.context.span_id:016x}-01"


def test_trace_headers_helper_for_grpc_metadata() -> None:
    context = SpanContext(
        trace_id=int(TRACE_ID, 16),
        span_id=int(CALLER_SPAN, 16),
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "abc")]),
    )
    pairs = inject_headers(context)
    assert pairs == [("traceparent", traceparent()), ("tracestate", "vendor=abc")]
    parent = extract_context(pairs)
    assert parent is not None
    from opentelemetry import trace

    extracted = trace.get_current_span(parent).get_span_context()
    assert (extracted.trace_id, extracted.span_id) == (context.trace_id, context.span_id)
    assert extract_context([("x-other", "1")]) is None
    assert inject_headers(SpanContext(0, 0, is_remote=False)) == []


@pytest.mark.parametrize(
    ("exporter", "endpoint", "expected"),
    [
        ("otlp", "http://collector:4317", "grpc"),
        ("otlp", "http://collector:4318", "http"),
        ("otlp", "https://collector.example/v1/traces", "http"),
        ("otlp", None, "grpc"),
        ("otlp-grpc", "collector:4317", "grpc"),
        ("otlp-http", "http://collector:4318", "http"),
        ("console", None, "ConsoleSpanExporter"),
        ("none", None, None),
    ],
)
def test_the_exporter_follows_the_configuration(
    exporter: str, endpoint: str | None, expected: str | None
) -> None:
    made = make_exporter(TracingSettings(enabled=True, exporter=exporter, endpoint=endpoint))
    if expected is None:
        assert made is None
        return
    assert made is not None
    name = f"{type(made).__module__}.{type(made).__name__}"
    assert expected in name
    if expected == "http":
        assert made._endpoint.endswith("/v1/traces")  # type: ignore[attr-defined]
    made.shutdown()
    assert _looks_like_http("collector:4318") and not _looks_like_http("collector:4317")


class _HttpCollector(ThreadingHTTPServer):
    """A fake OTLP/HTTP collector: keeps every ``/v1/traces`` export request."""

    daemon_threads = True

    def __init__(self) -> None:
        self.exports: list[trace_service_pb2.ExportTraceServiceRequest] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    collector.exports.append(
                        trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _GrpcCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """A fake OTLP/gRPC collector."""

    def __init__(self) -> None:
        self.exports: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.server = grpc.server(ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.url = f"http://127.0.0.1:{port}"
        self.server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.exports.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.parametrize("protocol", ["otlp-http", "otlp-grpc"])
def test_spans_reach_an_otlp_collector_with_the_resource_attributes(
    protocol: str, upstream: UpstreamApp, upstream_server: UpstreamServer
) -> None:
    collector: Any = _HttpCollector() if protocol == "otlp-http" else _GrpcCollector()
    try:
        config = gateway_config(
            {"svc": upstream_server.url},
            [route("users", "/users/{id}", "svc")],
            observability={
                "tracing": {
                    "enabled": True,
                    "exporter": protocol,
                    "endpoint": collector.url,
                    "service_name": "edge-gateway",
                }
            },
        )
        with GatewayServer(config) as gw, gw.client() as client:
            client.get("/users/1", headers={"traceparent": traceparent()})
        # Stopping the gateway flushed the batch processor: the spans are there now.
        spans = [
            (span, resource_spans.resource)
            for export in collector.exports
            for resource_spans in export.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        assert {span.name for span, _ in spans} == {"GET /users/{id}", "GET"}
        assert {span.trace_id.hex() for span, _ in spans} == {TRACE_ID}
        resource = {a.key: a.value.string_value for a in spans[0][1].attributes}
        assert resource["service.name"] == "edge-gateway"
        assert resource["service.version"]
        assert resource["service.instance.id"]
    finally:
        if protocol == "otlp-http":
            collector.shutdown()
        else:
            collector.server.stop(None)
