"""Metric exporters behind a real gateway and upstream.

- ``influxdb-exporter`` writes to an in-test HTTP receiver (an ASGI app on a real
  uvicorn server) that records each write; the tests parse the line protocol back.
- ``dogstatsd-exporter`` sends to a real UDP socket bound by the test.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest

from gateway.extensions.loader import PluginError, build_plugin
from gateway.types import Receive, Scope, Send
from plugins.dogstatsd_exporter import sanitize_tag
from plugins.influxdb_exporter import LatencyHistogram, format_line
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamServer
from tests.support.waiting import eventually

# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[UpstreamServer]:
    with UpstreamServer("metrics") as server:
        yield server


class InfluxReceiver:
    """Records every write; answers 204, or the statuses queued in ``answers`` first."""

    def __init__(self) -> None:
        self.writes: list[dict[str, Any]] = []
        self.answers: deque[int] = deque()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = self.answers.popleft() if self.answers else 204
        self.writes.append(
            {
                "path": scope["path"],
                "query": {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()},
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "body": body.decode(),
                "status": status,
            }
        )
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def points(self, accepted_only: bool = True) -> list[Point]:
        return [
            parse_line(line)
            for write in list(self.writes)
            if write["status"] < 300 or not accepted_only
            for line in write["body"].splitlines()
            if line
        ]


@pytest.fixture
def influx() -> Iterator[tuple[InfluxReceiver, str]]:
    receiver = InfluxReceiver()
    with ThreadedServer(receiver, lifespan="off") as server:
        yield receiver, server.url


@pytest.fixture
def gateways() -> Iterator[Callable[..., GatewayServer]]:
    started: list[GatewayServer] = []

    def start(upstream: UpstreamServer, plugin: dict[str, Any]) -> GatewayServer:
        name = plugin["name"]
        settings = gateway_config(
            {"svc": upstream.url},
            [
                route("user", "/users/{id}", "svc", plugins=[name]),
                route("status", "/status/{code}", "svc", plugins=[name]),
            ],
            plugins=[plugin],
        )
        server = GatewayServer(settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- line protocol, parsed back as InfluxDB reads it ---------------------------------

Point = tuple[str, dict[str, str], dict[str, Any], int | None]


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside escapes and double-quoted strings."""
    parts, current, quoted, index = [], [], False, 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            current.append(text[index : index + 2])
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _field(raw: str) -> Any:
    if raw.startswith('"'):
        return _unescape(raw[1:-1])
    if raw.endswith("i"):
        return int(raw[:-1])
    if raw in ("true", "false"):
        return raw == "true"
    return float(raw)


def parse_line(line: str) -> Point:
    sections = _split(line, " ")
    assert len(sections) in (2, 3), line
    head = _split(sections[0], ",")
    tags = dict(tuple(_unescape(p) for p in _split(tag, "=")) for tag in head[1:])
    fields = {}
    for pair in _split(sections[1], ","):
        key, value = _split(pair, "=")
        fields[_unescape(key)] = _field(value)
    stamp = int(sections[2]) if len(sections) == 3 else None
    return _unescape(head[0]), tags, fields, stamp


def counts(points: list[Point]) -> Counter[tuple[str, str, str]]:
    total: Counter[tuple[str, str, str]] = Counter()
    for _, tags, fields, _ in points:
        total[(tags["route"], tags["method"], tags["status_class"])] += fields["count"]
    return total


def influx_plugin(url: str, **config: Any) -> dict[str, Any]:
    return {"name": "influxdb-exporter", "config": {"url": url, "interval": "100ms", **config}}


# --- influxdb-exporter --------------------------------------------------------------


