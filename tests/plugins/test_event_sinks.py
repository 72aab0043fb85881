"""Event sinks (``kafka-events``, ``redis-events``) behind a real gateway and upstream.

One battery runs against both sinks through the same plugin code path (queue,
batching, encoding, transport):

- ``redis``: the real ``RedisStreamTransport`` against a real ``redis-server`` started by
  the tests (killed, restarted and SIGSTOPped to make it unreachable or dead);
- ``kafka``: no Kafka broker runs on our machines, so the Kafka plugin runs with an
  in-memory transport behind the same ``send_batch(events)`` interface, which stores
  the records made by the plugin's own encoder (``encode_record``). The aiokafka
  transport itself is tested only for construction and configuration errors, and for
  keeping requests fast against a port where no broker listens.

Batch sizes are observed by a recording wrapper around the transport (it forwards
every call), never by replacing the sink's queue.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.extensions.loader import PluginError, build_plugin
from plugins.api import RequestContext, Response
from plugins.events import Event, EventSink, EventTransport
from plugins.kafka_events import (
    AiokafkaTransport,
    KafkaEventsConfig,
    KafkaEventsPlugin,
    MissingDependencyError,
    encode_record,
    producer_options,
)
from plugins.redis_events import EVENT_FIELD, RedisEventsPlugin
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.redis_server import RedisServer
from tests.support.servers import free_port
from tests.support.upstream import UpstreamServer
from tests.support.waiting import eventually

THIS = "tests.plugins.test_event_sinks"
STREAM = "octopus:events"


# --- transports under test -----------------------------------------------------------


class MemoryKafkaTransport:
    """Stands in for the broker: keeps the Kafka records the plugin's encoder makes.

    ``mode``: ``up``; ``down`` (connections refused); ``dead`` (sends never return).
    """

    #: Mode of the next transport created (set before the gateway starts).
    next_mode = "up"

    def __init__(self, config: KafkaEventsConfig) -> None:
        self.config = config
        self.mode = MemoryKafkaTransport.next_mode
        self.records: list[tuple[bytes | None, bytes]] = []

    async def prepare(self) -> None:
        return None

    async def open(self) -> None:
        if self.mode == "down":
            raise ConnectionRefusedError("broker down")

    async def send_batch(self, events: list[Event]) -> None:
        if self.mode == "dead":
            await asyncio.Event().wait()
        if self.mode == "down":
            raise ConnectionRefusedError("broker down")
        self.records.extend(encode_record(event, self.config.key) for event in events)

    async def close(self) -> None:
        return None


class Recording:
    """Forwards to a transport and records the size of every batch it delivered."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[int] = []

    async def prepare(self) -> None:
        await self.inner.prepare()

    async def open(self) -> None:
        await self.inner.open()

    async def send_batch(self, events: list[Event]) -> None:
        await self.inner.send_batch(events)
        self.batches.append(len(events))

    async def close(self) -> None:
        await self.inner.close()


class MemoryKafkaEvents(KafkaEventsPlugin):
    def make_transport(self) -> EventTransport:
        return Recording(MemoryKafkaTransport(self.config))


class RecordingRedisEvents(RedisEventsPlugin):
    def make_transport(self) -> EventTransport:
        return Recording(super().make_transport())


# --- harnesses: one battery, two sinks -------------------------------------------------


