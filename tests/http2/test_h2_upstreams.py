"""HTTP/2 upstreams behind the gateway: h2c with prior knowledge and h2 over TLS (ALPN),
against real hypercorn servers."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from gateway.types import Receive, Scope, Send
from gateway.upstream.http2 import STREAM_WINDOW, H2Pool
from tests.http2.helpers import settled
from tests.http2.servers import H2App, HypercornServer
from tests.support.gateway import GatewayServer, MakeGateway, gateway_config, route
from tests.support.servers import ThreadedServer
from tests.support.waiting import eventually

MiB = 1024 * 1024
SIZE = 5 * MiB


def h2_config(url: str, **upstream: Any) -> dict[str, Any]:
    """A gateway forwarding every path to one HTTP/2 upstream."""
    section: dict[str, Any] = {"endpoints": [url], "retries": 0, **upstream}
    return gateway_config({"up": section}, [route("all", "/{rest:path}", "up")])


def header(record: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in record["headers"] if key == name]


def test_get_and_post_reach_an_h2c_upstream_over_http2(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url))
    with gw.client() as client:
        got = client.get("/items/7?full=1", headers={"X-Custom": "yes", "TE": "gzip"})
        posted = client.post("/items", json={"name": "octopus"})
    assert got.status_code == 200
    record = got.json()
    assert record["http_version"] == "2"
    assert (record["method"], record["path"], record["query"]) == ("GET", "/items/7", "full=1")
    assert header(record, "x-custom") == ["yes"]
    assert header(record, "host") == [f"127.0.0.1:{h2c.port}"]  # from :authority
    assert header(record, "via") == ["1.1 octopus"]
    assert header(record, "x-forwarded-for") == ["127.0.0.1"]
    names = {name for name, _ in record["headers"]}
    assert not names & {"connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
    assert got.headers["via"] == "1.1 octopus"
    assert got.headers["x-request-id"]

    assert posted.status_code == 200
    body = b'{"name":"octopus"}'
    assert posted.json()["method"] == "POST"
    assert posted.json()["body_size"] == len(body)
    assert posted.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert len(h2c.app.peers) == 1  # both requests on one connection


def test_an_h2_upstream_is_reached_over_tls_with_alpn_and_a_verified_certificate(
    make_gateway: MakeGateway, h2tls: HypercornServer, certificates: Path
) -> None:
    gw = make_gateway(h2_config(h2tls.url, tls={"ca": str(certificates / "ca.pem")}))
    with gw.client() as client:
        response = client.get("/secure")
    assert response.status_code == 200
    assert response.json()["server"] == "h2"
    assert response.json()["http_version"] == "2"


def test_an_h2_upstream_with_an_unknown_ca_gets_502(
    make_gateway: MakeGateway, h2tls: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2tls.url))
    with gw.client() as client:
        response = client.get("/secure")
    assert response.status_code == 502
    assert response.json()["error"] == "bad_gateway"
    assert h2tls.app.requests == []


def test_a_tls_upstream_that_does_not_negotiate_h2_gets_502(
    make_gateway: MakeGateway, certificates: Path
) -> None:
    app = H2App("http1-only")
    with HypercornServer(
        app,
        certfile=certificates / "server.pem",
        keyfile=certificates / "server.key",
        alpn=["http/1.1"],
    ) as server:
        gw = make_gateway(h2_config(server.url, tls={"ca": str(certificates / "ca.pem")}))
        with gw.client() as client:
            response = client.get("/anything")
    assert response.status_code == 502
    assert response.json()["message"] == "could not connect to the upstream"
    assert app.requests == []


def test_an_h2c_endpoint_that_speaks_only_http1_gets_502(make_gateway: MakeGateway) -> None:
    async def http1_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"http/1.1"})

    with ThreadedServer(http1_app, lifespan="off") as server:
        gw = make_gateway(h2_config(f"h2c://127.0.0.1:{server.port}", connect_timeout="2s"))
        with gw.client() as client:
            response = client.get("/anything")
    assert response.status_code == 502


def test_fifty_concurrent_requests_share_one_upstream_connection(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url))
    count = 50
    with (
        gw.client(limits=httpx.Limits(max_connections=count)) as client,
        ThreadPoolExecutor(count) as pool,
    ):
        # /gather answers only when all 50 are in flight at the upstream at once.
        responses = list(pool.map(lambda _: client.get(f"/gather?n={count}"), range(count)))
    assert [r.status_code for r in responses] == [200] * count
    assert len(h2c.app.requests) == count
    assert len(h2c.app.peers) == 1
    assert gw.pool("up").open_connections == 1


def test_streams_beyond_the_upstream_limit_open_another_connection(
    make_gateway: MakeGateway,
) -> None:
    app = H2App("limited")
    with HypercornServer(app, h2_max_concurrent_streams=5) as server:
        gw = make_gateway(h2_config(server.url))
        count = 12
        with (
            gw.client(limits=httpx.Limits(max_connections=count)) as client,
            ThreadPoolExecutor(count) as pool,
        ):
            responses = list(pool.map(lambda _: client.get(f"/gather?n={count}"), range(count)))
    assert [r.status_code for r in responses] == [200] * count
    assert len(app.peers) == 3  # 5 + 5 + 2 streams


def test_requests_queue_for_a_stream_when_connections_are_full(
    make_gateway: MakeGateway,
) -> None:
    app = H2App("queue")
    with HypercornServer(app, h2_max_concurrent_streams=2) as server:
        gw = make_gateway(h2_config(server.url, max_connections=1))
        count = 10
        with (
            gw.client(limits=httpx.Limits(max_connections=count)) as client,
            ThreadPoolExecutor(count) as pool,
        ):
            responses = list(pool.map(lambda i: client.get(f"/echo/{i}"), range(count)))
    assert [r.status_code for r in responses] == [200] * count
    assert len(app.peers) == 1


def test_a_5_mib_upload_streams_through_to_the_upstream(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url))
    piece = bytes(range(256)) * 256  # 64 KiB
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for index in range(SIZE // len(piece)):
            if index == 16:
                # The first MiB must reach the upstream before the client sends more:
                # the body is streamed, not collected first.
                eventually(lambda: h2c.app.received > 0, timeout=10)
            digest.update(piece)
            yield piece

    with gw.client() as client:
        response = client.post("/upload", content=body())
    assert response.status_code == 200
    assert response.json()["body_size"] == SIZE
    assert response.json()["body_sha256"] == digest.hexdigest()


def test_a_5_mib_download_streams_through(make_gateway: MakeGateway, h2c: HypercornServer) -> None:
    gw = make_gateway(h2_config(h2c.url))
    with gw.client() as client:
        response = client.get(f"/big?size={SIZE}")
    assert response.status_code == 200
    assert response.headers["content-length"] == str(SIZE)
    assert response.content == b"x" * SIZE


def test_a_slow_client_holds_the_upstream_back_by_flow_control(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url))
    # Well above what the kernel buffers between gateway and client absorb (~5 MB).
    size = 24 * MiB
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(20)
    with sock:
        sock.connect(("127.0.0.1", gw.port))
        sock.sendall(
            f"GET /big?size={size} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode()
        )
        got = len(sock.recv(64 * 1024))
        conn = eventually(lambda: next(iter(gw.pool("up").connections), None))
        # The client stops reading. The upstream must be held back on the wire by its
        # stream window (hypercorn itself buffers what its app sends, so the bytes the
        # gateway received are the measure), and the gateway must hold at most one
        # window of the response.
        stalled_at = settled(lambda: conn.received_bytes)
        assert stalled_at < size // 2
        streams = list(conn.streams.values())
        assert len(streams) == 1
        assert streams[0].buffered <= STREAM_WINDOW
        while chunk := sock.recv(1024 * 1024):
            got += len(chunk)
    assert got > size
    assert h2c.app.big_sent == size


def test_a_response_larger_than_the_default_window_arrives_whole(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url))
    size = 3 * 65_535 + 17
    with gw.client() as client:
        response = client.get(f"/big?size={size}")
        again = client.get(f"/big?size={size}")
    assert len(response.content) == size
    assert len(again.content) == size
    assert len(h2c.app.peers) == 1


def test_a_client_leaving_mid_response_resets_only_its_stream(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url))
    with gw.client() as client:
        with client.stream("GET", f"/big?size={SIZE}") as response:
            assert response.status_code == 200
            next(response.iter_raw())
        # The client closed its connection mid-body; the upstream stream was reset.
        eventually(
            lambda: not [s for c in gw.pool("up").connections for s in c.streams.values()],
            message="the abandoned stream was not released",
        )
    with gw.client() as client:
        assert client.get("/after").status_code == 200
    assert len(h2c.app.peers) == 1  # the connection survived the reset
    assert gw.pool("up").open_connections == 1


def test_head_and_bodiless_answers_keep_the_connection_usable(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url))
    with gw.client() as client:
        head = client.head(f"/big?size={SIZE}")
        after = client.get("/after-head")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(SIZE)
    assert head.content == b""
    assert after.status_code == 200
    assert len(h2c.app.peers) == 1


def test_a_timed_out_stream_is_reset_and_the_connection_lives_on(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url, timeout="300ms"))
    with gw.client() as client:
        stuck = client.get("/gather?n=2")  # the second never comes
        after = client.get("/after-timeout")
    assert stuck.status_code == 504
    assert after.status_code == 200
    assert len(h2c.app.peers) == 1
    assert gw.pool("up").open_connections == 1


def test_idle_connections_are_closed_after_the_idle_timeout(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw = make_gateway(h2_config(h2c.url, idle_timeout="200ms"))
    with gw.client() as client:
        assert client.get("/once").status_code == 200
    assert gw.pool("up").open_connections == 1
    eventually(lambda: gw.pool("up").open_connections == 0, timeout=5)
    with gw.client() as client:
        assert client.get("/twice").status_code == 200
    assert len(h2c.app.peers) == 2


def test_trailers_are_kept_on_the_stream(h2c: HypercornServer) -> None:
    """The stream keeps the trailers the upstream sent after the body."""

    async def fetch() -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        pool = H2Pool("127.0.0.1", h2c.port)
        stream, _ = await pool.acquire(5)
        head = f"GET /trailers HTTP/1.1\r\nhost: 127.0.0.1:{h2c.port}\r\nte: trailers\r\n\r\n"
        stream.start(head.encode())
        status, _ = await stream.read_head(5)
        body, more = b"", True
        while more:
            data, more = await stream.read_body(5)
            body += data
        pool.release(stream)
        await pool.close()
        return status, body, stream.trailers

    status, body, trailers = asyncio.run(fetch())
    assert status == 200
    assert body == b"body before trailers"
    assert trailers == [(b"x-checksum", b"abc123")]


def test_gateway_pool_for_an_h2c_endpoint_is_an_h2_pool(
    make_gateway: MakeGateway, h2c: HypercornServer
) -> None:
    gw: GatewayServer = make_gateway(h2_config(h2c.url))
    assert isinstance(gw.pool("up"), H2Pool)


async def _call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Drive the gateway ASGI app directly and collect what it sends."""
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _scope(port: int, *, extensions: dict[str, Any], te: bool) -> dict[str, Any]:
    headers = [(b"host", f"127.0.0.1:{port}".encode())]
    if te:
        headers.append((b"te", b"trailers"))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "2",
        "method": "GET",
        "scheme": "http",
        "path": "/trailers",
        "raw_path": b"/trailers",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", port),
        "extensions": extensions,
    }


def test_trailers_reach_a_client_that_asked_through_a_server_that_can_send_them(
    h2c: HypercornServer,
) -> None:
    from gateway.asgi import create_app

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        app = create_app({**h2_config(f"h2c://127.0.0.1:{h2c.port}"), "farp": {"enabled": False}})
        try:
            relayed = await _call(
                app, _scope(h2c.port, extensions={"http.response.trailers": {}}, te=True)
            )
            plain = await _call(app, _scope(h2c.port, extensions={}, te=True))
        finally:
            await app.gateway.shutdown()
        return relayed, plain

    relayed, plain = asyncio.run(run())
    assert relayed[0]["type"] == "http.response.start" and relayed[0]["trailers"] is True
    body = b"".join(m.get("body", b"") for m in relayed if m["type"] == "http.response.body")
    assert body == b"body before trailers"
    assert relayed[-1] == {
        "type": "http.response.trailers",
        "headers": [(b"x-checksum", b"abc123")],
        "more_trailers": False,
    }
    # Without the server extension nothing changes: no trailers promised, none sent.
    assert "trailers" not in plain[0]
    assert all(m["type"] != "http.response.trailers" for m in plain)
