"""An upstream for the HTTP plugin tests (cors, compression, transform): the shared
:class:`UpstreamApp` plus a few response shapes those plugins care about.

Extra endpoints (everything else is :class:`UpstreamApp`'s):

- ``/text?size=N&type=T``: N bytes of compressible text with a Content-Length;
  ``type`` (default ``text/plain``) is the Content-Type, ``etag``/``vary``/
  ``cache_control`` echo into those headers when given;
- ``/sse?events=N&interval=S``: a ``text/event-stream`` of N events, S seconds apart;
- ``/encoded``: a gzip-encoded body with ``Content-Encoding: gzip`` already set;
- ``/partial``: a 206 with ``Content-Range``;
- ``/cors-upstream``: a response carrying the upstream's own ``Access-Control-*``.
"""

from __future__ import annotations

import gzip
import time
from urllib.parse import parse_qs

from gateway.types import Receive, Scope, Send
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamApp, _client_left_within

#: Compressible but not trivially so: a sentence with a counter.
TEXT_LINE = b"The quick brown fox jumps over the lazy dog %06d.\n"
ENCODED_BODY = gzip.compress(b"already encoded " * 200)
SHAPED_PATHS = frozenset({"/text", "/sse", "/encoded", "/partial", "/cors-upstream"})


def text_body(size: int) -> bytes:
    out = bytearray()
    index = 0
    while len(out) < size:
        out += TEXT_LINE % index
        index += 1
    return bytes(out[:size])


class ShapedUpstream(UpstreamApp):
    """:class:`UpstreamApp` with the shapes above; ``sse_events`` times each event sent."""

    def __init__(self, name: str = "shaped") -> None:
        super().__init__(name)
        self.sse_events: list[float] = []

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        if path in SHAPED_PATHS:
            self.requests.append({"method": scope["method"], "path": path})
        if path == "/text":
            body = text_body(int(query.get("size", 4096)))
            headers = [
                (b"content-type", query.get("type", "text/plain").encode()),
                (b"content-length", str(len(body)).encode()),
            ]
            for key, header in (
                ("etag", b"etag"),
                ("vary", b"vary"),
                ("cache_control", b"cache-control"),
            ):
                if key in query:
                    headers.append((header, query[key].encode()))
            await _send(send, 200, headers, body)
        elif path == "/sse":
            await self._sse(receive, send, int(query.get("events", 3)), float(query["interval"]))
        elif path == "/encoded":
            headers = [
                (b"content-type", b"text/plain"),
                (b"content-encoding", b"gzip"),
                (b"content-length", str(len(ENCODED_BODY)).encode()),
            ]
            await _send(send, 200, headers, ENCODED_BODY)
        elif path == "/partial":
            body = text_body(2048)
            headers = [
                (b"content-type", b"text/plain"),
                (b"content-range", b"bytes 0-2047/10000"),
                (b"content-length", b"2048"),
            ]
            await _send(send, 206, headers, body)
        elif path == "/cors-upstream":
            headers = [
                (b"content-type", b"application/json"),
                (b"access-control-allow-origin", b"*"),
                (b"access-control-expose-headers", b"x-upstream"),
                (b"vary", b"Accept-Language"),
            ]
            await _send(send, 200, headers, b"{}")
        else:
            await super()._handle(scope, receive, send)

    async def _sse(self, receive: Receive, send: Send, events: int, interval: float) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        for index in range(events):
            if index and await _client_left_within(receive, interval):
                return
            self.sse_events.append(time.monotonic())
            payload = f"id: {index}\ndata: event {index}\n\n".encode()
            await send({"type": "http.response.body", "body": payload, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ShapedUpstreamServer:
    """A :class:`ShapedUpstream` served by uvicorn in a thread."""

    def __init__(self) -> None:
        self.app = ShapedUpstream()
        self.server = ThreadedServer(self.app)
        self.url = self.server.url

    def __enter__(self) -> ShapedUpstreamServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