class Harness:
    """What the battery needs from a sink: its plugin entry, what it received, and ways
    to make it unreachable (refusing) or dead (accepting, never answering)."""

    name = ""
    plugin_class = ""

    def __init__(self) -> None:
        self.gateway: GatewayServer | None = None

    def entry(self, **config: Any) -> dict[str, Any]:
        return {"name": self.name, "module": f"{THIS}:{self.plugin_class}", "config": config}

    @property
    def plugin(self) -> Any:
        assert self.gateway is not None
        return self.gateway.gateway.plugins.by_name[self.name]

    @property
    def sink(self) -> EventSink:
        return self.plugin.sink

    def batches(self) -> list[int]:
        return list(self.sink.transport.batches)  # type: ignore[attr-defined]

    def events(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def down_before_start(self) -> None:
        raise NotImplementedError

    def back_up(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class KafkaHarness(Harness):
    name = "kafka-events"
    plugin_class = "MemoryKafkaEvents"

    def entry(self, **config: Any) -> dict[str, Any]:
        return super().entry(bootstrap_servers="127.0.0.1:9", topic="requests", **config)

    @property
    def memory(self) -> MemoryKafkaTransport:
        return self.sink.transport.inner  # type: ignore[attr-defined]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(value) for _, value in list(self.memory.records)]

    def down_before_start(self) -> None:
        MemoryKafkaTransport.next_mode = "down"

    def back_up(self) -> None:
        self.memory.mode = "up"

    def kill(self) -> None:
        self.memory.mode = "dead"


class RedisHarness(Harness):
    name = "redis-events"
    plugin_class = "RecordingRedisEvents"

    def __init__(self, server: RedisServer) -> None:
        super().__init__()
        self.server = server

    def entry(self, **config: Any) -> dict[str, Any]:
        return super().entry(redis_url=self.server.url, **config)

    def events(self) -> list[dict[str, Any]]:
        with self.server.client() as client:
            entries = client.xrange(STREAM)
        return [json.loads(fields[EVENT_FIELD.encode()]) for _, fields in entries]

    def down_before_start(self) -> None:
        self.server.kill()

    def back_up(self) -> None:
        self.server.start()

    def kill(self) -> None:
        pause(self.server)


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[UpstreamServer]:
    with UpstreamServer("events") as server:
        yield server


def pause(server: RedisServer) -> None:
    """SIGSTOP: the kernel still accepts connections, nothing is ever answered."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)


def resume(server: RedisServer) -> None:
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server(redis_process: RedisServer) -> Iterator[RedisServer]:
    """The module's Redis (``redis_process``, from conftest): running, answering (a test
    may have SIGSTOPped it) and empty for each test."""
    resume(redis_process)
    if not redis_process.running:
        redis_process.start()
    redis_process.flush()
    yield redis_process
    resume(redis_process)


@pytest.fixture(params=["kafka", "redis"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    MemoryKafkaTransport.next_mode = "up"
    sink: Harness
    if request.param == "kafka":
        sink = KafkaHarness()
    else:
        sink = RedisHarness(request.getfixturevalue("redis_server"))
    yield sink
    if sink.gateway is not None:
        sink.gateway.stop()
    MemoryKafkaTransport.next_mode = "up"


def start_gateway(harness: Harness, upstream: UpstreamServer, **config: Any) -> GatewayServer:
    settings = gateway_config(
        {"users": upstream.url},
        [route("user", "/users/{id}", "users", plugins=[harness.name])],
        plugins=[harness.entry(**config)],
    )
    harness.gateway = GatewayServer(settings).start()
    return harness.gateway


def stop_gateway(harness: Harness) -> None:
    assert harness.gateway is not None
    harness.gateway.stop()


# --- the battery ----------------------------------------------------------------------


def test_each_request_becomes_one_event_with_the_documented_shape(
    harness: Harness, upstream_server: UpstreamServer
) -> None:
    gateway = start_gateway(harness, upstream_server, flush_interval="50ms")
    with gateway.client() as client:
        response = client.get("/users/42?x=1")
    assert response.status_code == 200
    [event] = eventually(harness.events, message="no event arrived")
    assert set(event) == {
        "timestamp",
        "request_id",
        "method",
        "path",
        "route",
        "upstream",
        "status",
        "duration_ms",
        "client_ip",
        "bytes",
    }
    assert event["request_id"] == response.headers["x-request-id"]
    assert (event["method"], event["path"], event["route"]) == ("GET", "/users/42", "/users/{id}")
    assert (event["upstream"], event["status"]) == ("users", 200)
    assert event["client_ip"] == "127.0.0.1"
    assert event["bytes"] == int(response.headers["content-length"])
    assert 0 <= event["duration_ms"] < 5000
    stamp = datetime.fromisoformat(event["timestamp"])
    assert abs(stamp.timestamp() - time.time()) < 60


def test_full_batches_go_out_at_once_and_never_exceed_batch_size(
    harness: Harness, upstream_server: UpstreamServer
) -> None:
    gateway = start_gateway(harness, upstream_server, batch_size=5, flush_interval="60s")
    with gateway.client() as client:
        for index in range(12):
            assert client.get(f"/users/{index}").status_code == 200
    # Two full batches leave without waiting for the 60 s interval; 2 events wait.
    eventually(lambda: harness.batches() == [5, 5], message=f"batches {harness.batches()}")
    assert [e["path"] for e in harness.events()] == [f"/users/{i}" for i in range(10)]


def test_a_partial_batch_goes_out_after_flush_interval(
    harness: Harness, upstream_server: UpstreamServer
) -> None:
    gateway = start_gateway(harness, upstream_server, batch_size=100, flush_interval="200ms")
    with gateway.client() as client:
        for index in range(3):
            assert client.get(f"/users/{index}").status_code == 200
    eventually(lambda: sum(harness.batches()) == 3, message="partial batch not flushed")
    assert len(harness.events()) == 3


def test_a_gateway_failure_before_the_response_becomes_one_500_event_with_the_error(
    harness: Harness, upstream_server: UpstreamServer
) -> None:
    gateway = start_gateway(harness, upstream_server, flush_interval="50ms")

    async def broken_forward(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("pool exploded")

    # Fault injection: a bug inside the proxy, which no real upstream can provoke.
    gateway.app.proxy.forward = broken_forward  # type: ignore[method-assign]
    with gateway.client() as client:
        response = client.get("/users/1")
    assert response.status_code == 500
    [event] = eventually(harness.events, message="no event arrived")
    assert event["status"] == 500
    assert event["error"] == "RuntimeError: pool exploded"
    assert event["request_id"] == response.json()["request_id"]


def test_stopping_the_gateway_flushes_queued_events(
    harness: Harness, upstream_server: UpstreamServer
) -> None:
    gateway = start_gateway(harness, upstream_server, batch_size=100, flush_interval="60s")
    with gateway.client() as client:
        for index in range(4):
            assert client.get(f"/users/{index}").status_code == 200
    sink = harness.sink
    assert sink.queued == 4
    stop_gateway(harness)
    assert len(harness.events()) == 4
    assert sink.stats()["sent"] == 4
    harness.gateway = None


def test_requests_do_not_wait_for_a_dead_sink_and_the_full_queue_drops(
    harness: Harness, upstream_server: UpstreamServer
) -> None:
    # A send to the dead sink would hang for send_timeout (30 s): any request that
    # waited on it would take that long.
    gateway = start_gateway(
        harness,
        upstream_server,
        queue_size=10,
        batch_size=5,
        flush_interval="20ms",
        send_timeout="30s",
        shutdown_timeout="200ms",
    )
    harness.kill()
    slowest = 0.0
    with gateway.client() as client:
        for index in range(40):
            started = time.perf_counter()
            assert client.get(f"/users/{index}").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 1.0, f"a request took {slowest:.3f}s with the sink dead"
    stats = harness.sink.stats()
    assert stats["sent"] == 0
    assert stats["queued"] <= 10
    # At most one batch is stuck in the dead send; everything past the queue dropped.
    assert stats["dropped"] >= 40 - 10 - 5, stats


def test_an_unreachable_sink_does_not_delay_startup_and_gets_queued_events_once_back(
    harness: Harness, upstream_server: UpstreamServer
) -> None:
    harness.down_before_start()
    started = time.perf_counter()
    gateway = start_gateway(harness, upstream_server, flush_interval="50ms")
    assert time.perf_counter() - started < 5
    with gateway.client() as client:
        for index in range(3):
            assert client.get(f"/users/{index}").status_code == 200
    assert harness.sink.sent == 0
    harness.back_up()
    eventually(lambda: len(harness.events()) == 3, timeout=15, message="events not delivered")


def test_stopping_with_a_dead_sink_gives_up_after_shutdown_timeout(
    harness: Harness, upstream_server: UpstreamServer
) -> None:
    gateway = start_gateway(
        harness, upstream_server, flush_interval="60s", send_timeout="30s", shutdown_timeout="300ms"
    )
    harness.kill()
    with gateway.client() as client:
        for index in range(3):
            assert client.get(f"/users/{index}").status_code == 200
    sink = harness.sink
    started = time.perf_counter()
    stop_gateway(harness)
    harness.gateway = None
    assert time.perf_counter() - started < 5
    assert sink.stats()["sent"] == 0
    assert sink.stats()["dropped"] + sink.stats()["failed"] == 3


# --- the shared queue on its own --------------------------------------------------------


def context(**overrides: Any) -> RequestContext:
    values: dict[str, Any] = {
        "scope": {},
        "method": "POST",
        "path": "/orders/9",
        "query_string": b"",
        "request_headers": [],
        "client_ip": "10.1.2.3",
        "request_id": "req-1",
        "route_name": "orders",
        "route_path": "/orders/{id}",
        "params": {"id": "9"},
        "upstream": "orders",
    }
    values.update(overrides)
    return RequestContext(**values)


async def test_put_never_waits_and_counts_what_a_full_queue_refuses() -> None:
    sink = EventSink(Recording(MemoryKafkaTransport(kafka_config())), queue_size=3)
    accepted = [sink.put({"n": n}) for n in range(5)]
    assert accepted == [True, True, True, False, False]
    assert sink.stats() == {"queued": 3, "sent": 0, "dropped": 2, "failed": 0, "batches": 0}


async def test_an_error_before_the_response_head_becomes_a_500_event_with_the_error() -> None:
    plugin = MemoryKafkaEvents()
    plugin.configure(kafka_config(flush_interval=60))
    await plugin.start()
    ctx = context()
    await plugin.on_request(ctx)
    await plugin.on_error(ctx, RuntimeError("pool exploded"))
    await plugin.on_response(ctx, Response(500))
    assert plugin.sink is not None
    await plugin.stop()
    records = plugin.sink.transport.inner.records  # type: ignore[attr-defined]
    [event] = [json.loads(value) for _, value in records]
    assert event["status"] == 500
    assert event["error"] == "RuntimeError: pool exploded"
    assert event["route"] == "/orders/{id}"


# --- Kafka: encoding and configuration (no broker) ------------------------------------


def kafka_config(**values: Any) -> KafkaEventsConfig:
    return KafkaEventsConfig.model_validate(
        {"bootstrap_servers": "127.0.0.1:9092", "topic": "requests", **values}
    )


SAMPLE: Event = {"request_id": "abc", "route": "/users/{id}", "status": 200, "path": "/users/é"}


def test_kafka_record_value_is_compact_utf8_json_keyed_by_request_id() -> None:
    key, value = encode_record(SAMPLE)
    assert key == b"abc"
    assert value == json.dumps(SAMPLE, separators=(",", ":"), ensure_ascii=False).encode()
    assert json.loads(value) == SAMPLE


def test_kafka_record_key_can_be_the_route_or_nothing() -> None:
    assert encode_record(SAMPLE, "route")[0] == b"/users/{id}"
    assert encode_record(SAMPLE, "none")[0] is None


def test_kafka_events_without_aiokafka_is_a_configuration_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "aiokafka", None)
    entry = KafkaEntry({"bootstrap_servers": "k:9092", "topic": "t"})
    with pytest.raises(MissingDependencyError, match=r"octopus-gateway\[kafka\]"):
        build_plugin(entry)


def test_kafka_sasl_without_a_password_is_refused_at_configuration() -> None:
    entry = KafkaEntry(
        {"bootstrap_servers": "k:9092", "topic": "t", "sasl": {"username": "gateway"}}
    )
    with pytest.raises(PluginError, match=r"config\.sasl\.password"):
        build_plugin(entry)


def test_kafka_security_protocol_follows_ssl_and_sasl() -> None:
    plain = producer_options(kafka_config(bootstrap_servers="a:9092, b:9092"))
    assert plain["security_protocol"] == "PLAINTEXT"
    assert plain["bootstrap_servers"] == ["a:9092", "b:9092"]
    sasl = {"mechanism": "SCRAM-SHA-512", "username": "u", "password": "p"}
    assert producer_options(kafka_config(sasl=sasl))["security_protocol"] == "SASL_PLAINTEXT"
    both = producer_options(kafka_config(sasl=sasl, ssl=True))
    assert both["security_protocol"] == "SASL_SSL"
    assert both["sasl_mechanism"] == "SCRAM-SHA-512"
    assert both["ssl_context"] is not None
    assert producer_options(kafka_config(ssl=True))["security_protocol"] == "SSL"


async def test_kafka_transport_builds_its_producer_without_a_broker() -> None:
    transport = AiokafkaTransport(kafka_config(client_id="gw-1", acks="all"))
    await transport.prepare()
    assert transport.producer is not None
    assert transport.producer.client._client_id == "gw-1"
    await transport.close()


async def test_kafka_missing_ca_file_fails_startup(tmp_path: Path) -> None:
    plugin = KafkaEventsPlugin()
    plugin.configure(kafka_config(ssl={"cafile": str(tmp_path / "nope.pem")}))
    with pytest.raises(FileNotFoundError):
        await plugin.start()


def test_kafka_events_with_no_broker_keeps_requests_fast(upstream_server: UpstreamServer) -> None:
    """The real aiokafka transport, pointed at a port where nothing listens."""
    settings = gateway_config(
        {"users": upstream_server.url},
        [route("user", "/users/{id}", "users", plugins=["kafka-events"])],
        plugins=[
            {
                "name": "kafka-events",
                "config": {
                    "bootstrap_servers": f"127.0.0.1:{free_port()}",
                    "topic": "requests",
                    "flush_interval": "20ms",
                    "send_timeout": "1s",
                    "shutdown_timeout": "300ms",
                },
            }
        ],
    )
    with GatewayServer(settings) as gateway, httpx.Client(base_url=gateway.url) as client:
        for index in range(20):
            started = time.perf_counter()
            assert client.get(f"/users/{index}").status_code == 200
            assert time.perf_counter() - started < 1.0
        sink = gateway.gateway.plugins.by_name["kafka-events"].sink
        assert sink.sent == 0
        assert sink.queued + sink.dropped == 20


# --- Redis specifics ------------------------------------------------------------------


async def test_redis_stream_is_capped_near_maxlen(redis_server: RedisServer) -> None:
    plugin = RedisEventsPlugin()
    plugin.configure(
        RedisEventsPlugin.Config.model_validate(
            {"redis_url": redis_server.url, "maxlen": 10, "batch_size": 50, "flush_interval": 60}
        )
    )
    await plugin.start()
    assert plugin.sink is not None
    for index in range(500):
        plugin.sink.put({"n": index})
    await plugin.stop()
    assert plugin.sink.sent == 500
    with redis_server.client() as client:
        length = client.xlen(STREAM)
        last = client.xrevrange(STREAM, count=1)[0][1][EVENT_FIELD.encode()]
    # ``MAXLEN ~`` trims whole stream nodes (100 entries each by default).
    assert 10 <= length <= 200
    assert json.loads(last) == {"n": 499}


def test_a_malformed_redis_url_fails_startup() -> None:
    plugin = RedisEventsPlugin()
    plugin.configure(RedisEventsPlugin.Config.model_validate({"redis_url": "http://nope"}))
    with pytest.raises(ValueError, match="redis"):
        asyncio.run(plugin.start())


class KafkaEntry:
    """A ``plugins:`` entry for the built-in ``kafka-events``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.name = "kafka-events"
        self.module = None
        self.path = None
        self.config = config
