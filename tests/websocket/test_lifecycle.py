"""Sessions in the gateway's bookkeeping and shutdown: ``octopus_active_connections``
counts them, and draining closes them with 1001 (going away), in process and for a real
``octopus run`` getting SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.e2e.helpers import minimal_config, start_gateway
from tests.websocket.conftest import MakeGateway
from tests.websocket.support import closed, until, ws_url
from tests.websocket.upstream import WsUpstream

TIMEOUT = 5.0
DRAINED = (1001, "gateway shutting down")


async def active_connections(client: httpx.AsyncClient) -> float:
    """``octopus_active_connections`` from ``/metrics`` (served by the admin, which is
    mounted in the same app: scrapes do not count themselves)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    for line in response.text.splitlines():
        if line.startswith("octopus_active_connections "):
            return float(line.split()[1])
    raise AssertionError("octopus_active_connections is not exposed")


async def test_active_connections_counts_an_open_session(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    async with httpx.AsyncClient(base_url=gw.url, timeout=TIMEOUT) as client:
        before = await active_connections(client)
        async with connect(ws_url(gw.url)) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "hello"
            assert await active_connections(client) == before + 1

        async def back_down() -> bool:
            return await active_connections(client) == before

        await until(back_down, timeout=TIMEOUT, message="the session is still counted")


async def test_draining_closes_the_client_with_1001_even_while_the_upstream_is_stuck(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    """Drain (as SIGTERM does) while the upstream's event loop is blocked: the client hears
    1001 at once, not after the upstream's close handshake; the upstream hears 1001 when
    it wakes up."""
    gw = make_gateway()
    async with connect(ws_url(gw.url)) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "hello"
        assert upstream.server is not None
        frozen = threading.Event()

        def freeze() -> None:
            frozen.set()
            time.sleep(2.0)

        stuck = asyncio.create_task(asyncio.to_thread(upstream.server.call, freeze))
        await until(frozen.is_set)
        started = time.monotonic()
        gw.server.call(setattr, gw.gateway, "draining", True)
        assert await closed(ws) == DRAINED
        assert time.monotonic() - started < 1.5
        await stuck
    session = upstream.sessions[0]
    await until(lambda: session.closed_with is not None, timeout=TIMEOUT)
    assert session.closed_with == DRAINED
    await until(lambda: not gw.gateway.websockets, timeout=TIMEOUT)


async def test_draining_during_the_upstream_handshake_refuses_the_client_and_closes_upstream(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    """A session whose upstream handshake is still under way when draining begins: the
    client gets a 503 instead of a session, and the upstream connection, once it is
    made, is closed with 1001 rather than left open."""
    gw = make_gateway()

    async def open_session() -> None:
        async with connect(ws_url(gw.url, "/chat?hold=500"), open_timeout=TIMEOUT):
            pass

    opening = asyncio.create_task(open_session())
    await until(lambda: upstream.sessions, message="the upstream handshake did not start")
    gw.server.call(setattr, gw.gateway, "draining", True)
    with pytest.raises(InvalidStatus) as caught:
        await opening
    assert caught.value.response.status_code == 503
    session = upstream.sessions[0]
    await until(lambda: session.ended.is_set(), timeout=TIMEOUT)
    assert session.closed_with == DRAINED
    await until(lambda: not gw.gateway.websockets, timeout=TIMEOUT)


async def test_sigterm_closes_open_sessions_with_1001_and_octopus_exits_0(
    upstream: WsUpstream,
) -> None:
    handle = start_gateway(minimal_config(upstream.url))
    try:
        async with connect(ws_url(handle.data_url)) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "hello"
            handle.send_signal(signal.SIGTERM)
            assert await closed(ws, timeout=10) == DRAINED
        assert await asyncio.to_thread(handle.wait, 20) == 0
    finally:
        handle.close()
    session = upstream.sessions[0]
    await until(lambda: session.closed_with is not None, timeout=TIMEOUT)
    assert session.closed_with == DRAINED
