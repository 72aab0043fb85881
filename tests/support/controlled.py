"""An upstream a test can stop, restart, slow down and make fail while the gateway runs.

``ControlledApp`` answers every request (except its health check) with a small JSON
document naming the server, after an optional delay, with an optional failure status:

- ``delay``: seconds each request is held before it is answered (a client that leaves
  ends the hold; :meth:`ControlledApp.release` ends every hold at once, so a test never
  waits for a long delay to run out);
- ``fail_status``: answer every request with this status instead of 200;
- ``health_status``: what ``GET /health`` answers (200 by default); health probes are
  counted in ``health_probes``, never in ``requests``, so ``arrivals`` is real traffic.

``ControlledUpstream`` serves one on uvicorn in a thread; ``stop()`` takes it off the
network (connections are then refused) and ``start()`` brings it back on the same port.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

from gateway.types import Receive, Scope, Send
from tests.support.servers import ThreadedServer

HEALTH_PATH = "/health"


class ControlledApp:
    """The ASGI app behind a :class:`ControlledUpstream`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0
        self.fail_status: int | None = None
        self.health_status = 200
        #: Every non-health request, in arrival order (method, path, headers, server).
        self.requests: list[dict[str, Any]] = []
        self.health_probes = 0
        self.in_flight = 0
        self._lock = threading.Lock()
        self._released = 0  # bumped by release(): holds that started before it end

    @property
    def arrivals(self) -> int:
        """How many requests (health probes excluded) reached this server."""
        return len(self.requests)

    def arrivals_of(self, method: str) -> int:
        return sum(1 for request in self.requests if request["method"] == method)

    def release(self) -> None:
        """End every current hold now (the held requests are answered)."""
        with self._lock:
            self._released += 1

    def heal(self) -> None:
        """Back to answering 200 at once, health included."""
        self.delay = 0.0
        self.fail_status = None
        self.health_status = 200
        self.release()

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
        if scope["path"] == HEALTH_PATH:
            with self._lock:
                self.health_probes += 1
            status = self.health_status
            await _respond(send, status, json.dumps({"server": self.name, "status": status}))
            return
        with self._lock:
            self.in_flight += 1
        try:
            await self._answer(scope, receive, send)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        record: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            "server": self.name,
        }
        self.requests.append(record)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                record["abandoned"] = True
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        record["body_size"] = size
        if self.delay > 0 and await self._hold(receive, self.delay):
            record["abandoned"] = True
            return
        status = self.fail_status or 200
        await _respond(send, status, json.dumps({**record, "status": status}))

    async def _hold(self, receive: Receive, delay: float) -> bool:
        """Wait ``delay`` seconds or until released; True if the client left first."""
        released = self._released
        loop = asyncio.get_running_loop()
        until = loop.time() + delay

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            while self._released == released:
                left = until - loop.time()
                if left <= 0:
                    return False
                done, _ = await asyncio.wait({watcher}, timeout=min(left, 0.02))
                if done:
                    return True
            return False
        finally:
            watcher.cancel()


async def _respond(send: Send, status: int, text: str) -> None:
    body = text.encode()
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


class ControlledUpstream:
    """A :class:`ControlledApp` on a fixed port that can go down and come back."""

    def __init__(self, name: str = "upstream", **options: Any) -> None:
        self.name = name
        self.app = ControlledApp(name)
        self._options = options
        self._server = ThreadedServer(self.app, **options)
        self.port = self._server.port
        self.url = self._server.url
        self.running = False

    def start(self) -> ControlledUpstream:
        """Serve (again, on the same port after a ``stop()``)."""
        if self.running:
            return self
        if self._server.server.started:  # a stopped server cannot serve twice
            self._server = ThreadedServer(self.app, port=self.port, **self._options)
        self._server.start()
        self.running = True
        return self

    def stop(self) -> None:
        """Go off the network: held requests are released, then connections close."""
        if not self.running:
            return
        self.running = False
        self.app.release()
        self._server.stop()

    def __enter__(self) -> ControlledUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The ``make_upstream`` fixture of the resilience tests: a name (and ThreadedServer
#: options) in, a started controllable upstream out.
MakeControlled = Callable[..., ControlledUpstream]
