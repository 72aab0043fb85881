"""HTTP/2 behaviour that needs an upstream acting on cue (a server written with ``h2``):
graceful GOAWAY in the middle of a live stream, and a request window that stays shut."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gateway.upstream.http2 import OUT_HIGH_WATER
from tests.http2.helpers import settled
from tests.http2.servers import ScriptedH2Server
from tests.support.gateway import MakeGateway, gateway_config, route
from tests.support.waiting import eventually


@pytest.fixture
def scripted() -> Iterator[ScriptedH2Server]:
    with ScriptedH2Server() as server:
        yield server


def config(url: str) -> dict[str, Any]:
    # No proxy retries: what recovers a refused stream here is the HTTP/2 layer itself.
    upstream = {"endpoints": [url], "retries": 0}
    return gateway_config({"up": upstream}, [route("all", "/{rest:path}", "up")])


def test_goaway_lets_the_in_flight_stream_finish_and_replays_the_refused_one(
    make_gateway: MakeGateway, scripted: ScriptedH2Server
) -> None:
    gw = make_gateway(config(scripted.url))
    with gw.client() as client, ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.get, "/hold")
        eventually(lambda: any(r["path"] == "/hold" for r in scripted.requests))
        # On the same connection: the server answers with GOAWAY(last_stream_id=/hold),
        # finishes /hold, ignores this POST and hangs up.
        posted = client.post("/second", content=b"payload")
        held_response = held.result(timeout=10)
        after = client.get("/third")

    assert held_response.status_code == 200
    assert held_response.content == b"held"
    # The POST was not processed (its stream id was past last_stream_id), so it was safe
    # to send again, on a new connection, although POST is not idempotent.
    assert posted.status_code == 200
    assert posted.json() == {"connection": 1, "method": "POST", "path": "/second", "body_size": 7}
    seconds = [
        (r["connection"], r["answered"]) for r in scripted.requests if r["path"] == "/second"
    ]
    assert seconds == [(0, False), (1, True)]
    # New streams go to the new connection; the old one is closed once drained.
    assert after.json()["connection"] == 1
    eventually(lambda: 0 in scripted.closed)
    eventually(lambda: gw.pool("up").open_connections == 1)


def test_a_request_body_waits_for_the_upstream_window(
    make_gateway: MakeGateway, scripted: ScriptedH2Server
) -> None:
    gw = make_gateway(config(scripted.url))
    size = 1024 * 1024
    piece = b"z" * 16384

    def body() -> Iterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    with gw.client() as client, ThreadPoolExecutor(1) as pool:
        upload = pool.submit(client.post, "/gated", content=body())
        eventually(lambda: scripted.gated_received() > 0)
        # The server does not acknowledge: the gateway may send one initial window
        # (65,535 bytes) and must then wait, holding the client back.
        stalled_at = settled(scripted.gated_received)
        assert stalled_at <= 65_535
        # What waits in the gateway is bounded too: drain() held the client back, so at
        # most OUT_HIGH_WATER plus one message of the ASGI server (one socket read) wait.
        conn = gw.pool("up").connections[0]
        (stream,) = conn.streams.values()
        assert OUT_HIGH_WATER < stream.queued < size // 2
        assert not upload.done()
        scripted.open_gate()
        response = upload.result(timeout=20)
    assert response.status_code == 200
    assert response.json()["body_size"] == size
