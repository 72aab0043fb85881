"""A fake Consul agent: catalog, health and KV over HTTP with blocking queries.

What it implements, as Consul does:

- a raft-like index bumped by every write; ``/v1/catalog/services`` answers with the index
  of the services table (every registration or deregistration), ``/v1/health/service/{name}``
  with the last index that touched that service (its instances or their checks);
- blocking queries: with ``?index=N`` the request is held while the endpoint's index is
  still <= N, until it moves or ``wait`` (Go duration, default 5m, at most 10m, plus up to
  wait/16 of jitter) elapses; the answer always carries ``X-Consul-Index``;
- ``reset_index()``: the index goes backwards (a snapshot restore): held queries are woken,
  as Consul's abandoned state store wakes them, and answer with the lower index;
- ``?passing`` on health: only instances whose checks (node and service) all pass;
- ``?dc=``: other datacenters answer 500 ``No path to datacenter``;
- ACLs: with a ``token``, requests without a matching ``X-Consul-Token`` get 403;
- KV reads, ``?raw`` for the bare value, else the JSON entry list with base64 values.
"""

from __future__ import annotations

import base64
import random
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.discovery.fakes.common import Changes, FakeServer

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """``1m30s``, ``500ms``, ``0.5s`` -> seconds (Go's ``time.ParseDuration``)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def _flag(query: Any, name: str) -> bool:
    """Consul's boolean query flags: present without a value means true."""
    if name not in query:
        return False
    value = query.get(name) or "true"
    return value.lower() in ("1", "t", "true")


