"""Logs: one structured access line per request (or a sample, or none), trace ids in
records, and credentials never written, whoever logs them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.observability.logging import (
    JsonFormatter,
    RedactingFilter,
    TextFormatter,
    TraceContextFilter,
)
from gateway.observability.tracing import Tracing
from settings.models import TracingSettings
from tests.e2e.helpers import GatewayProcess, minimal_config, start_gateway
from tests.support.gateway import MakeGateway, gateway_config, route
from tests.support.upstream import UpstreamApp, UpstreamServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SECRETS = ("Bearer s3cr3t-bearer", "cookie-s3cr3t", "abc123tok", "pw-s3cr3t")
ACCESS_FIELDS = {
    "timestamp",
    "level",
    "message",
    "trace_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "upstream",
    "request_id",
}


def access_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [r for r in gateway.log_records() if r.get("logger") == "octopus.access"]


def run_requests(
    upstream_url: str, observability: dict[str, Any], count: int = 3
) -> tuple[GatewayProcess, str]:
    """Start the gateway process, send ``count`` requests with credentials, stop it."""
    config = minimal_config(upstream_url, observability=observability)
    config["routes"] = [{"name": "users", "match": {"path": "/users/{id}"}, "upstream": "echo"}]
    gateway = start_gateway(config)
    try:
        for index in range(count):
            response = httpx.get(
                f"{gateway.data_url}/users/{index}?token=abc123tok&page=2&password=pw-s3cr3t",
                headers={
                    "Authorization": "Bearer s3cr3t-bearer",
                    "Cookie": "session=cookie-s3cr3t",
                    "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
                },
                timeout=10,
            )
            assert response.status_code == 200
        request_id = response.headers["x-request-id"]
    finally:
        gateway.stop()
    return gateway, request_id


@pytest.fixture(scope="module")
def echo() -> Iterator[UpstreamServer]:
    with UpstreamServer("echo") as server:
        yield server


def test_each_request_gets_one_json_access_line_without_credentials(echo: UpstreamServer) -> None:
    gateway, request_id = run_requests(
        echo.url,
        {
            "logging": {"level": "debug", "format": "json"},
            "tracing": {"enabled": True, "exporter": "none"},
        },
    )
    lines = access_lines(gateway)
    assert len(lines) == 3
    last = lines[-1]
    assert last.keys() >= ACCESS_FIELDS
    assert last["message"] == "request" and last["level"] == "info"
    assert (last["method"], last["status"], last["upstream"]) == ("GET", 200, "echo")
    assert last["path"] == "/users/2?token=***&page=2&password=***"
    assert last["route"] == "/users/{id}"
    assert last["trace_id"] == TRACE_ID
    assert last["request_id"] == request_id
    assert isinstance(last["duration_ms"], float) and last["duration_ms"] > 0
    output = gateway.output()
    for secret in SECRETS:
        assert secret not in output


def test_access_log_off_writes_no_access_lines(echo: UpstreamServer) -> None:
    gateway, _ = run_requests(echo.url, {"logging": {"access_log": False}})
    assert access_lines(gateway) == []
    assert gateway.log_records(), "other logs still flow"


def test_access_log_sample_zero_writes_no_access_lines(echo: UpstreamServer) -> None:
    gateway, _ = run_requests(echo.url, {"logging": {"access_log_sample": 0}})
    assert access_lines(gateway) == []


def test_text_format_reads_like_a_web_server_log(echo: UpstreamServer) -> None:
    gateway, request_id = run_requests(echo.url, {"logging": {"format": "text"}}, count=1)
    (line,) = [line for line in gateway.output().splitlines() if "octopus.access" in line]
    assert " INFO octopus.access: GET /users/0?token=***&page=2&password=*** 200 " in line
    assert f"request_id={request_id}" in line and "upstream=echo" in line
    for secret in SECRETS:
        assert secret not in gateway.output()


def test_access_log_sample_logs_a_share_of_requests(
    make_gateway: MakeGateway,
    upstream: UpstreamApp,
    upstream_server: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    logging.getLogger("octopus.access").disabled = False
    caplog.set_level(logging.INFO, logger="octopus.access")
    gw = make_gateway(
        gateway_config(
            {"svc": upstream_server.url},
            [route("u", "/u", "svc")],
            observability={"logging": {"access_log_sample": 0.5}},
        )
    )
    with gw.client() as client:
        for _ in range(200):
            client.get("/u")
    logged = [r for r in caplog.records if r.name == "octopus.access"]
    assert 40 < len(logged) < 160  # 100 expected; the odds of leaving this are ~1e-16


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("octopus", logging.INFO, __file__, 1, "request", None, None)
    record.__dict__.update(extra)
    return record


def test_credential_fields_are_masked_at_any_depth() -> None:
    record = _record(
        authorization="Bearer x",
        Cookie="a=1",
        set_cookie="b=2",
        password="p",
        token="t",
        secret="s",
        client_secret="cs",
        headers=[(b"authorization", b"Basic eA=="), ("x-trace", "ok")],
        upstream_headers={"Set-Cookie": "c=3", "content-type": "text/plain"},
        path="/login?user=ann&api_key=k1&next=/home",
        url="redis://:hunter2@cache:6379/0",
        method="GET",
        request_id="r1",
    )
    assert RedactingFilter().filter(record)
    fields = record.__dict__
    for name in ("authorization", "Cookie", "set_cookie", "password", "token", "secret"):
        assert fields[name] == "***"
    assert fields["client_secret"] == "***"
    assert fields["headers"] == [(b"authorization", "***"), ("x-trace", "ok")]
    assert fields["upstream_headers"] == {"Set-Cookie": "***", "content-type": "text/plain"}
    assert fields["path"] == "/login?user=ann&api_key=***&next=/home"
    assert fields["url"] == "redis://:***@cache:6379/0"
    assert (fields["method"], fields["request_id"]) == ("GET", "r1")


def test_credentials_in_messages_are_masked() -> None:
    logger = logging.getLogger("octopus.test-redaction")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("no route for %s", "/x?token=abc123tok&a=1")
        logger.warning("fetching https://user:pw-s3cr3t@example.com/schema")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "no route for /x?token=***&a=1"
    assert second["message"] == "fetching https://user:***@example.com/schema"


def test_log_records_inside_a_request_span_carry_its_trace_id() -> None:
    tracing = Tracing(TracingSettings(enabled=True, exporter="none"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContextFilter())
    logger = logging.getLogger("octopus.test-trace")
    logger.addHandler(handler)
    logger.propagate = False
    scope = {
        "type": "http",
        "headers": [(b"traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode())],
    }
    try:
        span = tracing.start_server_span(scope, "GET", "/x")
        logger.warning("inside")
        span.finish(200, "/x")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
        tracing.shutdown()
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["trace_id"] == TRACE_ID and len(inside["span_id"]) == 16
    assert "trace_id" not in outside


def test_text_formatter_puts_extras_after_the_message() -> None:
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    line = formatter.format(_record(upstream="users", attempt=2))
    assert line == "INFO octopus: request upstream=users attempt=2"
