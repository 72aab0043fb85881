"""Frames, handshake details and close codes relayed between a real ``websockets`` client
and a real WebSocket upstream through the gateway (``create_app`` on uvicorn)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.websocket.conftest import MakeGateway
from tests.websocket.support import closed, until, ws_url
from tests.websocket.upstream import WsUpstream

TIMEOUT = 5.0


async def recv(ws: ClientConnection) -> Any:
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def info(ws: ClientConnection) -> dict[str, Any]:
    """What the upstream saw of this session's handshake."""
    await ws.send("!info")
    return json.loads(await recv(ws))


async def test_text_and_binary_messages_are_echoed_with_their_type(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway()
    async with connect(ws_url(gw.url)) as ws:
        await ws.send("hello, upstream")
        assert await recv(ws) == "hello, upstream"
        await ws.send(b"\x00\x01binary\xff")
        assert await recv(ws) == b"\x00\x01binary\xff"
        await ws.send("ünïcödé ✓")
        assert await recv(ws) == "ünïcödé ✓"


async def test_many_messages_arrive_in_order(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway()
    count = 500
    async with connect(ws_url(gw.url)) as ws:

        async def send_all() -> None:
            for n in range(count):
                await ws.send(f"m{n}" if n % 2 else f"m{n}".encode())

        sender = asyncio.create_task(send_all())
        echoed = [await recv(ws) for _ in range(count)]
        await sender
    assert echoed == [f"m{n}" if n % 2 else f"m{n}".encode() for n in range(count)]
    assert upstream.sessions[0].received == echoed


async def test_the_subprotocol_the_upstream_picked_reaches_the_client(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway()
    async with connect(
        ws_url(gw.url, "/chat?pick=chat.v2"), subprotocols=["chat.v1", "chat.v2"]
    ) as ws:
        assert ws.subprotocol == "chat.v2"
    assert upstream.sessions[0].offered == ["chat.v1", "chat.v2"]


async def test_no_subprotocol_when_the_upstream_picks_none(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway()
    async with connect(ws_url(gw.url), subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol is None
        await ws.send("still works")
        assert await recv(ws) == "still works"
    assert upstream.sessions[0].offered == ["chat.v1", "chat.v2"]


async def test_path_query_string_and_end_to_end_headers_reach_the_upstream(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway()
    async with connect(
        ws_url(gw.url, "/rooms/42?user=ann&lang=en%20GB"),
        origin="https://app.example",  # type: ignore[arg-type]
        additional_headers={"X-Custom": "hello", "Cookie": "session=abc"},
        user_agent_header="test-client/1.0",
    ) as ws:
        seen = await info(ws)
    headers = dict(seen["headers"])
    assert seen["path"] == "/rooms/42"
    assert seen["query"] == "user=ann&lang=en%20GB"
    assert headers["x-custom"] == "hello"
    assert headers["cookie"] == "session=abc"
    assert headers["origin"] == "https://app.example"
    assert headers["user-agent"] == "test-client/1.0"


async def test_hop_by_hop_headers_and_the_clients_handshake_key_stay_at_the_gateway(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway()
    async with connect(
        ws_url(gw.url),
        # (A second Connection header naming more hop-by-hop headers cannot be tested:
        # uvicorn then no longer sees the upgrade.)
        additional_headers=[
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("X-Forwarded-For", "6.6.6.6"),  # a spoof from an untrusted client
        ],
    ) as ws:
        client_key = ws.request.headers["Sec-WebSocket-Key"]
        seen = await info(ws)
    names = [name for name, _ in seen["headers"]]
    headers = dict(seen["headers"])
    assert not {"keep-alive", "proxy-connection", "te"} & set(names)
    # The upstream handshake is the gateway's own: one key, not the client's.
    assert names.count("sec-websocket-key") == 1
    assert headers["sec-websocket-key"] != client_key
    assert [v for n, v in seen["headers"] if n == "connection"] == ["Upgrade"]
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert headers["via"] == "1.1 octopus"
    assert headers["x-request-id"]


async def test_the_clients_close_code_and_reason_reach_the_upstream(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway()
    async with connect(ws_url(gw.url)) as ws:
        await ws.send("hi")
        assert await recv(ws) == "hi"
        await ws.close(4001, "client bye")
    session = upstream.sessions[0]
    await until(lambda: session.closed_with is not None, timeout=TIMEOUT)
    assert session.closed_with == (4001, "client bye")


async def test_the_upstreams_close_code_and_reason_reach_the_client(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway()
    async with connect(ws_url(gw.url)) as ws:
        await ws.send("!close 4002 bye")
        assert await closed(ws) == (4002, "bye")


async def test_a_ping_from_the_client_is_answered(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    async with connect(ws_url(gw.url), ping_interval=None) as ws:
        pong = await ws.ping(b"are you there")
        latency = await asyncio.wait_for(pong, TIMEOUT)
        assert latency >= 0
        # The session carries on afterwards.
        await ws.send("after the ping")
        assert await recv(ws) == "after the ping"
