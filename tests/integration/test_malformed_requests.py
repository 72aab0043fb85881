"""Request smuggling and malformed requests, sent as raw bytes.

Each must be refused with a 400 (or a closed connection) before any byte reaches the
upstream: never a 500, never a traceback. The gateway runs under both HTTP/1.1 parsers
uvicorn offers: httptools refuses most of these itself, h11 lets some through, so the
gateway's own checks are exercised too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.raw import RawResponse, exchange
from tests.support.upstream import UpstreamApp, UpstreamServer

HEAD = b"POST /echo HTTP/1.1\r\nHost: gw\r\n"
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"


def post(*lines: bytes, body: bytes = b"", head: bytes = HEAD) -> bytes:
    return head + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


MALFORMED = {
    "content-length-and-transfer-encoding": post(
        b"Content-Length: 6",
        b"Transfer-Encoding: chunked",
        body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    "transfer-encoding-and-content-length": post(
        b"Transfer-Encoding: chunked", b"Content-Length: 3", body=b"0\r\n\r\n"
    ),
    "two-different-content-lengths": post(
        b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"
    ),
    "transfer-encoding-xchunked": post(b"Transfer-Encoding: xchunked", body=CHUNKED_HELLO),
    "transfer-encoding-not-ending-in-chunked": post(
        b"Transfer-Encoding: chunked, identity", body=CHUNKED_HELLO
    ),
    "transfer-encoding-twice": post(
        b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=CHUNKED_HELLO
    ),
    "transfer-encoding-in-http-1.0": post(
        b"Transfer-Encoding: chunked",
        body=CHUNKED_HELLO,
        head=b"POST /echo HTTP/1.0\r\nHost: gw\r\n",
    ),
    "bad-chunk-size": post(b"Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"),
    "negative-content-length": post(b"Content-Length: -5", body=b"hello"),
    "space-before-colon": post(b"Content-Length : 5", body=b"hello"),
    "garbage-request-line": b"GET /echo HTTP/1.1 extra garbage\r\nHost: gw\r\n\r\n",
    "binary-request-line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "control-character-in-header": post(b"X-A: b\x00c"),
    "bare-cr-in-header": post(b"X-A: b\rX-B: c"),
    "two-host-headers": post(b"Host: internal.example"),
    "host-with-a-slash": b"GET /echo HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "host-with-userinfo": b"GET /echo HTTP/1.1\r\nHost: user@evil\r\n\r\n",
    "no-host-in-http-1.1": b"GET /echo HTTP/1.1\r\n\r\n",
}


@pytest.fixture(scope="module", params=["httptools", "h11"])
def gw(request: pytest.FixtureRequest, upstream_server: UpstreamServer) -> Iterator[GatewayServer]:
    config = gateway_config({"main": upstream_server.url}, [route("all", "/{rest:path}", "main")])
    with GatewayServer(config, http=request.param) as server:
        yield server


def assert_refused(response: RawResponse) -> None:
    assert response.status in (0, 400), (response.status, response.body)
    assert b"Traceback" not in response.body
    assert response.closed, "the connection must not be reused after a malformed request"


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_is_refused_without_contacting_the_upstream(
    gw: GatewayServer, upstream: UpstreamApp, name: str
) -> None:
    response = exchange(gw.port, MALFORMED[name], wait_for_close=2.0)
    assert_refused(response)
    assert upstream.requests == []


def test_an_obs_folded_header_never_reaches_the_upstream_folded(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    request = b"GET /echo HTTP/1.1\r\nHost: gw\r\nX-Folded: first\r\n  second\r\n\r\n"
    response = exchange(gw.port, request)
    if response.status == 400:
        assert upstream.requests == []
    else:
        # RFC 9112 §5.2 allows the other choice: replace the fold with spaces.
        assert response.status == 200
        values = [v for k, v in upstream.requests[-1]["headers"] if k == "x-folded"]
        assert len(values) == 1
        assert "\r" not in values[0] and "\n" not in values[0]


def test_a_smuggled_request_after_a_refused_one_is_never_forwarded(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    request = post(
        b"Content-Length: 44",
        b"Transfer-Encoding: chunked",
        body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    response = exchange(gw.port, request, wait_for_close=2.0)
    assert_refused(response)
    assert "/smuggled" not in upstream.paths
    assert upstream.requests == []


def test_a_well_formed_request_on_the_same_gateway_still_works(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    response = exchange(gw.port, post(b"Content-Length: 5", body=b"hello"))
    assert response.status == 200
    assert upstream.requests[-1]["body_size"] == 5
