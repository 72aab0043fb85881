"""Active health checks against real local servers (127.0.0.1, ephemeral ports)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.upstream.health import ActiveHealthChecker, Probe, probe_for
from gateway.upstream.upstream import EndpointAddress


@dataclass
class Target:
    address: EndpointAddress
    healthy: bool = True


class HealthServer:
    """Answers every request according to ``mode``: a status code, close, hang or junk."""

    def __init__(self) -> None:
        self.mode = "200"
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, context: ssl.SSLContext | None = None) -> HealthServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def target(self, scheme: str = "http") -> Target:
        return Target(EndpointAddress.parse(f"{scheme}://127.0.0.1:{self.port}"))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            mode = self.mode
            if mode == "hang":
                await asyncio.sleep(3600)
            elif mode == "junk":
                writer.write(b"SSH-2.0-OpenSSH\r\n")
            elif mode != "close":
                body = b"x" * 100_000 if mode == "200-big" else b"ok"
                status = mode.split("-")[0]
                writer.write(
                    f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body
                )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    instance = await HealthServer().start()
    yield instance
    await instance.close()


@pytest.fixture
async def other_server() -> AsyncIterator[HealthServer]:
    instance = await HealthServer().start()
    yield instance
    await instance.close()


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(predicate: Callable[[], object], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def checker(targets: list[Target], **options: object) -> ActiveHealthChecker[Target]:
    settings: dict[str, object] = {
        "interval": 0.05,
        "timeout": 0.5,
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
    settings.update(options)
    return ActiveHealthChecker(targets, **settings)  # type: ignore[arg-type]


# -- what is probed -------------------------------------------------------------------

ADDRESS = EndpointAddress.parse("https://10.0.0.5:8443")


def test_probe_for_a_path() -> None:
    assert probe_for(ADDRESS, "/health") == Probe("10.0.0.5", 8443, True, "/health")
    assert probe_for(ADDRESS, "healthz").path == "/healthz"
    assert probe_for(ADDRESS, "/ready?full=1").path == "/ready?full=1"


def test_probe_for_an_absolute_url() -> None:
    probe = probe_for(ADDRESS, "http://10.0.0.5:9090/admin/health?x=1")
    assert probe == Probe("10.0.0.5", 9090, False, "/admin/health?x=1")
    assert probe_for(ADDRESS, "https://other.internal").port == 443
    assert probe_for(ADDRESS, "https://other.internal").path == "/"
    assert probe_for(ADDRESS, "http://[::1]:81/h").host_header == "[::1]:81"


def test_probe_for_rejects_what_cannot_be_probed() -> None:
    for bad in ("grpc://svc:50051/health", "http:///nohost", "/a b", "http://h:99999/"):
        with pytest.raises(ValueError):
            probe_for(ADDRESS, bad)


def test_probe_request_bytes() -> None:
    probe = Probe("api.internal", 80, False, "/health")
    assert probe.request() == (
        b"GET /health HTTP/1.1\r\nHost: api.internal\r\n"
        b"User-Agent: octopus-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    assert Probe("api.internal", 8080, False, "/").host_header == "api.internal:8080"
    assert Probe("api.internal", 443, True, "/").host_header == "api.internal"


# -- single probes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "passes"),
    [
        ("200", True),
        ("204", True),
        ("301", True),
        ("200-big", True),
        ("404", False),
        ("500", False),
        ("503", False),
        ("close", False),
        ("junk", False),
    ],
)
async def test_http_probe_verdicts(server: HealthServer, mode: str, passes: bool) -> None:
    server.mode = mode
    target = server.target()
    health = checker([target])
    assert await health.check(target) is passes
    assert (health.counters(target)[2] == "") is passes


async def test_http_probe_sends_a_proper_request(server: HealthServer) -> None:
    target = server.target()
    await checker([target], path="/status/live").check(target)
    head = server.requests[0]
    assert head.startswith(b"GET /status/live HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n".encode() in head
    assert b"\r\nConnection: close\r\n" in head


async def test_hanging_endpoint_fails_within_the_timeout(server: HealthServer) -> None:
    server.mode = "hang"
    target = server.target()
    health = checker([target], timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await health.check(target)
    assert loop.time() - started < 1.0
    assert "TimeoutError" in health.counters(target)[2]


async def test_refused_connection_fails() -> None:
    target = Target(EndpointAddress.parse(f"http://127.0.0.1:{refused_port()}"))
    health = checker([target])
    assert not await health.check(target)
    assert health.counters(target)[1] == 1


# -- thresholds -----------------------------------------------------------------------


async def test_thresholds_flip_once_each_way(server: HealthServer) -> None:
    target = server.target()
    changes: list[bool] = []
    health = checker(
        [target],
        healthy_threshold=2,
        unhealthy_threshold=3,
        on_change=lambda t, healthy: changes.append(healthy),
    )
    server.mode = "500"
    for expected in (True, True, False, False, False):
        await health.check(target)
        assert target.healthy is expected
    server.mode = "200"
    await health.check(target)
    assert not target.healthy  # one pass is not enough
    server.mode = "500"
    await health.check(target)  # a failure resets the passes
    server.mode = "200"
    await health.check(target)
    assert not target.healthy
    await health.check(target)
    assert target.healthy
    assert changes == [False, True]
    assert health.counters(target)[:2] == (2, 0)


async def test_failing_callback_does_not_stop_the_flip(
    server: HealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(target: Target, healthy: bool) -> None:
        raise RuntimeError("boom")

    server.mode = "500"
    target = server.target()
    with caplog.at_level(logging.ERROR, logger="octopus.health"):
        await checker([target], on_change=explode).check(target)
    assert not target.healthy
    assert "on_change callback failed" in caplog.text


# -- the periodic loop ----------------------------------------------------------------


async def test_loop_marks_unhealthy_then_healthy_again(server: HealthServer) -> None:
    target = server.target()
    changes: list[bool] = []
    health = checker(
        [target],
        healthy_threshold=2,
        unhealthy_threshold=2,
        on_change=lambda t, healthy: changes.append(healthy),
    )
    health.start()
    health.start()  # idempotent
    try:
        assert health.running
        server.mode = "500"
        await until(lambda: not target.healthy)
        server.mode = "200"
        await until(lambda: target.healthy)
    finally:
        await health.stop()
    assert changes == [False, True]
    assert not health.running
    seen = len(server.requests)
    await asyncio.sleep(0.15)
    assert len(server.requests) == seen  # stopped means stopped
    await health.stop()  # and stopping twice is fine


async def test_targets_are_probed_independently(
    server: HealthServer, other_server: HealthServer
) -> None:
    slow, fast = server.target(), other_server.target()
    server.mode = "hang"  # each probe of `slow` takes the full timeout
    other_server.mode = "500"
    health = checker([slow, fast], timeout=0.6)
    loop = asyncio.get_running_loop()
    started = loop.time()
    health.start()
    try:
        await until(lambda: not fast.healthy, timeout=0.5)
        assert loop.time() - started < 0.5  # not held up by the hanging probe
        assert slow.healthy
        await until(lambda: not slow.healthy, timeout=3.0)
    finally:
        await health.stop()


async def test_check_all_probes_every_target(
    server: HealthServer, other_server: HealthServer
) -> None:
    server.mode = "500"
    first, second = server.target(), other_server.target()
    await checker([first, second]).check_all()
    assert (first.healthy, second.healthy) == (False, True)


# -- tcp ------------------------------------------------------------------------------


async def test_tcp_check(server: HealthServer) -> None:
    server.mode = "500"  # irrelevant to a TCP check: nothing is sent
    up = server.target()
    down = Target(EndpointAddress.parse(f"http://127.0.0.1:{refused_port()}"))
    health = checker([up, down], kind="tcp")
    health.start()
    try:
        await until(lambda: not down.healthy)
        await until(lambda: server.connections >= 2)
        assert up.healthy
        assert server.requests == []
    finally:
        await health.stop()


# -- FARP endpoints.health ------------------------------------------------------------


async def test_farp_health_path_per_target(server: HealthServer) -> None:
    target = server.target()
    health = checker([target], health_path=lambda t: "/farp/health")
    assert await health.check(target)
    assert server.requests[0].startswith(b"GET /farp/health HTTP/1.1")


async def test_farp_health_absolute_url_probes_that_address(server: HealthServer) -> None:
    # The instance serves traffic on a port where nothing listens; its health URL
    # points at the management port.
    target = Target(EndpointAddress.parse(f"http://127.0.0.1:{refused_port()}"))
    url = f"http://127.0.0.1:{server.port}/manage/health?deep=1"
    health = checker([target], health_path=lambda t: url)
    assert await health.check(target)
    assert server.requests[0].startswith(b"GET /manage/health?deep=1 HTTP/1.1")


async def test_farp_health_unusable_falls_back_to_the_default_path(
    server: HealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    target = server.target()
    with caplog.at_level(logging.WARNING, logger="octopus.health"):
        health = checker([target], path="/health", health_path=lambda t: "grpc://x/health")
    assert "grpc://x/health" in caplog.text
    assert await health.check(target)
    assert server.requests[0].startswith(b"GET /health HTTP/1.1")


async def test_farp_health_none_uses_the_default_path(server: HealthServer) -> None:
    target = server.target()
    assert await checker([target], path="/up", health_path=lambda t: None).check(target)
    assert server.requests[0].startswith(b"GET /up HTTP/1.1")


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "1",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_probe(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    tls_server = await HealthServer().start(server_context)
    try:
        target = tls_server.target("https")
        trusting = ssl.create_default_context(cafile=str(cert))
        assert await checker([target], ssl_context=trusting).check(target)
        assert tls_server.requests[0].startswith(b"GET /health HTTP/1.1")
        # The default context verifies, and nobody vouches for this certificate.
        untrusting = checker([target])
        assert not await untrusting.check(target)
        assert (
            "SSL" in untrusting.counters(target)[2]
            or "certificate" in (untrusting.counters(target)[2])
        )
    finally:
        await tls_server.close()


# -- construction ---------------------------------------------------------------------


def test_from_settings() -> None:
    from settings.upstreams import HealthCheckSettings

    settings = HealthCheckSettings(type="tcp", path="/hc", interval=3, unhealthy_threshold=5)
    target = Target(ADDRESS)
    health = ActiveHealthChecker.from_settings([target], settings)
    assert (health.kind, health.path, health.interval, health.timeout) == ("tcp", "/hc", 3, 2)
    assert (health.healthy_threshold, health.unhealthy_threshold) == (2, 5)
    assert health.probes == (Probe("10.0.0.5", 8443, True, "/hc"),)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        ActiveHealthChecker([], kind="udp")
    with pytest.raises(ValueError):
        ActiveHealthChecker([], interval=0)
    with pytest.raises(ValueError):
        ActiveHealthChecker([], healthy_threshold=0)


async def test_check_rejects_a_foreign_target(server: HealthServer) -> None:
    with pytest.raises(ValueError):
        await checker([server.target()]).check(server.target())
