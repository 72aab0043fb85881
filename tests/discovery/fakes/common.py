"""Plumbing shared by the fake discovery servers and their tests.

A fake is an ASGI app served by :class:`tests.support.servers.ThreadedServer` (uvicorn in a
thread with its own loop). Tests mutate the fake's state from their own thread, possibly
while it is stopped (a change made during an outage), so the state lives behind a
``threading.RLock`` and wake-ups cross threads through :class:`Changes`. Held requests
(watch streams, blocking queries) end when the fake stops, so a stop takes milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs

from gateway.discovery.base import DiscoveredInstance, DiscoveryBackend
from tests.support.servers import ThreadedServer

T = TypeVar("T")


class Changes:
    """Cross-thread wake-ups: handlers on the server's loop wait, mutators on any thread
    notify. A handler takes a waiter *before* checking state, so no notification is lost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def waiter(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.append((loop, future))
        return future

    def notify(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed (server stopped)
                loop.call_soon_threadsafe(_resolve, future)

    @staticmethod
    async def wait(future: asyncio.Future[None], timeout: float) -> None:
        """Until notified or ``timeout`` seconds have passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(future, max(timeout, 0))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class FakeServer:
    """Start, stop and restart (on the same port) one fake; record every request."""

    def __init__(self, **server_options: Any) -> None:
        self.lock = threading.RLock()
        self.changes = Changes()
        self.closing = False
        self.port = 0
        self._options = server_options
        self._server: ThreadedServer | None = None
        self._requests: list[Recorded] = []

    def build_app(self) -> Any:
        raise NotImplementedError

    def start(self) -> FakeServer:
        self.closing = False
        inner = self.build_app()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                self._record(scope)
            await inner(scope, receive, send)

        options = {"timeout_graceful_shutdown": 1, **self._options}
        self._server = ThreadedServer(app, port=self.port, **options).start()
        self.port = self._server.port
        return self

    def stop(self) -> None:
        """Stop listening; held requests are released first so that shutdown is quick."""
        self.closing = True
        self.changes.notify()
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def url(self) -> str:
        scheme = "https" if self._options.get("ssl_certfile") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _record(self, scope: dict[str, Any]) -> None:
        query = {
            key: values[-1]
            for key, values in parse_qs(
                scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
            ).items()
        }
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self.lock:
            self._requests.append(Recorded(scope["method"], scope["path"], query, headers))

    def requests(self, path: str | None = None) -> list[Recorded]:
        """Requests received so far, optionally only those for ``path``."""
        with self.lock:
            return [r for r in self._requests if path is None or r.path == path]

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- test side -------------------------------------------------------------------------------


async def until(predicate: Callable[[], T], *, timeout: float = 5.0, message: str = "") -> T:
    """Poll ``predicate`` on the test's loop (the backend runs there too) until truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


class Collector:
    """Runs ``backend.watch()`` in a task and keeps every snapshot it yields."""

    def __init__(self, backend: DiscoveryBackend) -> None:
        self.backend = backend
        self.snapshots: list[list[DiscoveredInstance]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.backend.close()

    async def _run(self) -> None:
        async for snapshot in self.backend.watch():
            self.snapshots.append(snapshot)

    async def wait_for(
        self, predicate: Callable[[list[DiscoveredInstance]], bool], *, timeout: float = 5.0
    ) -> list[DiscoveredInstance]:
        """The latest snapshot once it satisfies ``predicate``."""

        def check() -> bool:
            assert self._task is not None
            if self._task.done():  # the watch loop died: show why instead of timing out
                self._task.result()
                raise AssertionError("the backend's watch() ended")
            return bool(self.snapshots) and predicate(self.snapshots[-1])

        await until(check, timeout=timeout, message=f"last snapshots: {self.snapshots[-2:]}")
        return self.snapshots[-1]


def addresses(snapshot: Iterable[DiscoveredInstance], service: str | None = None) -> set[str]:
    """The addresses in a snapshot, optionally of one service only."""
    return {
        str(instance.address)
        for instance in snapshot
        if service is None or instance.service_name == service
    }
