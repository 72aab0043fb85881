"""A real WebSocket upstream for the gateway's WebSocket tests (Starlette on uvicorn).

It echoes text and binary messages and obeys commands, text messages starting with
``!``:

- ``!info``: answers one JSON text message with what the handshake looked like
  (path, query string, headers, offered and chosen subprotocols).
- ``!close CODE REASON``: closes the session with that code and reason.
- ``!burst COUNT SIZE``: sends COUNT binary messages of SIZE bytes each; message ``i``
  starts with ``i`` as 4 big-endian bytes, the rest is random (incompressible).
- ``!tick COUNT MS``: sends COUNT text messages ``tick N``, MS milliseconds apart.
- ``!silent``: stops echoing (messages are still received and counted).

A handshake with an ``X-Refuse`` header is refused with an HTTP 403 (via the ASGI
``websocket.http.response`` extension); ``?pick=NAME`` makes it choose that offered
subprotocol (no ``pick``: none); ``?hold=MS`` makes it accept MS milliseconds late.
Everything a session saw is in a :class:`Session` record in ``WsUpstream.sessions``,
which the tests read from their own thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from tests.support.servers import ThreadedServer


@dataclass
class Session:
    """One upstream session as the upstream saw it."""

    path: str
    query: str
    headers: list[tuple[str, str]]
    offered: list[str]
    subprotocol: str | None
    #: Messages received from the gateway (commands included).
    received: list[str | bytes] = field(default_factory=list)
    #: Bytes the current ``!burst`` has handed to the server so far.
    burst_sent: int = 0
    #: (code, reason) of the close frame the gateway sent, once it arrived.
    closed_with: tuple[int, str] | None = None
    #: Set when the session's handler returned, however it ended.
    ended: threading.Event = field(default_factory=threading.Event)

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "offered": self.offered,
            "subprotocol": self.subprotocol,
        }


class WsUpstream:
    """The upstream app plus the records of its sessions and refusals."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.refused = 0
        self.app = Starlette(routes=[WebSocketRoute("/{rest:path}", self.endpoint)])
        self.server: ThreadedServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def start(self) -> WsUpstream:
        self.server = ThreadedServer(self.app, lifespan="off").start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    async def endpoint(self, ws: WebSocket) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ws.scope["headers"]]
        if ws.headers.get("x-refuse"):
            self.refused += 1
            response = PlainTextResponse(
                "refused by the upstream", 403, headers={"x-upstream-says": "no"}
            )
            await ws.send_denial_response(response)
            return
        offered = list(ws.scope.get("subprotocols") or [])
        pick = ws.query_params.get("pick")
        chosen = pick if pick in offered else None
        session = Session(
            path=ws.scope["path"],
            query=ws.scope["query_string"].decode("latin-1"),
            headers=headers,
            offered=offered,
            subprotocol=chosen,
        )
        self.sessions.append(session)
        try:
            hold = ws.query_params.get("hold")
            if hold:  # a slow handshake
                await asyncio.sleep(int(hold) / 1000)
            await ws.accept(subprotocol=chosen)
            await self._serve(ws, session)
        except Exception:  # the gateway went away mid-send: nothing more to do
            pass
        finally:
            session.ended.set()

    async def _serve(self, ws: WebSocket, session: Session) -> None:
        silent = False
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                session.closed_with = (message.get("code", 1005), message.get("reason") or "")
                return
            text, data = message.get("text"), message.get("bytes")
            session.received.append(text if text is not None else data)
            if text is not None and text.startswith("!"):
                command, *args = text[1:].split(" ", 2)
                if command == "info":
                    await ws.send_text(json.dumps(session.describe()))
                elif command == "close":
                    await ws.close(int(args[0]), args[1] if len(args) > 1 else "")
                    return
                elif command == "burst":
                    await self._burst(ws, session, int(args[0]), int(args[1]))
                elif command == "tick":
                    for n in range(int(args[0])):
                        await asyncio.sleep(int(args[1]) / 1000)
                        await ws.send_text(f"tick {n}")
                elif command == "silent":
                    silent = True
            elif not silent:
                if text is not None:
                    await ws.send_text(text)
                else:
                    await ws.send_bytes(data)

    @staticmethod
    async def _burst(ws: WebSocket, session: Session, count: int, size: int) -> None:
        session.burst_sent = 0
        filler = os.urandom(size - 4)
        for index in range(count):
            await ws.send_bytes(index.to_bytes(4, "big") + filler)
            session.burst_sent += size