def test_influx_writes_one_point_per_route_method_and_status_class(
    influx: tuple[InfluxReceiver, str],
    upstream_server: UpstreamServer,
    gateways: Callable[..., GatewayServer],
) -> None:
    receiver, url = influx
    gateway = gateways(upstream_server, influx_plugin(f"{url}/api/v2/write?org=o&bucket=b"))
    with gateway.client() as client:
        for index in range(3):
            assert client.get(f"/users/{index}").status_code == 200
        for _ in range(2):
            assert client.get("/status/404").status_code == 404
        assert client.post("/status/500").status_code == 500
    expected = {
        ("/users/{id}", "GET", "2xx"): 3,
        ("/status/{code}", "GET", "4xx"): 2,
        ("/status/{code}", "POST", "5xx"): 1,
    }
    eventually(lambda: counts(receiver.points()) == expected, message=str(receiver.writes))
    for measurement, _, fields, _ in receiver.points():
        assert measurement == "octopus_requests"
        assert fields["duration_count"] == fields["count"]
        assert fields["duration_mean_ms"] == pytest.approx(
            fields["duration_sum_ms"] / fields["count"], abs=0.01
        )
        assert 0 <= fields["duration_p50_ms"] <= fields["duration_p99_ms"]
        assert fields["duration_p99_ms"] <= fields["duration_max_ms"]


def test_influx_v2_write_sends_the_token_and_keeps_org_and_bucket_adding_precision(
    influx: tuple[InfluxReceiver, str],
    upstream_server: UpstreamServer,
    gateways: Callable[..., GatewayServer],
) -> None:
    receiver, url = influx
    plugin = influx_plugin(f"{url}/api/v2/write?org=acme&bucket=gw", token="s3cr3t")
    gateway = gateways(upstream_server, plugin)
    with gateway.client() as client:
        assert client.get("/users/1").status_code == 200
    write = eventually(lambda: receiver.writes and receiver.writes[0])
    assert write["path"] == "/api/v2/write"
    assert write["query"] == {"org": "acme", "bucket": "gw", "precision": "s"}
    assert write["headers"]["authorization"] == "Token s3cr3t"
    assert write["headers"]["content-type"].startswith("text/plain")
    [(_, _, _, stamp)] = receiver.points()
    assert stamp is not None and abs(stamp - time.time()) < 60


def test_influx_v1_write_with_millisecond_precision_gets_millisecond_timestamps(
    influx: tuple[InfluxReceiver, str],
    upstream_server: UpstreamServer,
    gateways: Callable[..., GatewayServer],
) -> None:
    receiver, url = influx
    gateway = gateways(upstream_server, influx_plugin(f"{url}/write?db=octopus&precision=ms"))
    with gateway.client() as client:
        assert client.get("/users/1").status_code == 200
    points = eventually(receiver.points)
    assert receiver.writes[0]["query"] == {"db": "octopus", "precision": "ms"}
    stamp = points[0][3]
    assert stamp is not None and abs(stamp - time.time() * 1000) < 60_000


def test_influx_points_carry_constant_tags_and_a_per_process_instance_tag(
    influx: tuple[InfluxReceiver, str],
    upstream_server: UpstreamServer,
    gateways: Callable[..., GatewayServer],
) -> None:
    receiver, url = influx
    plugin = influx_plugin(f"{url}/write?db=x", tags={"region": "eu west", "tier": "edge"})
    gateway = gateways(upstream_server, plugin)
    with gateway.client() as client:
        assert client.get("/users/1").status_code == 200
    [(_, tags, _, _)] = eventually(receiver.points)
    assert tags["region"] == "eu west"
    assert tags["tier"] == "edge"
    assert tags["instance"].endswith(f"-{os.getpid()}")


def test_influx_a_failed_write_is_sent_again_with_the_next_one(
    influx: tuple[InfluxReceiver, str],
    upstream_server: UpstreamServer,
    gateways: Callable[..., GatewayServer],
) -> None:
    receiver, url = influx
    receiver.answers.extend([503])
    gateway = gateways(upstream_server, influx_plugin(f"{url}/write?db=x"))
    with gateway.client() as client:
        for index in range(4):
            assert client.get(f"/users/{index}").status_code == 200
    eventually(lambda: counts(receiver.points()) == {("/users/{id}", "GET", "2xx"): 4})
    refused = [w for w in receiver.writes if w["status"] == 503]
    assert refused, "the first write was not refused"
    retried = receiver.writes[receiver.writes.index(refused[0]) + 1]
    assert refused[0]["body"] in retried["body"]


