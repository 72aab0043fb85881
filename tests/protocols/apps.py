"""Upstream apps for the protocol tests: an SSE server and a GraphQL server.

Both record what they saw, with ``time.monotonic()`` stamps, so tests can tell when the
gateway delivered something and when it let go of a stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from graphql import GraphQLSchema, build_schema, graphql

from gateway.types import Receive, Scope, Send

Record = dict[str, Any]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Send, status: int, document: Any) -> None:
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class SseApp:
    """``text/event-stream`` endpoints:

    - ``/events?interval=S&count=N``: event ``id: k`` / ``data: event k`` every S seconds,
      starting after ``Last-Event-ID`` when the client sends one;
    - ``/heartbeat?interval=S&duration=D``: one event, comment lines (``: ping``) every
      S seconds for D seconds, then a ``done`` event and the end of the stream;
    - ``/silent``: one event, then nothing until the client goes away.

    Each request's record holds its headers, the events sent (``sent``: (id, time)) and
    ``disconnected``: when the app saw the client (the gateway) go away.
    """

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await _respond(send, 200, {"status": "ok"})
            return
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        record: Record = {
            "path": scope["path"],
            "headers": headers,
            "sent": [],
            "disconnected": None,
        }
        with self._lock:
            self.records.append(record)
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            record["disconnected"] = time.monotonic()
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
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
            if scope["path"] == "/events":
                await self._events(send, record, query, headers, gone)
            elif scope["path"] == "/heartbeat":
                await self._heartbeat(send, record, query, gone)
            else:
                await self._event(send, record, 1)
                await gone.wait()
        finally:
            watcher.cancel()

    async def _event(self, send: Send, record: Record, ident: int, data: str = "") -> None:
        text = f"id: {ident}\ndata: {data or f'event {ident}'}\n\n"
        record["sent"].append((ident, time.monotonic()))
        await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

    async def _events(
        self,
        send: Send,
        record: Record,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        gone: asyncio.Event,
    ) -> None:
        interval = float(query.get("interval", "0.3"))
        count = int(query.get("count", "5"))
        first = int(headers.get("last-event-id", "0")) + 1
        for ident in range(first, first + count):
            await self._event(send, record, ident)
            if await _within(gone, interval):
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _heartbeat(
        self, send: Send, record: Record, query: Mapping[str, str], gone: asyncio.Event
    ) -> None:
        interval = float(query.get("interval", "0.2"))
        deadline = time.monotonic() + float(query.get("duration", "2"))
        await self._event(send, record, 1)
        while time.monotonic() < deadline:
            if await _within(gone, interval):
                return
            await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
        await self._event(send, record, 2, "done")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _within(event: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``; True if ``event`` was set first."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


class GraphQLApp:
    """A GraphQL server on graphql-core: POST JSON or GET ``?query=``, with Apollo APQ.

    ``root`` holds the root field values (plain values or callables taking the field's
    arguments). ``received`` records every GraphQL request (path, query, variables,
    operationName, headers) in arrival order.
    """

    def __init__(self, sdl: str, root: Mapping[str, Any], name: str = "graphql") -> None:
        self.name = name
        self.schema: GraphQLSchema = build_schema(sdl)
        self.root = dict(root)
        self.received: list[Record] = []
        self._persisted: dict[str, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await _respond(send, 200, {"status": "ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "GET":
            params = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
            payload: dict[str, Any] = {
                "query": params.get("query"),
                "operationName": params.get("operationName"),
                "variables": json.loads(params["variables"]) if "variables" in params else None,
                "extensions": json.loads(params["extensions"]) if "extensions" in params else None,
            }
        else:
            payload = json.loads(body or b"{}")
        record = {
            "path": scope["path"],
            "query": payload.get("query"),
            "variables": payload.get("variables"),
            "operationName": payload.get("operationName"),
            "extensions": payload.get("extensions"),
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        }
        self.received.append(record)
        query = payload.get("query")
        digest = ((payload.get("extensions") or {}).get("persistedQuery") or {}).get("sha256Hash")
        if digest:
            if query is None:
                query = self._persisted.get(digest)
                if query is None:
                    await _respond(
                        send,
                        200,
                        {
                            "errors": [
                                {
                                    "message": "PersistedQueryNotFound",
                                    "extensions": {"code": "PERSISTED_QUERY_NOT_FOUND"},
                                }
                            ]
                        },
                    )
                    return
            elif hashlib.sha256(query.encode()).hexdigest() == digest:
                self._persisted[digest] = query
        result = await graphql(
            self.schema,
            query or "",
            root_value=self._root(),
            variable_values=payload.get("variables"),
            operation_name=payload.get("operationName"),
        )
        document: dict[str, Any] = {"data": result.data}
        if result.errors:
            document["errors"] = [error.formatted for error in result.errors]
        await _respond(send, 200, document)

    def _root(self) -> dict[str, Any]:
        """graphql-core calls callables on the root value with (info, **arguments)."""
        resolved: dict[str, Any] = {}
        for name, value in self.root.items():
            if callable(value):
                resolved[name] = _resolver(value)
            else:
                resolved[name] = value
        return resolved


def _resolver(function: Any) -> Any:
    def resolve(_info: Any, **arguments: Any) -> Any:
        return function(**arguments)

    return resolve
