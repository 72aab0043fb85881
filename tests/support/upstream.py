"""The upstream service used by the integration tests: a small ASGI app with endpoints
that echo, stream, stall, fail and count, so tests can observe what the gateway sent."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qs

from gateway.types import Receive, Scope, Send


class UpstreamApp:
    """Echo-and-misbehave upstream. ``requests`` records every request it saw."""

    def __init__(self, name: str = "upstream") -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.stream_events: list[str] = []

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
        path: str = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        record = {
            "method": scope["method"],
            "path": path,
            "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        }
        self.requests.append(record)
        if path.startswith("/stream"):
            await self._stream(send, int(query.get("chunks", 5)), float(query.get("interval", 0.1)))
            return
        if path.startswith("/big"):
            await self._big(send, int(query.get("size", 1_000_000)))
            return
        if path.startswith("/slow"):
            await asyncio.sleep(float(query.get("delay", 1)))
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            body = json.dumps({"status": status}).encode() if status not in (204, 304) else b""
            await _respond(send, status, body)
            return
        size = 0
        digest_bytes = bytearray()
        keep = path.startswith("/echo-body")
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if keep:
                digest_bytes += chunk
            if not message.get("more_body"):
                break
        record["body_size"] = size
        if keep:
            await _respond(send, 200, bytes(digest_bytes), content_type=b"application/octet-stream")
            return
        record["server"] = self.name
        extra: list[tuple[bytes, bytes]] = []
        if path.startswith("/cookies"):
            extra = [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
        if path.startswith("/hop"):
            extra = [
                (b"connection", b"x-secret"),
                (b"x-secret", b"1"),
                (b"keep-alive", b"timeout=5"),
            ]
        if path.startswith("/close"):
            extra = [(b"connection", b"close")]
        await _respond(send, 200, json.dumps(record).encode(), extra=extra)

    async def _stream(self, send: Send, chunks: int, interval: float) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for index in range(chunks):
            self.stream_events.append(f"sent {index}")
            await send(
                {
                    "type": "http.response.body",
                    "body": f"chunk {index}\n".encode(),
                    "more_body": True,
                }
            )
            await asyncio.sleep(interval)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

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
            await send({"type": "http.response.body", "body": piece, "more_body": left > 0})


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
