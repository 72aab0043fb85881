"""The ``consul`` backend: services from Consul's catalog, instances from its health API.

Consul's blocking queries replace polling: a request carrying ``index`` (the last
``X-Consul-Index`` seen) and ``wait`` is held by the server until something changes or the
wait elapses. One query follows the catalog (which services exist, optionally filtered by
``services``), and one per service follows ``/v1/health/service/{name}?passing`` (which
instances pass their checks). An instance's ``Service.Meta`` carries its ``farp.*`` keys;
its address is ``Service.Address`` (or the node's) and ``Service.Port``.

Consul documents that an index may go backwards (a snapshot restore, a rebuilt cluster);
then nothing held against the old numbering can be trusted, so the index is reset and
everything is re-listed. An error also resets the index: after an outage the server may be
a different one. Meanwhile the last snapshot stays, retries back off (capped, with jitter),
and the log says once that Consul is unavailable and once that it is back.

The KV store serves ``registry`` schema locations with etcd's layout under ``farp/``
(values over 100 KB may sit gzipped at the same key plus ``.gz``, read first).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx

from gateway.discovery.base import DiscoveredInstance
from gateway.discovery.remote import Backoff, ResilientBackend

log = logging.getLogger("octopus.discovery.consul")

#: Root of FARP's keys in the KV store (etcd's ``/farp`` prefix, Consul keys have no slash).
KV_PREFIX = "farp"


class _ConsulError(Exception):
    """An unsuccessful or malformed answer from Consul."""


def _go_duration(seconds: float) -> str:
    """``wait`` in Go's duration syntax, which is what Consul parses."""
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{round(seconds * 1000)}ms"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConsulBackend(ResilientBackend):
    """Catalog and health of a Consul datacenter, followed with blocking queries.

    Outage bookkeeping (``state``, ``last_error``, the ``failures``/``outages``/``relists``
    counters, one log line per transition) is :class:`ResilientBackend`'s; every query
    loop keeps its own backoff so that one failing service does not slow the others.
    """

    name = "consul"

    def __init__(
        self,
        address: str = "http://127.0.0.1:8500",
        token: str | None = None,
        datacenter: str | None = None,
        services: list[str] | None = None,
        *,
        wait: float = 60.0,
        request_timeout: float = 10.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
    ) -> None:
        super().__init__(backoff_initial=backoff_initial, backoff_max=backoff_max)
        # ``host:port`` as CONSUL_HTTP_ADDR is often written means plain HTTP.
        self.address = address if "://" in address else f"http://{address}"
        self.token = token
        self.datacenter = datacenter
        self.services = set(services) if services is not None else None
        self.wait = wait
        self.request_timeout = request_timeout
        self._instances: dict[str, list[DiscoveredInstance]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._catalog_listed = False
        self._initial = True
        self._pending: set[str] = set()
        self._failing: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._client: httpx.AsyncClient | None = None

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        catalog = asyncio.create_task(self._follow_catalog(), name="consul-catalog")
        last: list[DiscoveredInstance] | None = None
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                # The first snapshot waits for every service's first answer, so that the
                # gateway never starts from a half-known catalog.
                if not self._catalog_listed or (self._initial and self._pending):
                    continue
                self._initial = False
                snapshot = sorted(
                    (i for group in self._instances.values() for i in group), key=lambda i: i.key
                )
                if snapshot != last:
                    last = snapshot
                    yield snapshot
        finally:
            tasks = [catalog, *self._tasks.values()]
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def read_key(self, path: str) -> bytes | None:
        """``farp/{path}`` from the KV store, the ``.gz`` variant first; None when absent or
        when Consul cannot be asked (the schema fetch then fails and is retried later)."""
        key = f"{KV_PREFIX}/{path.lstrip('/')}"
        params = {"raw": ""}
        if self.datacenter:
            params["dc"] = self.datacenter
        for candidate, zipped in ((key + ".gz", True), (key, False)):
            try:
                response = await self._http().get(
                    f"/v1/kv/{quote(candidate, safe='/')}", params=params
                )
            except httpx.HTTPError as exc:
                log.warning("consul KV read failed", extra={"key": candidate, "error": str(exc)})
                return None
            if response.status_code == 404:
                continue
            if response.status_code != 200:
                log.warning(
                    "consul KV read failed",
                    extra={"key": candidate, "error": f"HTTP {response.status_code}"},
                )
                return None
            if not zipped:
                return response.content
            try:
                return gzip.decompress(response.content)
            except (OSError, EOFError) as exc:
                log.warning(
                    "consul KV value is not gzip", extra={"key": candidate, "error": str(exc)}
                )
                return None
        return None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- blocking queries ------------------------------------------------------------------

    async def _follow_catalog(self) -> None:
        index = 0
        backoff = Backoff(self.backoff.initial, self.backoff.maximum)
        while True:
            try:
                body, new_index = await self._query("/v1/catalog/services", index)
                if not isinstance(body, dict):
                    raise _ConsulError(
                        "/v1/catalog/services answered something else than an object"
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed("catalog", exc)
                index = 0
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            if new_index < index:
                self._relist_everything(new_index, index)
                index = 0
                continue
            index = new_index
            self._reconcile({name for name in body if self._wanted(name)})
            self._catalog_listed = True
            self._ok("catalog")
            self._changed.set()

    async def _follow_service(self, name: str) -> None:
        source = f"service:{name}"
        path = f"/v1/health/service/{quote(name, safe='')}"
        index = 0
        backoff = Backoff(self.backoff.initial, self.backoff.maximum)
        while True:
            try:
                body, new_index = await self._query(path, index, passing=True)
                if not isinstance(body, list):
                    raise _ConsulError(f"{path} answered something else than a list")
                instances = self._parse_health(name, body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A service that cannot be read must not hold back the first snapshot.
                self._pending.discard(name)
                self._failed(source, exc)
                self._changed.set()
                index = 0
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            if new_index < index:
                self.relists += 1
                log.info(
                    "consul index went backwards, re-listing the service",
                    extra={"service": name, "index": new_index, "previous": index},
                )
                index = 0
                continue
            index = new_index
            self._instances[name] = instances
            self._pending.discard(name)
            self._ok(source)
            self._changed.set()

    async def _query(self, path: str, index: int, *, passing: bool = False) -> tuple[Any, int]:
        """One (blocking when ``index`` is set) query; the body and the index to wait on next."""
        params: dict[str, str] = {}
        if self.datacenter:
            params["dc"] = self.datacenter
        if passing:
            params["passing"] = "1"
        if index > 0:
            params["index"] = str(index)
            params["wait"] = _go_duration(self.wait)
        # Consul adds up to wait/16 of jitter to the wait; the read timeout allows for it.
        read = self.wait + self.wait / 16 + self.request_timeout
        response = await self._http().get(
            path, params=params, timeout=httpx.Timeout(self.request_timeout, read=read)
        )
        if response.status_code != 200:
            raise _ConsulError(
                f"GET {path} answered {response.status_code}: {response.text.strip()[:200]}"
            )
        raw = response.headers.get("X-Consul-Index")
        try:
            new_index = int(raw) if raw is not None else None
        except ValueError:
            new_index = None
        if new_index is None:
            raise _ConsulError(f"GET {path} answered without a valid X-Consul-Index")
        # Consul's advice: an index below 1 would make the next query return at once, forever.
        return response.json(), max(new_index, 1)

    def _reconcile(self, names: set[str]) -> None:
        """Start following new services, stop following (and drop) removed ones."""
        for name in set(self._tasks) - names:
            self._tasks.pop(name).cancel()
            self._instances.pop(name, None)
            self._pending.discard(name)
            self._failing.pop(f"service:{name}", None)
        for name in sorted(names - set(self._tasks)):
            if self._initial:
                self._pending.add(name)
            self._tasks[name] = asyncio.create_task(
                self._follow_service(name), name=f"consul-service-{name}"
            )

    def _relist_everything(self, new_index: int, previous: int) -> None:
        """The catalog's index went backwards: restart every service query from index 0.
        Their instances stay in the snapshot until their fresh answers replace them."""
        self.relists += 1
        log.info(
            "consul index went backwards, re-listing everything",
            extra={"index": new_index, "previous": previous},
        )
        for name in list(self._tasks):
            self._tasks.pop(name).cancel()
            self._tasks[name] = asyncio.create_task(
                self._follow_service(name), name=f"consul-service-{name}"
            )

    def _wanted(self, name: str) -> bool:
        return self.services is None or name in self.services

    def _parse_health(self, name: str, entries: list[Any]) -> list[DiscoveredInstance]:
        instances = []
        for entry in entries:
            node = entry.get("Node") or {}
            service = entry.get("Service") or {}
            host = service.get("Address") or node.get("Address")
            port = service.get("Port")
            if not host or not port:
                continue
            service_id = str(service.get("ID") or name)
            meta = service.get("Meta") or {}
            instances.append(
                DiscoveredInstance(
                    key=f"consul:{name}/{node.get('Node') or ''}/{service_id}",
                    manifest=None,
                    address=_host_port(str(host), int(port)),
                    service_name=str(service.get("Service") or name),
                    instance_id=service_id,
                    metadata={k: str(v) for k, v in meta.items() if k.startswith("farp.")},
                )
            )
        return instances

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"X-Consul-Token": self.token} if self.token else {}
            self._client = httpx.AsyncClient(
                base_url=self.address,
                headers=headers,
                timeout=httpx.Timeout(self.request_timeout),
                # One held query per followed service, plus the catalog's.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            )
        return self._client

    # --- state -----------------------------------------------------------------------------

    def _failed(self, source: str, exc: Exception) -> None:
        self._failing[source] = str(exc)
        self.failed(exc, source)  # its delay is unused: each loop has its own backoff

    def _ok(self, source: str) -> None:
        """``source`` answered; the backend is back once nothing is failing and the
        catalog (and, at start, every service) has been read."""
        self._failing.pop(source, None)
        if not self._failing and self._catalog_listed and not (self._initial and self._pending):
            self.recovered()
