"""Request and response bodies: limits, 100-continue, streaming both ways, bodiless answers
and upstream connection handling. (Memory use with large bodies: ``test_memory.py``.)"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.raw import exchange, is_closed, read_response, request_bytes
from tests.support.upstream import UpstreamApp, UpstreamServer
from tests.support.waiting import eventually

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def gw(upstream_server: UpstreamServer) -> Iterator[GatewayServer]:
    config = gateway_config(
        {"main": upstream_server.url},
        [route("all", "/{rest:path}", "main")],
        server={"max_body_size": "1MiB"},
    )
    with GatewayServer(config) as server:
        yield server


@pytest.fixture
def conn(gw: GatewayServer) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        yield sock


def test_a_declared_body_over_the_limit_gets_413_without_contacting_the_upstream(
    gw: GatewayServer, upstream: UpstreamApp, conn: socket.socket
) -> None:
    conn.sendall(request_bytes("POST", "/upload", [("Content-Length", str(LIMIT + 1))]))
    response = read_response(conn)
    assert response.status == 413
    assert json.loads(response.body)["error"] == "payload_too_large"
    assert is_closed(conn, timeout=2)
    assert upstream.requests == []


def test_a_body_of_exactly_the_limit_is_accepted(gw: GatewayServer, upstream: UpstreamApp) -> None:
    with gw.client() as client:
        response = client.post("/upload", content=b"x" * LIMIT)
    assert response.status_code == 200
    assert upstream.requests[-1]["body_size"] == LIMIT


def test_a_chunked_body_growing_past_the_limit_gets_413_mid_stream(
    gw: GatewayServer, upstream: UpstreamApp, conn: socket.socket
) -> None:
    conn.sendall(request_bytes("POST", "/upload", [("Transfer-Encoding", "chunked")]))
    piece = b"%x\r\n%b\r\n" % (32768, b"y" * 32768)
    try:
        for _ in range(3 * LIMIT // 32768):
            if select.select([conn], [], [], 0)[0]:
                break  # the gateway answered before the body ended, as it should
            conn.sendall(piece)
        else:
            conn.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the gateway hung up on the rest of the body
    response = read_response(conn)
    assert response.status == 413
    # The upstream may have seen the start of the body, never a complete one.
    assert all("body_size" not in r for r in upstream.requests)


def test_an_oversize_upload_with_expect_100_continue_is_refused_before_the_body_is_sent(
    gw: GatewayServer, upstream: UpstreamApp, conn: socket.socket
) -> None:
    headers = [("Content-Length", str(LIMIT * 10)), ("Expect", "100-continue")]
    conn.sendall(request_bytes("PUT", "/upload", headers))
    first_bytes = b""
    while len(first_bytes) < 12 and (data := conn.recv(12 - len(first_bytes))):
        first_bytes += data
    assert first_bytes == b"HTTP/1.1 413", "no 100 Continue may invite the body first"
    assert upstream.requests == []


def test_an_expect_100_continue_upload_gets_100_then_its_answer(
    gw: GatewayServer, upstream: UpstreamApp, conn: socket.socket
) -> None:
    body = b"a" * 5000
    headers = [("Content-Length", str(len(body))), ("Expect", "100-continue")]
    conn.sendall(request_bytes("POST", "/upload", headers))
    interim = b""
    while b"\r\n\r\n" not in interim:
        interim += conn.recv(1024)
    assert interim.startswith(b"HTTP/1.1 100 ")
    conn.sendall(body)
    response = read_response(conn)
    assert response.status == 200
    record = upstream.requests[-1]
    assert record["body_size"] == len(body)
    assert "expect" not in {name for name, _ in record["headers"]}


def test_a_request_body_reaches_the_upstream_while_the_client_is_still_sending(
    gw: GatewayServer, upstream: UpstreamApp, conn: socket.socket
) -> None:
    conn.sendall(request_bytes("POST", "/upload", [("Transfer-Encoding", "chunked")]))
    conn.sendall(b"5\r\nfirst\r\n")
    eventually(
        lambda: upstream.requests and upstream.requests[-1].get("received") == 5,
        message="the first chunk did not reach the upstream before the body ended",
    )
    conn.sendall(b"6\r\nsecond\r\n0\r\n\r\n")
    response = read_response(conn)
    assert response.status == 200
    assert upstream.requests[-1]["body_size"] == 11


def test_a_response_reaches_the_client_while_the_upstream_is_still_sending(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    chunks = 4
    with gw.client() as client, client.stream("GET", f"/stream?chunks={chunks}&interval=0.3") as r:
        pieces = r.iter_raw()
        first = next(pieces)
        received_first = time.monotonic()
        upstream_progress = len(upstream.stream_events)
        rest = b"".join(pieces)
    assert first.startswith(b"chunk 0\n")
    assert upstream_progress < chunks
    last_sent = upstream.stream_events[-1][1]
    assert received_first < last_sent
    assert (first + rest).count(b"chunk") == chunks


def test_a_head_answer_has_headers_and_no_body(gw: GatewayServer, upstream: UpstreamApp) -> None:
    with gw.client() as client:
        get = client.get("/plain")
        head = client.head("/plain")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert upstream.requests[-1]["method"] == "HEAD"


def test_a_connection_stays_usable_after_a_head_answer(
    gw: GatewayServer, upstream: UpstreamApp, conn: socket.socket
) -> None:
    conn.sendall(request_bytes("HEAD", "/plain"))
    head = read_response(conn, head_only=True)
    assert head.status == 200 and head.body == b""
    conn.sendall(request_bytes("GET", "/after-head"))
    response = read_response(conn)
    assert response.status == 200
    assert json.loads(response.body)["path"] == "/after-head"


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_are_relayed_without_a_body(
    gw: GatewayServer, upstream: UpstreamApp, conn: socket.socket, status: int
) -> None:
    conn.sendall(request_bytes("GET", f"/status/{status}"))
    response = read_response(conn)
    assert response.status == status
    assert response.body == b""
    # Any stray body byte would corrupt the next answer on the same connection.
    conn.sendall(request_bytes("GET", "/next"))
    following = read_response(conn)
    assert following.status == 200
    assert json.loads(following.body)["path"] == "/next"


def test_upstream_connection_close_is_respected(gw: GatewayServer, upstream: UpstreamApp) -> None:
    with gw.client() as client:
        first = client.get("/close/1")
        second = client.get("/close/2")
    assert (first.status_code, second.status_code) == (200, 200)
    assert "connection" not in first.headers  # hop-by-hop: the client's connection stays
    assert len(upstream.peers) == 2, "the closed connection must not be reused"


def test_an_error_status_from_the_upstream_is_relayed_as_is(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    with gw.client() as client:
        response = client.get("/status/503")
    assert response.status_code == 503
    assert response.json() == {"status": 503}


def test_a_response_without_length_is_relayed_to_its_end(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    with gw.client() as client:
        response = client.get("/stream?chunks=3&interval=0")
    assert response.status_code == 200
    assert response.content == b"chunk 0\nchunk 1\nchunk 2\n"


def test_a_client_that_closes_mid_upload_does_not_break_the_gateway(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(request_bytes("POST", "/upload", [("Content-Length", "100000")]))
        sock.sendall(b"z" * 1000)
    eventually(lambda: upstream.requests and upstream.requests[-1].get("abandoned"))
    assert exchange(gw.port, request_bytes("GET", "/still-alive")).status == 200


def test_a_json_body_round_trips_unchanged(gw: GatewayServer, upstream: UpstreamApp) -> None:
    payload = json.dumps({"k": "v" * 1000, "n": list(range(100))}).encode()
    with gw.client() as client:
        response = client.post("/echo-body", content=payload)
    assert response.content == payload


def test_a_chunked_upload_round_trips_unchanged(gw: GatewayServer, upstream: UpstreamApp) -> None:
    parts = [bytes([i]) * (1000 + i) for i in range(20)]
    with gw.client() as client:
        response = client.post("/echo-body", content=iter(parts))
    assert response.status_code == 200
    assert response.content == b"".join(parts)


def test_httpx_sees_a_complete_streamed_download(gw: GatewayServer, upstream: UpstreamApp) -> None:
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        response = client.get("/big?size=3000000")
    assert len(response.content) == 3_000_000
