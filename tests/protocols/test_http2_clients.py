"""HTTP/2 clients through ``octopus run --server granian`` (issue 6 item 6): TLS with
ALPN (httpx ``http2=True``) and cleartext h2c with prior knowledge (``h2load`` and a raw
``h2`` client), including streamed responses, bodies without a length and many
concurrent streams. Which server speaks what: uvicorn HTTP/1.1 and WebSocket; granian
HTTP/1.1, HTTP/2 (h2c and ALPN) and WebSocket."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from tests.e2e.helpers import GatewayProcess, minimal_config, start_gateway
from tests.support.upstream import UpstreamApp, UpstreamServer

_ORIGIN = re.compile(r"https?://[0-9.]+:[0-9]+")


def origin(gateway: GatewayProcess) -> str:
    """The data URL (the announcement line can share its line with a log record)."""
    found = _ORIGIN.match(gateway.data_url)
    assert found is not None, gateway.data_url
    return found.group(0)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[UpstreamServer]:
    with UpstreamServer("h2-upstream") as server:
        yield server


@pytest.fixture
def upstream(upstream_server: UpstreamServer) -> UpstreamApp:
    upstream_server.app.reset()
    return upstream_server.app


def _start(config: dict[str, object]) -> GatewayProcess:
    return start_gateway(config, "--server", "granian")


@pytest.fixture(scope="module")
def tls_gateway(
    upstream_server: UpstreamServer, certificate: tuple[Path, Path]
) -> Iterator[GatewayProcess]:
    cert, key = certificate
    tls = {"enabled": True, "cert": str(cert), "key": str(key)}
    gateway = _start(minimal_config(upstream_server.url, tls=tls))
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def h2c_gateway(upstream_server: UpstreamServer) -> Iterator[GatewayProcess]:
    gateway = _start(minimal_config(upstream_server.url))
    try:
        yield gateway
    finally:
        gateway.stop()


# --- TLS + ALPN (httpx) ---------------------------------------------------------------


def test_alpn_negotiates_http2_and_the_request_is_proxied(
    tls_gateway: GatewayProcess, upstream: UpstreamApp
) -> None:
    with httpx.Client(http2=True, verify=False, timeout=10) as client:
        response = client.get(origin(tls_gateway) + "/over/h2?x=1")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == "/over/h2" and seen["query"] == "x=1"
    headers = dict(seen["headers"])
    assert headers["x-forwarded-proto"] == "https"
    assert response.headers["x-request-id"]


def test_many_concurrent_streams_on_one_connection(
    tls_gateway: GatewayProcess, upstream: UpstreamApp
) -> None:
    """50 requests that each take 300 ms upstream, all at once over one HTTP/2
    connection: they overlap, so the whole batch takes about one of them."""

    async def run() -> tuple[list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(http2=True, verify=False, timeout=20, limits=limits) as client:
            started = time.monotonic()
            responses = await asyncio.gather(
                *(client.get(f"{origin(tls_gateway)}/slow/{i}?delay=0.3") for i in range(50))
            )
            return responses, time.monotonic() - started

    responses, elapsed = asyncio.run(run())
    assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in responses)
    assert sorted(r.json()["path"] for r in responses) == sorted(f"/slow/{i}" for i in range(50))
    assert elapsed < 5.0  # one after another would take 15 s
    assert upstream.max_in_flight > 10


def test_a_streamed_response_arrives_incrementally_over_h2(
    tls_gateway: GatewayProcess, upstream: UpstreamApp
) -> None:
    arrivals: list[tuple[float, bytes]] = []
    with (
        httpx.Client(http2=True, verify=False, timeout=10) as client,
        client.stream("GET", origin(tls_gateway) + "/stream?chunks=4&interval=0.3") as response,
    ):
        assert response.http_version == "HTTP/2"
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic(), chunk))
    assert b"".join(c for _, c in arrivals) == b"".join(f"chunk {i}\n".encode() for i in range(4))
    assert_incremental(arrivals, upstream)


def test_request_bodies_go_up_over_h2(tls_gateway: GatewayProcess, upstream: UpstreamApp) -> None:
    body = bytes(range(256)) * 400  # 100 KiB, several DATA frames and window updates
    with httpx.Client(http2=True, verify=False, timeout=10) as client:
        response = client.post(origin(tls_gateway) + "/echo-body", content=body)
    assert response.http_version == "HTTP/2"
    assert response.content == body


# --- h2c with prior knowledge ---------------------------------------------------------


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_h2load_over_h2c_prior_knowledge_all_succeed(
    h2c_gateway: GatewayProcess, upstream: UpstreamApp
) -> None:
    result = subprocess.run(
        ["h2load", "-n", "200", "-c", "4", "-m", "10", origin(h2c_gateway) + "/h2load"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Application protocol: h2c" in result.stdout
    assert "requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed" in result.stdout
    assert "status codes: 200 2xx" in result.stdout
    assert len([p for p in upstream.paths if p == "/h2load"]) == 200


def test_h2c_streamed_response_arrives_incrementally(
    h2c_gateway: GatewayProcess, upstream: UpstreamApp
) -> None:
    status, arrivals = h2c_request(h2c_gateway, "GET", "/stream?chunks=4&interval=0.3")
    assert status == 200
    assert b"".join(c for _, c in arrivals) == b"".join(f"chunk {i}\n".encode() for i in range(4))
    assert_incremental(arrivals, upstream)


def test_h2c_body_without_content_length(
    h2c_gateway: GatewayProcess, upstream: UpstreamApp
) -> None:
    """HTTP/2 frames the body itself; the proxy sends it upstream chunked."""
    body = b"0123456789abcdef" * 3000  # 48 000 bytes in three DATA frames
    status, arrivals = h2c_request(h2c_gateway, "POST", "/echo-body", body=body)
    assert status == 200
    assert b"".join(c for _, c in arrivals) == body


def assert_incremental(arrivals: list[tuple[float, bytes]], upstream: UpstreamApp) -> None:
    """Each chunk reached the client before the upstream had sent the next one, so
    nothing on the way (granian, the gateway, HTTP/2 framing) held it back."""
    sent = [at for _, at in upstream.stream_events]
    assert len(sent) == 4
    received = b""
    for at, chunk in arrivals:
        received += chunk
        complete = received.count(b"\n")  # whole chunks in hand at this moment
        if complete < len(sent):
            assert at < sent[complete], (complete, at - sent[complete - 1])


def h2c_request(
    gateway: GatewayProcess, method: str, path: str, body: bytes | None = None
) -> tuple[int, list[tuple[float, bytes]]]:
    """One request over cleartext HTTP/2 with prior knowledge (no Upgrade, no ALPN):
    the status and the DATA payloads with their arrival times."""
    host, port = origin(gateway).split("://", 1)[1].split(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    headers = [(":method", method), (":path", path), (":scheme", "http")]
    headers.append((":authority", f"{host}:{port}"))
    conn.send_headers(stream_id, headers, end_stream=body is None)
    if body is not None:
        size = conn.max_outbound_frame_size
        for offset in range(0, len(body), size):
            last = offset + size >= len(body)
            conn.send_data(stream_id, body[offset : offset + size], end_stream=last)
    status = 0
    arrivals: list[tuple[float, bytes]] = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        ended = False
        while not ended:
            data = sock.recv(65536)
            if not data:
                raise AssertionError("connection closed before the stream ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    arrivals.append((time.monotonic(), event.data))
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {event.error_code}")
            sock.sendall(conn.data_to_send())
    return status, arrivals