def test_influx_stopping_the_gateway_writes_the_last_window(
    influx: tuple[InfluxReceiver, str], upstream_server: UpstreamServer
) -> None:
    receiver, url = influx
    settings = gateway_config(
        {"svc": upstream_server.url},
        [route("user", "/users/{id}", "svc", plugins=["influxdb-exporter"])],
        plugins=[influx_plugin(f"{url}/write?db=x", interval="60s")],
    )
    with GatewayServer(settings) as gateway, gateway.client() as client:
        for index in range(2):
            assert client.get(f"/users/{index}").status_code == 200
        assert receiver.writes == []
    assert counts(receiver.points()) == {("/users/{id}", "GET", "2xx"): 2}


def test_line_protocol_escapes_commas_equals_and_spaces_in_names_and_tags() -> None:
    tags = {"route": "/a b,c=d", "odd key=": "v", "empty": ""}
    fields = {"count": 3, "note": 'say "hi" \\ bye', "ratio": 0.5, "ok": True}
    line = format_line("my m,x", tags, fields, 1700000000)
    assert "\n" not in line
    measurement, parsed_tags, parsed_fields, stamp = parse_line(line)
    assert measurement == "my m,x"
    assert parsed_tags == {"route": "/a b,c=d", "odd key=": "v"}  # no empty tag values
    assert parsed_fields == fields
    assert stamp == 1700000000


def test_line_protocol_replaces_newlines_in_tag_values() -> None:
    line = format_line("m", {"route": "/a\nb"}, {"count": 1})
    assert "\n" not in line
    assert parse_line(line)[1] == {"route": "/a b"}


def test_latency_quantiles_come_from_the_histogram_within_a_bucket() -> None:
    histogram = LatencyHistogram()
    for ms in range(1, 101):
        histogram.observe(float(ms))
    assert histogram.count == 100
    assert histogram.max == 100.0
    assert 20 <= histogram.quantile(0.5) <= 100  # the 50 ms bucket spans (20, 50]
    assert histogram.quantile(0.5) == pytest.approx(50.0, abs=30)
    assert 50 <= histogram.quantile(0.99) <= 100
    assert histogram.quantile(0.5) <= histogram.quantile(0.99)


@pytest.mark.parametrize(
    "url", ["ftp://influx:8086/write?db=x", "http://influx:8086/write?db=x&precision=years"]
)
def test_influx_bad_write_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(PluginError, match=r"config\.url"):
        build_plugin(Entry("influxdb-exporter", {"url": url}))


# --- dogstatsd-exporter ---------------------------------------------------------------


