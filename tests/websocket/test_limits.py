"""Per-route limits of WebSocket sessions (``websocket.idle_timeout``,
``websocket.max_message_size``) and flow control between a fast upstream and a client
that stops reading."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.protocol import State

from tests.support.gateway import GatewayProcess, gateway_config, route
from tests.websocket.conftest import MakeGateway
from tests.websocket.support import closed, until, ws_url
from tests.websocket.upstream import WsUpstream

TIMEOUT = 5.0
IDLE = 0.3  # the route's idle_timeout below, in seconds
MiB = 1024 * 1024


async def test_an_idle_session_is_closed_with_1001_after_the_idle_timeout(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway(websocket={"idle_timeout": "300ms"})
    async with connect(ws_url(gw.url)) as ws:
        started = time.monotonic()
        assert await closed(ws) == (1001, "idle timeout")
        assert time.monotonic() - started >= IDLE * 0.9
    session = upstream.sessions[0]
    await until(lambda: session.closed_with is not None, timeout=TIMEOUT)
    assert session.closed_with == (1001, "idle timeout")


@pytest.mark.parametrize("talker", ["client", "upstream"])
async def test_a_session_with_traffic_either_way_outlives_the_idle_timeout(
    make_gateway: MakeGateway, upstream: WsUpstream, talker: str
) -> None:
    """Messages in one direction only (the other side silent) keep the session alive for
    four idle timeouts; once they stop, the timeout applies again."""
    gw = make_gateway(websocket={"idle_timeout": "300ms"})
    count, interval = 16, IDLE / 4
    async with connect(ws_url(gw.url)) as ws:
        started = time.monotonic()
        if talker == "client":
            await ws.send("!silent")
            for n in range(count):
                await asyncio.sleep(interval)  # pacing the traffic, not synchronisation
                await ws.send(f"note {n}")
            session = upstream.sessions[0]
            await until(lambda: len(session.received) == count + 1, timeout=TIMEOUT)
        else:
            await ws.send(f"!tick {count} {int(interval * 1000)}")
            ticks = [await asyncio.wait_for(ws.recv(), TIMEOUT) for _ in range(count)]
            assert ticks == [f"tick {n}" for n in range(count)]
        assert time.monotonic() - started > 3 * IDLE
        assert ws.state is State.OPEN
        assert await closed(ws) == (1001, "idle timeout")


async def test_idle_sessions_are_not_closed_without_an_idle_timeout(
    make_gateway: MakeGateway,
) -> None:
    """No ``websocket.idle_timeout``: off (a silent session is still open well after the
    300 ms the other tests use)."""
    gw = make_gateway()
    assert gw.gateway.table.routes[0].websocket.idle_timeout is None
    async with connect(ws_url(gw.url)) as ws:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 4 * IDLE)
        await ws.send("still here")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "still here"


async def test_messages_of_exactly_the_size_limit_pass_both_ways(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway(websocket={"max_message_size": "1KiB"})
    async with connect(ws_url(gw.url)) as ws:
        await ws.send(b"b" * 1024)
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"b" * 1024
        text = "é" * 512  # 1024 bytes of UTF-8
        await ws.send(text)
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == text


async def test_a_message_over_the_limit_from_the_upstream_closes_the_session_with_1009(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway(websocket={"max_message_size": "1KiB"})
    async with connect(ws_url(gw.url)) as ws:
        await ws.send("!burst 1 2048")
        code, reason = await closed(ws)
    assert code == 1009 and "1024" in (reason or "")
    session = upstream.sessions[0]
    await until(lambda: session.closed_with is not None, timeout=TIMEOUT)
    assert session.closed_with is not None and session.closed_with[0] == 1009


async def test_a_message_over_the_limit_from_the_client_closes_the_session_with_1009(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway(websocket={"max_message_size": "1KiB"})
    async with connect(ws_url(gw.url)) as ws:
        await ws.send("ok")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "ok"
        await ws.send("é" * 513)  # 1026 bytes of UTF-8 in 513 characters
        assert await closed(ws) == (1009, "message over 1024 bytes")
    session = upstream.sessions[0]
    await until(lambda: session.closed_with is not None, timeout=TIMEOUT)
    assert session.closed_with == (1009, "message over 1024 bytes")
    assert session.received == ["ok"]  # the big message never went upstream


async def test_a_client_that_stops_reading_holds_back_the_upstream_not_gateway_memory(
    upstream: WsUpstream, tmp_path: Path
) -> None:
    """The upstream sends 20 MiB (20 messages of 1 MiB, the default size limit) to a client
    that reads nothing. The gateway, a process of its own here, must not take it in: its
    resident memory grows by a message or two while the rest waits in socket buffers and
    in the upstream. Once the client reads again, everything arrives, in order.

    The client's socket has a small fixed receive buffer, so that the kernel does not take
    in on the client's behalf what the gateway should be holding back.
    """
    config = gateway_config({"ws": upstream.url}, [route("ws", "/{rest:path}", "ws")])
    count, size = 20, MiB
    with GatewayProcess(config, tmp_path) as gw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", gw.port))
        sock.setblocking(False)
        async with connect(
            ws_url(gw.url), sock=sock, compression=None, max_size=None, max_queue=1
        ) as ws:
            # Warm-up: the gateway has relayed messages of this size before the baseline.
            await ws.send(f"!burst 2 {size}")
            for _ in range(2):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            baseline = gw.memory_kib()["VmRSS"]
            session = upstream.sessions[0]

            await ws.send(f"!burst {count} {size}")
            # Watch the gateway's memory until the upstream has not sent anything for
            # half a second (stuck in flow control, or finished into socket buffers).
            peak, last, still_since = baseline, -1, time.monotonic()
            deadline = time.monotonic() + 15
            while time.monotonic() - still_since < 0.5:
                assert time.monotonic() < deadline, "the upstream kept sending for 15 s"
                peak = max(peak, gw.memory_kib()["VmRSS"])
                if session.burst_sent != last:
                    last, still_since = session.burst_sent, time.monotonic()
                await asyncio.sleep(0.02)
            growth_mib = (peak - baseline) / 1024
            assert growth_mib < 6, f"the gateway's RSS grew {growth_mib:.1f} MiB"

            received = [await asyncio.wait_for(ws.recv(), TIMEOUT) for _ in range(count)]
    assert [int.from_bytes(m[:4], "big") for m in received] == list(range(count))
    assert all(len(m) == size for m in received)
    assert session.burst_sent == count * size
