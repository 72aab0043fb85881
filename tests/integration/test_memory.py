"""Large bodies stream through the gateway in bounded memory.

The gateway runs as its own process (``uvicorn gateway.asgi:app``) so its memory can
be read from ``/proc``; the peak RSS (``VmHWM``) is reset before each transfer.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess, gateway_config, route
from tests.support.raw import read_response, request_bytes
from tests.support.upstream import UpstreamApp, UpstreamServer
from tests.support.waiting import eventually

MiB = 1024 * 1024
SIZE = 50 * MiB
#: Far below the body size: the gateway must not hold a body in memory.
MAX_GROWTH_KIB = 30 * 1024


@pytest.fixture(scope="module")
def gateway_process(
    upstream_server: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    config = gateway_config(
        {"main": upstream_server.url},
        [route("all", "/{rest:path}", "main")],
        server={"max_body_size": "100MiB"},
        observability={"logging": {"access_log": False}},
    )
    with GatewayProcess(config, tmp_path_factory.mktemp("memory")) as process:
        # Warm up: imports, pools and buffers that every request needs.
        for _ in range(3):
            upload(process.port, 2 * MiB)
            download(process.port, 2 * MiB)
        yield process


@pytest.fixture
def peak_growth(gateway_process: GatewayProcess) -> Callable[[], int]:
    """Resets the peak RSS now; calling the result gives the growth since, in KiB."""
    clear_refs = Path(f"/proc/{gateway_process.proc.pid}/clear_refs")
    clear_refs.write_text("5")  # "5" resets VmHWM to the current RSS
    baseline = gateway_process.memory_kib()["VmRSS"]
    return lambda: gateway_process.memory_kib()["VmHWM"] - baseline


def upload(port: int, size: int) -> bytes:
    block = b"u" * (256 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_bytes("POST", "/upload", [("Content-Length", str(size))]))
        left = size
        while left:
            piece = block[: min(left, len(block))]
            sock.sendall(piece)
            left -= len(piece)
        response = read_response(sock)
    assert response.status == 200, response.body
    return response.body


def download(port: int, size: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_bytes("GET", f"/big?size={size}", [("Connection", "close")]))
        return drain(sock)


def drain(sock: socket.socket) -> int:
    received = 0
    while data := sock.recv(1024 * 1024):
        received += len(data)
    return received


def settled(read: Callable[[], int], *, quiet: float = 0.3, timeout: float = 10.0) -> int:
    """The value of ``read()`` once it has stopped changing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the value never settled"
        time.sleep(0.02)
        current = read()
        if current != value:
            value, since = current, time.monotonic()
    return value


def test_a_50_mib_upload_streams_through_in_bounded_memory(
    gateway_process: GatewayProcess, upstream: UpstreamApp, peak_growth: Callable[[], int]
) -> None:
    upload(gateway_process.port, SIZE)
    assert upstream.requests[-1]["body_size"] == SIZE
    assert peak_growth() < MAX_GROWTH_KIB


def test_a_50_mib_download_streams_through_in_bounded_memory(
    gateway_process: GatewayProcess, upstream: UpstreamApp, peak_growth: Callable[[], int]
) -> None:
    received = download(gateway_process.port, SIZE)
    assert received > SIZE  # the body plus the response head
    assert peak_growth() < MAX_GROWTH_KIB


def test_a_slow_reader_does_not_make_the_gateway_buffer_the_response(
    gateway_process: GatewayProcess, upstream: UpstreamApp, peak_growth: Callable[[], int]
) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(30)
    with sock:
        sock.connect(("127.0.0.1", gateway_process.port))
        sock.sendall(request_bytes("GET", f"/big?size={SIZE}", [("Connection", "close")]))
        got = len(sock.recv(64 * 1024))
        eventually(lambda: upstream.big_sent > 0)
        # The client now stops reading. The upstream must be held back by the gateway
        # (flow control end to end), not drained into the gateway's memory.
        stalled_at = settled(lambda: upstream.big_sent)
        assert stalled_at < 16 * MiB
        assert peak_growth() < MAX_GROWTH_KIB
        got += drain(sock)
    assert got > SIZE
    assert upstream.big_sent == SIZE
