"""Proxy header semantics (RFC 9110 §7.6, RFC 7239): what the upstream and the client see."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.raw import exchange, request_bytes
from tests.support.upstream import ORDERED_HEADERS, UpstreamApp, UpstreamServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
SPOOFED = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "spoofed.example"),
    ("Forwarded", "for=203.0.113.9;proto=https"),
]


def config(upstream_url: str, **server: Any) -> dict[str, Any]:
    routes = [route("all", "/{rest:path}", "main")]
    return gateway_config({"main": upstream_url}, routes, server=server)


@pytest.fixture(scope="module")
def gw(upstream_server: UpstreamServer) -> Iterator[GatewayServer]:
    with GatewayServer(config(upstream_server.url)) as server:
        yield server


@pytest.fixture(scope="module")
def trusting_gw(upstream_server: UpstreamServer) -> Iterator[GatewayServer]:
    """A gateway that believes forwarding headers from 127.0.0.1 (the test client)."""
    with GatewayServer(config(upstream_server.url, trusted_proxies=["127.0.0.1/32"])) as server:
        yield server


def sent(upstream: UpstreamApp, name: str) -> list[str]:
    """The values of header ``name`` in the last request the upstream received."""
    return [value for key, value in upstream.requests[-1]["headers"] if key == name]


def names_sent(upstream: UpstreamApp) -> list[str]:
    return [key for key, _ in upstream.requests[-1]["headers"]]


def test_hop_by_hop_headers_never_reach_the_upstream(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    headers = [
        ("Connection", "keep-alive, X-Private"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("X-Private", "for this hop only"),
        ("X-Kept", "end to end"),
    ]
    response = exchange(gw.port, request_bytes("GET", "/plain", headers))
    assert response.status == 200
    names = set(names_sent(upstream))
    assert not names & HOP_BY_HOP - {"connection"}
    assert "x-private" not in names
    assert sent(upstream, "x-kept") == ["end to end"]
    # The gateway's own connection to the upstream is keep-alive, never the client's.
    assert sent(upstream, "connection") == []


def test_hop_by_hop_headers_never_reach_the_client(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    response = exchange(gw.port, request_bytes("GET", "/hop"))
    assert response.status == 200
    names = {name for name, _ in response.headers}
    assert not names & (HOP_BY_HOP - {"connection"})
    assert "x-secret" not in names  # named by the upstream's Connection header
    assert response.header_all("connection") == []
    assert response.header("x-visible") == "yes"


def test_forwarding_headers_describe_the_client(gw: GatewayServer, upstream: UpstreamApp) -> None:
    exchange(gw.port, request_bytes("GET", "/plain", host="shop.example:8080"))
    assert sent(upstream, "x-forwarded-for") == ["127.0.0.1"]
    assert sent(upstream, "x-forwarded-proto") == ["http"]
    assert sent(upstream, "x-forwarded-host") == ["shop.example:8080"]
    assert sent(upstream, "forwarded") == ['for=127.0.0.1;proto=http;host="shop.example:8080"']
    assert sent(upstream, "via") == ["1.1 octopus"]


def test_the_upstream_gets_its_own_host_header(
    gw: GatewayServer, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    exchange(gw.port, request_bytes("GET", "/plain", host="shop.example"))
    assert sent(upstream, "host") == [f"127.0.0.1:{upstream_server.port}"]


def test_the_response_carries_via(gw: GatewayServer, upstream: UpstreamApp) -> None:
    response = exchange(gw.port, request_bytes("GET", "/plain"))
    assert "1.1 octopus" in response.header_all("via")


def test_client_forwarding_headers_are_replaced_when_the_peer_is_not_trusted(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    exchange(gw.port, request_bytes("GET", "/plain", SPOOFED, host="real.example"))
    assert sent(upstream, "x-forwarded-for") == ["127.0.0.1"]
    assert sent(upstream, "x-forwarded-proto") == ["http"]
    assert sent(upstream, "x-forwarded-host") == ["real.example"]
    assert sent(upstream, "forwarded") == ["for=127.0.0.1;proto=http;host=real.example"]


def test_client_forwarding_headers_are_extended_when_the_peer_is_trusted(
    trusting_gw: GatewayServer, upstream: UpstreamApp
) -> None:
    exchange(trusting_gw.port, request_bytes("GET", "/plain", SPOOFED, host="real.example"))
    assert sent(upstream, "x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]
    assert sent(upstream, "x-forwarded-proto") == ["https"]
    assert sent(upstream, "x-forwarded-host") == ["spoofed.example"]
    assert sent(upstream, "forwarded") == [
        "for=203.0.113.9;proto=https, for=127.0.0.1;proto=http;host=real.example"
    ]


def test_repeated_x_forwarded_for_headers_from_a_trusted_peer_are_joined_in_order(
    trusting_gw: GatewayServer, upstream: UpstreamApp
) -> None:
    headers = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "198.51.100.2")]
    exchange(trusting_gw.port, request_bytes("GET", "/plain", headers))
    assert sent(upstream, "x-forwarded-for") == ["198.51.100.1, 198.51.100.2, 127.0.0.1"]


def test_request_header_order_and_repeats_are_kept(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    headers = [("X-B", "1"), ("X-A", "2"), ("X-B", "3"), ("Accept", "a/b"), ("X-A", "4")]
    exchange(gw.port, request_bytes("GET", "/plain", headers))
    forwarded = [
        (key, value) for key, value in upstream.requests[-1]["headers"] if key in ("x-a", "x-b")
    ]
    assert forwarded == [("x-b", "1"), ("x-a", "2"), ("x-b", "3"), ("x-a", "4")]


def test_response_header_order_and_repeats_are_kept(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    response = exchange(gw.port, request_bytes("GET", "/ordered"))
    custom = [(k, v) for k, v in response.headers if k.startswith("x-") and k != "x-request-id"]
    assert custom == [(k.decode(), v.decode()) for k, v in ORDERED_HEADERS]


def test_repeated_set_cookie_headers_stay_separate(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    response = exchange(gw.port, request_bytes("GET", "/cookies"))
    assert response.header_all("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_a_client_request_id_is_passed_through_and_returned(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    with gw.client() as client:
        response = client.get("/plain", headers={"X-Request-ID": "trace-abc-123"})
    assert sent(upstream, "x-request-id") == ["trace-abc-123"]
    assert response.headers.get_list("x-request-id") == ["trace-abc-123"]


def test_a_request_id_is_created_and_returned_when_the_client_sends_none(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    with gw.client() as client:
        response = client.get("/plain")
    created = sent(upstream, "x-request-id")
    assert len(created) == 1 and len(created[0]) >= 16
    assert response.headers.get_list("x-request-id") == created


def test_an_unreasonable_request_id_is_replaced(gw: GatewayServer, upstream: UpstreamApp) -> None:
    with gw.client() as client:
        response = client.get("/plain", headers={"X-Request-ID": "x" * 500})
    created = sent(upstream, "x-request-id")
    assert created != ["x" * 500] and len(created) == 1
    assert response.headers["x-request-id"] == created[0]


def test_every_request_id_is_different(gw: GatewayServer, upstream: UpstreamApp) -> None:
    with gw.client() as client:
        ids = {client.get("/plain").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_the_client_content_length_is_not_duplicated(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    with gw.client() as client:
        response = client.post("/plain", content=b"hello")
    assert response.status_code == 200
    assert sent(upstream, "content-length") == ["5"]
    assert upstream.requests[-1]["body_size"] == 5


def test_an_empty_body_keeps_the_content_length_the_client_declared(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    exchange(gw.port, request_bytes("POST", "/plain", [("Content-Length", "0")]))
    assert sent(upstream, "content-length") == ["0"]


def test_a_request_without_a_body_gets_no_framing_headers(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    exchange(gw.port, request_bytes("GET", "/plain"))
    assert sent(upstream, "content-length") == []
    assert sent(upstream, "transfer-encoding") == []


def test_the_client_gets_a_single_date_header(gw: GatewayServer, upstream: UpstreamApp) -> None:
    response = exchange(gw.port, request_bytes("GET", "/plain"))
    assert len(response.header_all("date")) == 1
