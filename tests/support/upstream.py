"""The upstream service used by the integration tests: a small ASGI app with endpoints
that echo, stream, stall, fail and count, so tests can observe what the gateway sent.

Endpoints (by path prefix):

- anything else: answers JSON describing the request it received (``record`` below);
- ``/echo-body``: answers the request body itself;
- ``/stream?chunks=N&interval=S``: N chunks, S seconds apart (``stream_events``);
- ``/big?size=N``: N bytes with a Content-Length, sent under flow control (``big_sent``);
- ``/slow?delay=S``: answers after S seconds, or never if the client leaves first;
- ``/stall?size=N&send=M``: announces N bytes, sends M, then waits for the client to go;
- ``/status/NNN``: that status (no body for 204/304);
- ``/cookies``, ``/hop``, ``/close``, ``/ordered``: response header shapes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from gateway.types import Receive, Scope, Send
from tests.support.servers import ThreadedServer

ORDERED_HEADERS = [
    (b"x-zulu", b"1"),
    (b"x-alpha", b"2"),
    (b"x-multi", b"first"),
    (b"x-mike", b"3"),
    (b"x-multi", b"second"),
]


class UpstreamApp:
    """Echo-and-misbehave upstream. ``requests`` records every request it saw."""

    def __init__(self, name: str = "upstream") -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        #: ``(event, time.monotonic())`` for every chunk ``/stream`` sends.
        self.stream_events: list[tuple[str, float]] = []
        self.big_sent = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.stream_events.clear()
            self.big_sent = 0
            self.max_in_flight = self.in_flight

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    @property
    def peers(self) -> set[int]:
        """Client ports seen: one per TCP connection the gateway opened to us."""
        return {r["peer"] for r in self.requests}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._handle(scope, receive, send)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        client = scope.get("client") or ("", 0)
        record: dict[str, Any] = {
            "method": scope["method"],
            "path": path,
            "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "peer": client[1],
            "server": self.name,
        }
        self.requests.append(record)
        if path.startswith("/stream"):
            chunks, interval = int(query.get("chunks", 5)), float(query.get("interval", 0.1))
            if not await self._stream(receive, send, chunks, interval):
                record["abandoned"] = True
            return
        if path.startswith("/big"):
            await self._big(send, int(query.get("size", 1_000_000)))
            return
        if path.startswith("/stall"):
            await self._stall(
                receive, send, int(query.get("size", 100_000)), int(query.get("send", 1000))
            )
            return
        if path.startswith("/slow"):
            if await _client_left_within(receive, float(query.get("delay", 1))):
                record["abandoned"] = True
                return
            await _respond(send, 200, json.dumps(record).encode())
            return
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            body = json.dumps({"status": status}).encode() if status not in (204, 304) else b""
            await _respond(send, status, body)
            return
        size = 0
        kept = bytearray()
        keep = path.startswith("/echo-body")
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                record["abandoned"] = True
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            record["received"] = size  # progress, readable while the body streams in
            if keep:
                kept += chunk
            if not message.get("more_body"):
                break
        record["body_size"] = size
        if keep:
            await _respond(send, 200, bytes(kept), content_type=b"application/octet-stream")
            return
        extra: list[tuple[bytes, bytes]] = []
        if path.startswith("/cookies"):
            extra = [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/")]
        elif path.startswith("/hop"):
            extra = [
                (b"connection", b"x-secret"),
                (b"x-secret", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"proxy-connection", b"keep-alive"),
                (b"trailer", b"x-checksum"),
                (b"upgrade", b"h2c"),
                (b"x-visible", b"yes"),
            ]
        elif path.startswith("/close"):
            extra = [(b"connection", b"close")]
        elif path.startswith("/ordered"):
            extra = list(ORDERED_HEADERS)
        await _respond(send, 200, json.dumps(record).encode(), extra=extra)

    async def _stream(self, receive: Receive, send: Send, chunks: int, interval: float) -> bool:
        """Send the chunks; False if the client left before the last one."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for index in range(chunks):
            if index and await _client_left_within(receive, interval):
                return False
            self.stream_events.append((f"sent {index}", time.monotonic()))
            await send(
                {
                    "type": "http.response.body",
                    "body": f"chunk {index}\n".encode(),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    async def _big(self, send: Send, size: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(size).encode()),
                    (b"content-type", b"application/octet-stream"),
                ],
            }
        )
        block = b"x" * 65536
        left = size
        while left > 0:
            piece = block if left >= len(block) else block[:left]
            left -= len(piece)
            # uvicorn's send() waits while the socket's write buffer is full, so
            # ``big_sent`` tells how far the gateway has read.
            await send({"type": "http.response.body", "body": piece, "more_body": left > 0})
            self.big_sent += len(piece)

    async def _stall(self, receive: Receive, send: Send, size: int, first: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(size).encode())],
            }
        )
        await send({"type": "http.response.body", "body": b"s" * first, "more_body": True})
        await _client_left_within(receive, 10.0)


async def _client_left_within(receive: Receive, delay: float) -> bool:
    """Wait ``delay`` seconds, consuming the request body; True if the client left first."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({watcher}, timeout=delay)
        return bool(done)
    finally:
        watcher.cancel()


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"application/json",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    headers.extend(extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class UpstreamServer:
    """An :class:`UpstreamApp` served by uvicorn in a thread; ``restart()`` keeps the port."""

    def __init__(self, name: str = "upstream", **options: Any) -> None:
        self._options = options
        self.app = UpstreamApp(name)
        self.server = ThreadedServer(self.app, **options)
        self.port = self.server.port
        self.url = self.server.url

    def start(self) -> UpstreamServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        """Stop (closing every connection to it) and serve again on the same port."""
        self.server.stop()
        self.server = ThreadedServer(self.app, port=self.port, **self._options)
        self.server.start()

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The ``make_upstream`` fixture: a name (and ThreadedServer options) in, a started
#: upstream out.
MakeUpstream = Callable[..., UpstreamServer]
