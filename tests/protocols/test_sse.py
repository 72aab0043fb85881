"""Server-sent events through the gateway (issue 6 item 2): each event reaches the
client when the upstream sends it, even with compression in the middleware; the
client's ``Last-Event-ID`` reaches the upstream; a client that leaves closes the
upstream stream at once; ``read_timeout`` is the longest silence between bytes, so
heartbeat comments keep a quiet stream alive while a silent one is cut."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.protocols.apps import SseApp
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.servers import ThreadedServer
from tests.support.waiting import eventually

Event = tuple[bytes, float]  # (event text, arrival time)


@pytest.fixture(scope="module")
def gateway(sse_server: tuple[SseApp, ThreadedServer]) -> Iterator[GatewayServer]:
    _, upstream = sse_server
    config = gateway_config(
        {
            "sse": upstream.url,
            # Strict: 500 ms of silence ends a response; 1 s to the response head.
            "strict": {
                "endpoints": [{"url": upstream.url}],
                "read_timeout": "500ms",
                "timeout": "1s",
                "retries": 0,
            },
        },
        [
            route("strict", "/strict/{rest:path}", "strict", strip_prefix=True),
            route("sse", "/{rest:path}", "sse"),
        ],
        middleware=["compression"],
        plugins=[{"name": "compression", "config": {"min_size": 0}}],
        observability={"logging": {"access_log": False}},
    )
    with GatewayServer(config) as server:
        yield server


@pytest.fixture
def app(sse_server: tuple[SseApp, ThreadedServer]) -> SseApp:
    sse_server[0].records.clear()
    return sse_server[0]


def read_events(chunks: Iterator[bytes] | httpx.Response, count: int) -> list[Event]:
    """The first ``count`` events of a streamed response (or of its ``iter_raw()``),
    stamped when they arrived."""
    if isinstance(chunks, httpx.Response):
        chunks = chunks.iter_raw()
    events: list[Event] = []
    buffer = b""
    for chunk in chunks:
        now = time.monotonic()
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append((event, now))
        if len(events) >= count:
            break
    return events


def stream(gateway: GatewayServer, path: str, **headers: str) -> Any:
    client = httpx.Client(base_url=gateway.url, timeout=10)
    return client, client.stream("GET", path, headers={"accept": "text/event-stream", **headers})


def test_compression_is_active_on_other_responses(gateway: GatewayServer) -> None:
    """The control for the next test: the middleware does compress JSON here."""
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        response = client.get("/health", headers={"accept-encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert response.json() == {"status": "ok"}


def test_events_arrive_one_by_one_uncompressed(gateway: GatewayServer, app: SseApp) -> None:
    started = time.monotonic()
    client, request = stream(
        gateway, "/events?interval=0.3&count=5", **{"accept-encoding": "gzip, br"}
    )
    with client, request as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert "content-encoding" not in response.headers  # compression left it alone
        events = read_events(response, 5)
    assert [e for e, _ in events] == [f"id: {i}\ndata: event {i}".encode() for i in range(1, 6)]
    assert events[0][1] - started < 1.0
    # One by one: each event reached the client before the upstream had even produced
    # the next one (300 ms later), so nothing on the way held it back.
    sent = dict(app.records[-1]["sent"])
    for index, (_, arrived) in enumerate(events, start=1):
        assert arrived >= sent[index]
        if index + 1 in sent:
            assert arrived < sent[index + 1], (index, arrived - sent[index])


def test_last_event_id_reaches_the_upstream(gateway: GatewayServer, app: SseApp) -> None:
    client, request = stream(gateway, "/events?interval=0.05&count=2", **{"last-event-id": "41"})
    with client, request as response:
        events = read_events(response, 2)
    assert app.records[-1]["headers"]["last-event-id"] == "41"
    assert [e for e, _ in events] == [b"id: 42\ndata: event 42", b"id: 43\ndata: event 43"]


def test_client_disconnect_closes_the_upstream_stream(gateway: GatewayServer, app: SseApp) -> None:
    client, request = stream(gateway, "/events?interval=0.2&count=100")
    with client, request as response:
        read_events(response, 2)
        left = time.monotonic()
    record = app.records[-1]
    eventually(lambda: record["disconnected"] is not None, timeout=3)
    assert record["disconnected"] - left < 1.0
    assert len(record["sent"]) < 10  # the upstream stopped producing


def test_heartbeats_keep_a_quiet_stream_past_the_read_timeout(
    gateway: GatewayServer, app: SseApp
) -> None:
    started = time.monotonic()
    client, request = stream(gateway, "/strict/heartbeat?interval=0.2&duration=2")
    with client, request as response:
        body = b"".join(response.iter_raw())
    elapsed = time.monotonic() - started
    # Longer than read_timeout (500 ms) and the upstream's total timeout (1 s, which
    # bounds the wait for the response head, not the stream).
    assert elapsed >= 2.0
    assert body.count(b": ping\n\n") >= 7
    assert body.endswith(b"id: 2\ndata: done\n\n")


def test_a_silent_stream_is_cut_after_the_read_timeout(gateway: GatewayServer, app: SseApp) -> None:
    client, request = stream(gateway, "/strict/silent")
    with client, request as response:
        chunks = response.iter_raw()
        first = read_events(chunks, 1)[0][1]
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
        cut = time.monotonic()
    record = app.records[-1]
    sent = record["sent"][0][1]
    # The gateway's timer starts once it has the event, after the upstream sent it;
    # measured from the upstream's clock so a slow test thread cannot skew it.
    assert 0.45 < cut - sent < 2.0
    assert first < cut
    # The gateway let go of the upstream stream too.
    eventually(lambda: record["disconnected"] is not None, timeout=3)
