"""Odd and invalid upstream responses, written byte for byte by a scripted upstream:
what is relayed, what becomes a 502, and that the client connection stays sound."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.raw import RawResponse, ScriptedUpstream, read_response, request_bytes


def serve(answer: bytes, *, close: bool = False) -> Iterator[GatewayServer]:
    with ScriptedUpstream(lambda connection, index: answer, close_after_reply=close) as scripted:
        config = gateway_config(
            {"main": {"endpoints": [scripted.url], "retries": 0}},
            [route("all", "/{rest:path}", "main")],
        )
        with GatewayServer(config) as gw:
            yield gw


def twice(gw: GatewayServer, method: str = "GET") -> tuple[RawResponse, RawResponse]:
    """Two requests on one client connection: the second shows whether it survived."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(request_bytes(method, "/one"))
        first = read_response(sock)
        sock.sendall(request_bytes(method, "/two"))
        second = read_response(sock)
    return first, second


def names(response: RawResponse) -> list[str]:
    return [name for name, _ in response.headers]


@pytest.fixture
def gw(request: pytest.FixtureRequest) -> Iterator[GatewayServer]:
    answer, close = request.param
    yield from serve(answer, close=close)


def scripted(answer: bytes, close: bool = False) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("gw", [(answer, close)], indirect=True, ids=[""])


@scripted(
    b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-final: yes\r\n\r\nhello"
)
def test_interim_responses_are_not_relayed_as_the_answer(gw: GatewayServer) -> None:
    first, second = twice(gw)
    assert (first.status, first.body, first.header("x-final")) == (200, b"hello", "yes")
    assert "link" not in names(first)
    assert second.status == 200


@scripted(b'HTTP/1.1 304 Not Modified\r\ncontent-length: 1234\r\netag: "v1"\r\n\r\n')
def test_a_304_with_a_content_length_is_relayed_without_breaking_the_connection(
    gw: GatewayServer,
) -> None:
    first, second = twice(gw)
    assert (first.status, first.body, first.header("etag")) == (304, b"", '"v1"')
    assert first.complete
    assert second.status == 304


@scripted(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n")
def test_a_204_never_carries_a_content_length_to_the_client(gw: GatewayServer) -> None:
    first, second = twice(gw)
    assert (first.status, first.body) == (204, b"")
    assert "content-length" not in names(first)
    assert second.status == 204


@scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
def test_a_response_with_both_framings_gets_502(gw: GatewayServer) -> None:
    first, second = twice(gw)
    assert first.status == 502
    assert json.loads(first.body)["error"] == "bad_gateway"
    assert second.status == 502


@scripted(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
def test_an_unrequested_protocol_switch_gets_502(gw: GatewayServer) -> None:
    first, second = twice(gw)
    assert first.status == 502
    assert second.status == 502


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
def test_a_status_outside_100_to_599_gets_502(status: bytes) -> None:
    answer = b"HTTP/1.1 " + status + b" Odd\r\ncontent-length: 2\r\n\r\nok"
    for gw in serve(answer):
        first, second = twice(gw)
        assert first.status == 502
        assert second.status == 502


@scripted(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n" + b"until close " * 1000, True)
def test_a_body_delimited_by_the_upstream_closing_is_relayed_whole(gw: GatewayServer) -> None:
    first, second = twice(gw)
    assert first.status == 200
    assert first.body == b"until close " * 1000
    assert second.status == 200


@scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-folded: a\r\n b\r\n\r\nok")
def test_an_obs_folded_response_header_gets_502(gw: GatewayServer) -> None:
    first, _ = twice(gw)
    assert first.status == 502


@scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-request-id: upstream-7\r\n\r\nok")
def test_the_upstream_request_id_header_is_not_duplicated(gw: GatewayServer) -> None:
    first, _ = twice(gw)
    assert len(first.header_all("x-request-id")) == 1
