"""Helpers for the FARP battery: gateways and upstreams on real sockets, manifest files,
admin documents and Prometheus metrics read back from a running gateway."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.asgi import GatewayApp, create_app
from gateway.runtime import Gateway
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamApp
from tests.support.waiting import eventually as wait_until

T = TypeVar("T")

#: How long any expected change may take to show (discovery polls every 100 ms).
DEADLINE = 10.0
#: ``endpoints.health`` of the manifests ``publish.make_manifest`` writes: the gateway
#: probes it on every instance (active health checks), so tests leave it out of counts.
PROBE_PATH = "/health"


def eventually(
    predicate: Callable[[], T],
    *,
    timeout: float = DEADLINE,
    interval: float = 0.02,
    message: str | Callable[[], str] = "",
) -> T:
    """``tests.support.waiting.eventually`` with this folder's deadline."""
    return wait_until(predicate, timeout=timeout, interval=interval, message=message)


def base_config(discovery: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A gateway config dict (YAML shape): no static routes, fast discovery, quiet logs."""
    config: dict[str, Any] = {
        "discovery": discovery,
        "farp": {"watch_interval": "100ms"},
        "observability": {"logging": {"access_log": False}},
        "routing": {"retries": 0},
    }
    config.update(sections)
    return config


def static_config(*manifests: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return base_config({"backend": "static", "static": {"manifests": list(manifests)}}, **sections)


def file_config(directory: Path, **sections: Any) -> dict[str, Any]:
    return base_config({"backend": "file", "file": {"path": str(directory)}}, **sections)


class Upstream:
    """An :class:`UpstreamApp` on a real socket; ``address`` is what manifests publish."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.app = UpstreamApp(name)
        self.server = ThreadedServer(self.app)
        self.address = f"127.0.0.1:{self.server.port}"
        self.url = self.server.url

    def start(self) -> Upstream:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def clear(self) -> None:
        self.app.requests.clear()

    @property
    def requests(self) -> list[dict[str, Any]]:
        """What the gateway forwarded: every request except its active health probes."""
        return [r for r in list(self.app.requests) if r["path"] != PROBE_PATH]

    @property
    def paths(self) -> list[str]:
        return [record["path"] for record in self.requests]

    def header(self, record: dict[str, Any], name: str) -> str | None:
        return next((v for k, v in record["headers"] if k == name), None)


class RunningGateway:
    """``create_app(config)`` served by uvicorn in a thread (lifespan on)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.app: GatewayApp = create_app(config)
        self.server = ThreadedServer(self.app)
        self.url = self.server.url
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def gateway(self) -> Gateway:
        return self.app.gateway

    def start(self) -> RunningGateway:
        self.server.start()
        return self

    def stop(self) -> None:
        self.http.close()
        self.server.stop()

    def get(self, path: str, **options: Any) -> httpx.Response:
        return self.http.get(path, **options)

    def request(self, method: str, path: str, **options: Any) -> httpx.Response:
        return self.http.request(method, path, **options)

    def ready(self) -> bool:
        return self.get("/_/ready").status_code == 200

    def wait_ready(self) -> RunningGateway:
        eventually(self.ready, message="the gateway never became ready")
        return self

    def routes(self) -> dict[str, Any]:
        return self.get("/_/routes").json()

    def route_paths(self) -> set[str]:
        return {route["path"] for route in self.routes()["routes"]}

    def wait_route(self, path: str, present: bool = True) -> None:
        eventually(
            lambda: (path in self.route_paths()) == present,
            message=lambda: f"route {path} present={present} never held: {self.route_paths()}",
        )

    def services(self) -> dict[str, Any]:
        return self.get("/_/services").json()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample as ``{(name, frozenset(labels.items())): value}``."""
        text = self.get("/metrics").text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, frozenset(labels.items())))


def write_json(directory: Path, name: str, document: Any) -> Path:
    """Write ``directory/name`` atomically (a temporary file, then a rename), as a
    careful publisher does; the temporary name has a suffix the file backend ignores."""
    target = directory / name
    temporary = directory / f".{name}.partial"
    temporary.write_text(json.dumps(document), encoding="utf-8")
    os.replace(temporary, target)
    return target


def openapi(*paths: str | tuple[str, Iterable[str]], title: str = "test") -> dict[str, Any]:
    """A small OpenAPI 3.1 document; each path is ``"/p"`` (GET) or ``("/p", methods)``."""
    items: dict[str, Any] = {}
    for entry in paths:
        path, methods = (entry, ("get",)) if isinstance(entry, str) else entry
        items[path] = {
            method.lower(): {
                "operationId": f"{method.lower()}{path.replace('/', '_')}",
                "responses": {"200": {"description": "OK"}},
            }
            for method in methods
        }
    return {"openapi": "3.1.0", "info": {"title": title, "version": "1.0.0"}, "paths": items}


class SchemaServer:
    """An ASGI app serving schema documents by path, as a service's schema endpoint.

    ``token``: answer 401 unless the ``x-schema-token`` header carries it. ``status``:
    answer that status instead of the document. ``gate``: requests wait until it is set.
    ``seen`` records the headers of every request.
    """

    def __init__(self, documents: dict[str, tuple[str, bytes]], token: str | None = None) -> None:
        self.documents = documents
        self.token = token
        self.status = 200
        self.seen: list[dict[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def put(self, path: str, document: Any) -> None:
        self.documents[path] = ("application/json", json.dumps(document).encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append(headers)
        await asyncio.to_thread(self.gate.wait, 30)
        found = self.documents.get(scope["path"])
        if self.token is not None and headers.get("x-schema-token") != self.token:
            status, content_type, body = 401, "text/plain", b"token required"
        elif self.status != 200:
            status, content_type, body = self.status, "text/plain", b"unavailable"
        elif found is None:
            status, content_type, body = 404, "text/plain", b"no such document"
        else:
            status, (content_type, body) = 200, found
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