class FakeConsul(FakeServer):
    def __init__(
        self, *, token: str | None = None, datacenter: str = "dc1", **server_options: Any
    ) -> None:
        super().__init__(**server_options)
        self.token = token
        self.datacenter = datacenter
        self.index = 10
        self.catalog_index = 10
        self.service_index: dict[str, int] = {}
        #: service -> service id -> registration
        self.registrations: dict[str, dict[str, dict[str, Any]]] = {}
        self.kv: dict[str, tuple[bytes, int]] = {}
        self._epoch = 0
        # Consul servers register themselves, so a real catalog is never empty.
        self.register("consul", "consul", node="server-1", node_address="127.0.0.1", port=8300)

    # --- mutators (any thread) -------------------------------------------------------------

    def register(
        self,
        service: str,
        service_id: str,
        *,
        node: str = "node-1",
        node_address: str = "10.0.0.1",
        address: str = "",
        port: int = 8080,
        meta: dict[str, str] | None = None,
        passing: bool = True,
    ) -> None:
        with self.lock:
            self.index += 1
            self.registrations.setdefault(service, {})[service_id] = {
                "node": node,
                "node_address": node_address,
                "address": address,
                "port": port,
                "meta": dict(meta or {}),
                "passing": passing,
            }
            self.service_index[service] = self.index
            self.catalog_index = self.index
        self.changes.notify()

    def deregister(self, service: str, service_id: str) -> None:
        with self.lock:
            self.index += 1
            instances = self.registrations.get(service, {})
            instances.pop(service_id, None)
            if not instances:
                self.registrations.pop(service, None)
            self.service_index[service] = self.index
            self.catalog_index = self.index
        self.changes.notify()

    def set_passing(self, service: str, service_id: str, passing: bool) -> None:
        """A check changes status: the health index moves, the catalog's does not."""
        with self.lock:
            self.index += 1
            self.registrations[service][service_id]["passing"] = passing
            self.service_index[service] = self.index
        self.changes.notify()

    def put_kv(self, key: str, value: bytes) -> None:
        with self.lock:
            self.index += 1
            self.kv[key] = (value, self.index)
        self.changes.notify()

    def reset_index(self, change: Callable[[], None] | None = None) -> None:
        """Apply ``change``, then move every index back below where clients are (a snapshot
        restore into a fresh cluster) and wake held queries."""
        with self.lock:
            if change is not None:
                change()
            self.index = 3
            self.catalog_index = 3
            self.service_index = dict.fromkeys(self.service_index, 3)
            self._epoch += 1
        self.changes.notify()

    # --- HTTP ------------------------------------------------------------------------------

    def build_app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/catalog/services", self._catalog),
                Route("/v1/health/service/{name}", self._health),
                Route("/v1/kv/{key:path}", self._kv),
            ]
        )

    def _refused(self, request: Request) -> Response | None:
        if self.token and request.headers.get("x-consul-token") != self.token:
            return PlainTextResponse("ACL not found", status_code=403)
        dc = request.query_params.get("dc")
        if dc and dc != self.datacenter:
            return PlainTextResponse("No path to datacenter", status_code=500)
        return None

    async def _blocking(
        self, request: Request, current_index: Callable[[], int], body: Callable[[], Any]
    ) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        query = request.query_params
        try:
            index = int(query.get("index") or 0)
            wait = min(parse_go_duration(query.get("wait") or "5m"), 600.0)
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
        with self.lock:
            epoch = self._epoch
        while True:
            waiter = self.changes.waiter()
            with self.lock:
                current = current_index()
                if (
                    index == 0
                    or current > index
                    or self.closing
                    or self._epoch != epoch
                    or time.monotonic() >= deadline
                ):
                    return JSONResponse(body(), headers={"X-Consul-Index": str(current)})
            await Changes.wait(waiter, deadline - time.monotonic())

    async def _catalog(self, request: Request) -> Response:
        def body() -> dict[str, list[str]]:
            return {name: [] for name in sorted(self.registrations)}

        return await self._blocking(request, lambda: self.catalog_index, body)

    async def _health(self, request: Request) -> Response:
        name = request.path_params["name"]
        only_passing = _flag(request.query_params, "passing")

        def body() -> list[dict[str, Any]]:
            entries = []
            for service_id, reg in sorted(self.registrations.get(name, {}).items()):
                if only_passing and not reg["passing"]:
                    continue
                entries.append(self._entry(name, service_id, reg))
            return entries

        return await self._blocking(
            request, lambda: self.service_index.get(name, self.catalog_index), body
        )

    def _entry(self, name: str, service_id: str, reg: dict[str, Any]) -> dict[str, Any]:
        node = reg["node"]
        service_status = "passing" if reg["passing"] else "critical"
        return {
            "Node": {
                "ID": f"{node}-id",
                "Node": node,
                "Address": reg["node_address"],
                "Datacenter": self.datacenter,
                "TaggedAddresses": {"lan": reg["node_address"], "wan": reg["node_address"]},
                "Meta": {"consul-network-segment": ""},
            },
            "Service": {
                "ID": service_id,
                "Service": name,
                "Tags": [],
                "Address": reg["address"],
                "Meta": reg["meta"],
                "Port": reg["port"],
                "Weights": {"Passing": 1, "Warning": 1},
                "EnableTagOverride": False,
            },
            "Checks": [
                {
                    "Node": node,
                    "CheckID": "serfHealth",
                    "Name": "Serf Health Status",
                    "Status": "passing",
                    "ServiceID": "",
                    "ServiceName": "",
                },
                {
                    "Node": node,
                    "CheckID": f"service:{service_id}",
                    "Name": f"Service '{name}' check",
                    "Status": service_status,
                    "ServiceID": service_id,
                    "ServiceName": name,
                },
            ],
        }

    async def _kv(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        key = request.path_params["key"]
        with self.lock:
            found = self.kv.get(key)
            index = self.index
        headers = {"X-Consul-Index": str(index)}
        if found is None:
            return Response(status_code=404, headers=headers)
        value, modify_index = found
        if "raw" in request.query_params:
            return Response(value, media_type="application/octet-stream", headers=headers)
        entry = {
            "Key": key,
            "Value": base64.b64encode(value).decode("ascii"),
            "Flags": 0,
            "CreateIndex": modify_index,
            "ModifyIndex": modify_index,
            "LockIndex": 0,
        }
        return JSONResponse([entry], headers=headers)
