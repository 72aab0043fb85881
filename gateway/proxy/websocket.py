"""Proxying one WebSocket session: the client side is ASGI, the upstream side is a
``websockets`` client connection.

The handshake goes upstream first: only when the upstream accepts does the client get
its ``websocket.accept`` (with the subprotocol the upstream chose); an upstream refusal
is relayed to the client as the same HTTP response (the ASGI ``websocket.http.response``
extension), or as a close when the server lacks it. Then frames are pumped both ways,
each direction awaiting the other side's flow control, and close codes and reasons are
relayed as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gateway.proxy.headers import build_request_head
from gateway.types import Receive, Scope, Send
from gateway.upstream.upstream import Endpoint

log = logging.getLogger("octopus.websocket")

#: Handshake headers the websockets client writes itself.
_HANDSHAKE = frozenset(
    {
        b"host",
        b"upgrade",
        b"connection",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
        b"content-length",
        b"transfer-encoding",
    }
)
#: Close codes that may not be sent in a close frame (RFC 6455 §7.4.1) and what to send.
_RESERVED_CLOSE = {1005: 1000, 1006: 1011, 1015: 1011}
GOING_AWAY = 1001


@dataclass(frozen=True)
class WebSocketOptions:
    """Per-route limits: ``idle_timeout`` (None: never) and the largest message."""

    idle_timeout: float | None = None
    max_message_size: int = 1024 * 1024
    open_timeout: float = 10.0


def upstream_headers(
    headers: list[tuple[bytes, bytes]],
    *,
    client_ip: str,
    scheme: str,
    request_id: str,
    trusted: bool,
    trace_headers: list[tuple[bytes, bytes]] | None = None,
) -> list[tuple[str, str]]:
    """The client's headers as the upstream handshake carries them: the same forwarding
    rules as plain HTTP (one implementation: ``build_request_head``), minus the
    handshake headers the client library writes itself. ``trace_headers``: as for
    ``build_request_head`` (tracing on)."""
    head = build_request_head(
        b"GET",
        b"/",
        b"",
        headers,
        client_ip=client_ip,
        scheme=scheme,
        request_id=request_id.encode(),
        trusted=trusted,
        body_framing=None,
        trace_headers=trace_headers,
    )
    pairs = []
    for line in head.split(b"\r\n")[1:]:
        if not line:
            continue
        name, _, value = line.partition(b": ")
        if name.lower() in _HANDSHAKE:
            continue
        pairs.append((name.decode("latin-1"), value.decode("latin-1")))
    return pairs


def upstream_url(endpoint: Endpoint, target: str) -> str:
    scheme = "wss" if endpoint.address.tls else "ws"
    return f"{scheme}://{endpoint.address.address}{target}"


class WebSocketSession:
    """One proxied session; ``close_for_drain`` ends it with 1001 on shutdown."""

    def __init__(self) -> None:
        self.upstream: ClientConnection | None = None
        self._send: Send | None = None
        self._closed = False

    async def run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        endpoint: Endpoint,
        target: str,
        headers: list[tuple[str, str]],
        options: WebSocketOptions,
    ) -> int:
        """Proxy until either side closes; returns the HTTP-ish status for metrics."""
        self._send = send
        first = await receive()
        if first["type"] != "websocket.connect":
            return 499
        subprotocols = list(scope.get("subprotocols") or [])
        context: ssl.SSLContext | None = endpoint.pool.ssl_context if endpoint.address.tls else None
        try:
            upstream = await connect(
                upstream_url(endpoint, target),
                additional_headers=headers,
                subprotocols=subprotocols or None,  # type: ignore[arg-type]
                max_size=options.max_message_size,
                open_timeout=options.open_timeout,
                ssl=context,
                proxy=None,
                compression=None,
                user_agent_header=None,
            )
        except InvalidStatus as exc:
            response = exc.response
            await self._refuse(scope, send, response.status_code, response.headers, response.body)
            return response.status_code
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            log.info("websocket upstream unreachable", extra={"reason": str(exc)})
            await self._refuse(scope, send, 502, None, b"")
            return 502
        self.upstream = upstream
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        to_upstream = asyncio.ensure_future(self._client_to_upstream(receive, upstream))
        to_client = asyncio.ensure_future(self._upstream_to_client(send, upstream, options))
        try:
            await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, return_exceptions=True)
            with contextlib.suppress(Exception):
                await upstream.close()
        return 101

    async def close_for_drain(self) -> None:
        """Close both sides with 1001 (going away): the gateway is shutting down."""
        if self._closed:
            return
        self._closed = True
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                await self.upstream.close(GOING_AWAY, "gateway shutting down")
        if self._send is not None:
            with contextlib.suppress(Exception):
                await self._send(
                    {
                        "type": "websocket.close",
                        "code": GOING_AWAY,
                        "reason": "gateway shutting down",
                    }
                )

    async def _client_to_upstream(self, receive: Receive, upstream: ClientConnection) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = message.get("bytes")
                try:
                    await upstream.send(data if data is not None else message.get("text", ""))
                except ConnectionClosed:
                    return
            elif kind == "websocket.disconnect":
                code = _sendable(message.get("code", 1000))
                with contextlib.suppress(Exception):
                    await upstream.close(code, message.get("reason") or "")
                self._closed = True
                return

    async def _upstream_to_client(
        self, send: Send, upstream: ClientConnection, options: WebSocketOptions
    ) -> None:
        try:
            while True:
                if options.idle_timeout is not None:
                    async with asyncio.timeout(options.idle_timeout):
                        data = await upstream.recv()
                else:
                    data = await upstream.recv()
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
        except TimeoutError:
            await upstream.close(GOING_AWAY, "idle timeout")
            await self._close_client(send, GOING_AWAY, "idle timeout")
            return
        except ConnectionClosed:
            pass
        # close_code is 1006 when the upstream vanished without a close frame.
        code = upstream.close_code or 1006
        await self._close_client(send, _sendable(code), upstream.close_reason or "")

    async def _close_client(self, send: Send, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": code, "reason": reason})

    async def _refuse(
        self, scope: Scope, send: Send, status: int, headers: Any, body: bytes | None
    ) -> None:
        """Relay an upstream refusal as an HTTP response when the server can send one."""
        self._closed = True
        if "websocket.http.response" in (scope.get("extensions") or {}):
            out: list[tuple[bytes, bytes]] = []
            if headers is not None:
                for name, value in headers.raw_items():
                    lowered = name.lower()
                    if lowered in ("connection", "upgrade", "transfer-encoding", "content-length"):
                        continue
                    out.append((lowered.encode("latin-1"), value.encode("latin-1")))
            await send({"type": "websocket.http.response.start", "status": status, "headers": out})
            await send({"type": "websocket.http.response.body", "body": body or b""})
            return
        await send({"type": "websocket.close", "code": 1008 if status < 500 else 1011})


def _sendable(code: int) -> int:
    return _RESERVED_CLOSE.get(code, code)