class UdpReceiver:
    """A real UDP socket on 127.0.0.1 collecting datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []

    def poll(self) -> list[bytes]:
        """Read whatever arrived (never blocks longer than the socket timeout)."""
        while True:
            try:
                self.datagrams.append(self.sock.recv(65535))
            except TimeoutError:
                return self.datagrams

    def lines(self) -> list[str]:
        return [line for d in self.poll() for line in d.decode().split("\n")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp() -> Iterator[UdpReceiver]:
    receiver = UdpReceiver()
    yield receiver
    receiver.close()


def statsd_plugin(port: int, **config: Any) -> dict[str, Any]:
    return {
        "name": "dogstatsd-exporter",
        "config": {"host": "127.0.0.1", "port": port, "flush_interval": "50ms", **config},
    }


STATSD_LINE = re.compile(r"^(?P<name>[\w.]+):(?P<value>[\d.]+)\|(?P<type>c|ms|h|d)\|#(?P<tags>.+)$")


def test_statsd_each_request_sends_a_counter_and_a_timing_tagged_by_route_method_status(
    udp: UdpReceiver, upstream_server: UpstreamServer, gateways: Callable[..., GatewayServer]
) -> None:
    gateway = gateways(upstream_server, statsd_plugin(udp.port, tags={"env": "test"}))
    with gateway.client() as client:
        assert client.get("/users/7").status_code == 200
    lines = eventually(lambda: len(udp.lines()) >= 2 and udp.lines())
    tags = "route:/users/{id},method:GET,status:200,env:test"
    assert lines[0] == f"octopus.requests:1|c|#{tags}"
    timing = STATSD_LINE.match(lines[1])
    assert timing is not None, lines[1]
    assert (timing["name"], timing["type"], timing["tags"]) == (
        "octopus.request.duration",
        "ms",
        tags,
    )
    assert 0 <= float(timing["value"]) < 5000


def test_statsd_datagrams_stay_within_max_packet_size_and_never_split_a_line(
    udp: UdpReceiver, upstream_server: UpstreamServer, gateways: Callable[..., GatewayServer]
) -> None:
    plugin = statsd_plugin(udp.port, max_packet_size=300, flush_interval="60s")
    gateway = gateways(upstream_server, plugin)
    with gateway.client() as client:
        for index in range(30):
            assert client.get(f"/users/{index}").status_code == 200
    # Full datagrams leave as soon as the next line would not fit, without the interval.
    eventually(lambda: len(udp.poll()) >= 10, message="full datagrams were not sent")
    gateway.stop()
    datagrams = udp.poll()
    assert all(len(d) <= 300 for d in datagrams), [len(d) for d in datagrams]
    lines = [line for d in datagrams for line in d.decode().split("\n")]
    assert all(STATSD_LINE.match(line) for line in lines), lines
    assert sum(1 for line in lines if line.startswith("octopus.requests:1|c")) == 30


def test_statsd_prefix_and_histogram_timing_type(
    udp: UdpReceiver, upstream_server: UpstreamServer, gateways: Callable[..., GatewayServer]
) -> None:
    plugin = statsd_plugin(udp.port, prefix="edge.gw", duration_type="h", tags=["canary"])
    gateway = gateways(upstream_server, plugin)
    with gateway.client() as client:
        assert client.get("/status/404").status_code == 404
    lines = eventually(lambda: len(udp.lines()) >= 2 and udp.lines())
    assert lines[0] == "edge.gw.requests:1|c|#route:/status/{code},method:GET,status:404,canary"
    assert re.match(r"^edge\.gw\.request\.duration:[\d.]+\|h\|#route:/status/", lines[1])


def test_statsd_without_an_agent_listening_requests_still_succeed(
    upstream_server: UpstreamServer, gateways: Callable[..., GatewayServer]
) -> None:
    closed = UdpReceiver()
    port = closed.port
    closed.close()  # nothing listens there now: the kernel answers port unreachable
    gateway = gateways(upstream_server, statsd_plugin(port, flush_interval="20ms"))
    exporter = gateway.gateway.plugins.by_name["dogstatsd-exporter"]
    with gateway.client() as client:
        for index in range(5):
            started = time.perf_counter()
            assert client.get(f"/users/{index}").status_code == 200
            assert time.perf_counter() - started < 1.0
        eventually(lambda: exporter.datagrams >= 1, message="nothing was sent")
        for index in range(5):
            assert client.get(f"/users/{index}").status_code == 200
    eventually(lambda: exporter.send_errors >= 1, message="the refusal was not noticed")


def test_statsd_tag_values_lose_reserved_characters() -> None:
    assert sanitize_tag("a|b,c#d e\nf") == "a_b_c_d_e_f"
    assert sanitize_tag("/users/{id}:x") == "/users/{id}:x"


class Entry:
    """A ``plugins:`` entry for a built-in plugin."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.module = None
        self.path = None
        self.config = config
