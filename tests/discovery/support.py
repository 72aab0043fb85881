"""Helpers for the discovery tests: a recorder of a backend's snapshots (async), a
running gateway (threaded), and manifests built the way publishers build them.

Everything waits by polling with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from gateway.asgi import GatewayApp, create_app
from gateway.discovery.base import DiscoveredInstance, DiscoveryBackend
from gateway.farp.publish import inline_schema, make_manifest
from tests.support.servers import ThreadedServer
from tests.support.waiting import eventually as wait_until

T = TypeVar("T")

#: How long any expected change may take to show.
DEADLINE = 10.0

Snapshot = list[DiscoveredInstance]


def eventually(
    predicate: Callable[[], T], *, timeout: float = DEADLINE, message: str | Callable[[], str] = ""
) -> T:
    """``tests.support.waiting.eventually`` with this folder's deadline."""
    return wait_until(predicate, timeout=timeout, interval=0.02, message=message)


async def until(
    predicate: Callable[[], T], *, timeout: float = DEADLINE, message: str | Callable[[], str] = ""
) -> T:
    """Poll ``predicate`` on the event loop until it is truthy (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(text or f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


class Collector:
    """Runs ``backend.watch()`` in a task and records every snapshot it yields, as the
    FARP watcher would consume it. ``async with Collector(backend) as c``."""

    def __init__(self, backend: DiscoveryBackend) -> None:
        self.backend = backend
        self.snapshots: list[Snapshot] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for snapshot in self.backend.watch():
            self.snapshots.append(snapshot)

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.backend.close()

    @property
    def latest(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def _alive(self) -> None:
        assert self._task is not None
        if self._task.done():
            raise AssertionError(f"the watch loop ended: {self._task.exception()!r}")

    async def wait(self, predicate: Callable[[Snapshot], bool], what: str = "") -> Snapshot:
        """The first latest snapshot satisfying ``predicate``."""

        def check() -> tuple[Snapshot] | None:  # a tuple: an empty snapshot is falsy
            self._alive()
            latest = self.latest
            return (latest,) if latest is not None and predicate(latest) else None

        (found,) = await until(
            check, message=lambda: f"no snapshot {what}; latest: {describe(self.latest)}"
        )
        return found

    async def wait_state(self, state: str) -> None:
        def check() -> bool:
            self._alive()
            return self.backend.state == state

        await until(check, message=lambda: f"state {self.backend.state}, expected {state}")


def describe(snapshot: Snapshot | None) -> Any:
    if snapshot is None:
        return None
    return [(i.key, i.address, (i.manifest or {}).get("service_name")) for i in snapshot]


def services(snapshot: Snapshot) -> dict[str, list[str]]:
    """``{service_name: [instance_id, ...]}`` of a snapshot."""
    found: dict[str, list[str]] = {}
    for instance in snapshot:
        found.setdefault(instance.service_name or "?", []).append(instance.instance_id or "?")
    return {name: sorted(ids) for name, ids in sorted(found.items())}


def openapi(*paths: str, title: str = "test") -> dict[str, Any]:
    """A small OpenAPI 3.1 document with a GET operation per path."""
    items = {
        path: {
            "get": {
                "operationId": "get" + path.replace("/", "_"),
                "responses": {"200": {"description": "OK"}},
            }
        }
        for path in paths
    }
    return {"openapi": "3.1.0", "info": {"title": title, "version": "1.0.0"}, "paths": items}


def manifest(
    service: str, address: str, *paths: str, instance_id: str | None = None, **options: Any
) -> dict[str, Any]:
    """A valid manifest mounting ``paths`` under ``/{service}`` and serving them at
    ``address``, with the OpenAPI document inline."""
    options.setdefault("routing", {"strategy": "service"})
    schemas = options.pop("schemas", None) or [inline_schema("openapi", openapi(*paths))]
    return make_manifest(service, instance_id or f"{service}-1", address, schemas, **options)


class Gateway:
    """``create_app(config)`` served in a thread, with the admin API on the same port."""

    def __init__(
        self, discovery: dict[str, Any], watch_interval: str = "200ms", **extra: Any
    ) -> None:
        config = {
            "discovery": discovery,
            "farp": {"watch_interval": watch_interval},
            "observability": {"logging": {"access_log": False}},
            "routing": {"retries": 0},
            **extra,
        }
        self.app: GatewayApp = create_app(config)
        self.server = ThreadedServer(self.app)
        self.http = httpx.Client(base_url=self.server.url, timeout=10)

    def start(self) -> Gateway:
        self.server.start()
        eventually(
            lambda: self.http.get("/_/ready").status_code == 200,
            timeout=DEADLINE,
            message="the gateway never became ready",
        )
        return self

    def stop(self) -> None:
        self.http.close()
        self.server.stop()

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def route_paths(self) -> set[str]:
        return {route["path"] for route in self.http.get("/_/routes").json()["routes"]}

    def wait_route(self, path: str, present: bool = True) -> None:
        eventually(
            lambda: (path in self.route_paths()) == present,
            timeout=DEADLINE,
            message=lambda: f"route {path} present={present} never held: {self.route_paths()}",
        )

    def discovery(self) -> list[dict[str, Any]]:
        return self.http.get("/_/services").json()["discovery"]

    def wait_discovery_state(self, state: str) -> None:
        eventually(
            lambda: [d["state"] for d in self.discovery()] == [state],
            timeout=DEADLINE,
            message=lambda: f"discovery state never {state}: {self.discovery()}",
        )
