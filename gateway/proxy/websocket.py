"""Proxying one WebSocket session: the client side is ASGI, the upstream side is a
``websockets`` client connection.

The handshake goes upstream first: only when the upstream accepts does the client get
its ``websocket.accept`` (with the subprotocol the upstream chose); an upstream refusal
is relayed to the client as the same HTTP response (the ASGI ``websocket.http.response``
extension), or as a close when the server lacks it. Then frames are pumped both ways,
each direction awaiting the other side's flow control, and close codes and reasons are
relayed as they are. ``max_message_size`` applies to messages in both directions, and
the idle timeout to traffic in either direction.
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

from gateway.errors import error_body
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
MESSAGE_TOO_BIG = 1009
#: Upstream frames received but not yet relayed before the gateway stops reading from the
#: upstream (``websockets``' ``max_queue``, 16 by default): with a slow client the
#: upstream is held back by TCP flow control instead of filling the gateway's memory with
#: up to 16 messages of ``max_message_size``.
_UPSTREAM_QUEUE = 2


class _IdleTimeout(Exception):
    """No message in either direction for the route's ``idle_timeout``."""


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
        #: Set once the client's handshake is accepted (a close before that is a refusal).
        self._send: Send | None = None
        #: Set once either side's close has been dealt with: nothing more is relayed.
        self._closed = False
        #: Event-loop time of the last message relayed either way (the idle timeout).
        self._last_activity = 0.0

    async def run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        endpoint: Endpoint,
        target: str,
        headers: list[tuple[str, str]],
        options: WebSocketOptions,
        request_id: str = "",
    ) -> int:
        """Proxy until either side closes; returns the HTTP-ish status for metrics."""
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
                max_queue=_UPSTREAM_QUEUE,
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
            body = error_body(502, "could not open the upstream WebSocket", request_id)
            await self._refuse(scope, send, 502, _JSON_HEADERS, body)
            return 502
        self.upstream = upstream
        if self._closed:  # the gateway began draining during the upstream handshake
            with contextlib.suppress(Exception):
                await upstream.close(GOING_AWAY, "gateway shutting down")
            await self._refuse(scope, send, 503, None, b"")
            return 503
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        self._send = send
        self._last_activity = asyncio.get_running_loop().time()
        to_upstream = asyncio.ensure_future(self._client_to_upstream(receive, upstream, options))
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
        await self._end(GOING_AWAY, "gateway shutting down")

    async def _end(self, code: int, reason: str) -> None:
        """End the session from the gateway's side with ``code`` to both peers: the client
        first, so that an upstream slow to answer its close cannot delay the client's."""
        if self._closed:
            return
        self._closed = True
        if self._send is not None:
            with contextlib.suppress(Exception):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                await self.upstream.close(code, reason)

    async def _client_to_upstream(
        self, receive: Receive, upstream: ClientConnection, options: WebSocketOptions
    ) -> None:
        limit = options.max_message_size
        loop = asyncio.get_running_loop()
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = message.get("bytes")
                payload = data if data is not None else message.get("text") or ""
                if _too_big(payload, limit):
                    await self._end(MESSAGE_TOO_BIG, f"message over {limit} bytes")
                    return
                self._last_activity = loop.time()
                try:
                    await upstream.send(payload)
                except ConnectionClosed:
                    return
            elif kind == "websocket.disconnect":
                if not self._closed:
                    self._closed = True
                    code = _sendable(message.get("code", 1000))
                    with contextlib.suppress(Exception):
                        await upstream.close(code, message.get("reason") or "")
                return

    async def _upstream_to_client(
        self, send: Send, upstream: ClientConnection, options: WebSocketOptions
    ) -> None:
        idle = options.idle_timeout
        loop = asyncio.get_running_loop()
        try:
            while True:
                if idle is None:
                    data = await upstream.recv()
                else:
                    data = await self._recv_before_idle(upstream, idle)
                self._last_activity = loop.time()
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
        except _IdleTimeout:
            await self._end(GOING_AWAY, "idle timeout")
            return
        except ConnectionClosed as exc:
            if exc.sent is not None and not exc.rcvd_then_sent:
                # The gateway's side closed first: a message over ``max_message_size``
                # (1009), a protocol error... The client hears that code and reason.
                code, reason = exc.sent.code, exc.sent.reason
            elif exc.rcvd is not None:
                code, reason = exc.rcvd.code, exc.rcvd.reason
            else:  # the upstream vanished without a close frame
                code, reason = 1006, ""
            await self._close_client(send, _sendable(code), reason)

    async def _recv_before_idle(self, upstream: ClientConnection, idle: float) -> str | bytes:
        """The next upstream message, or ``_IdleTimeout`` once neither side has sent one
        for ``idle`` seconds (a client message meanwhile restarts the wait)."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = self._last_activity + idle - loop.time()
            if remaining <= 0:
                raise _IdleTimeout
            try:
                async with asyncio.timeout(remaining):
                    return await upstream.recv()  # cancelling recv() loses nothing
            except TimeoutError:
                continue

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
                items = headers.raw_items() if hasattr(headers, "raw_items") else headers
                for name, value in items:
                    lowered = name.lower()
                    if lowered in ("connection", "upgrade", "transfer-encoding", "content-length"):
                        continue
                    out.append((lowered.encode("latin-1"), value.encode("latin-1")))
            await send({"type": "websocket.http.response.start", "status": status, "headers": out})
            await send({"type": "websocket.http.response.body", "body": body or b""})
            return
        await send({"type": "websocket.close", "code": 1008 if status < 500 else 1011})


_JSON_HEADERS = [("content-type", "application/json")]


def _sendable(code: int) -> int:
    return _RESERVED_CLOSE.get(code, code)


def _too_big(payload: str | bytes, limit: int) -> bool:
    """Whether a message is over ``limit`` bytes (text counts as UTF-8)."""
    if isinstance(payload, bytes):
        return len(payload) > limit
    # Each character is 1 to 4 bytes: encode only when the length alone cannot tell.
    return len(payload) > limit or (len(payload) * 4 > limit and len(payload.encode()) > limit)
