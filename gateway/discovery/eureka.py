"""The ``eureka`` backend: applications registered in a Eureka server, polled with deltas.

Eureka has no push channel; its own clients fetch ``/apps`` once and then ``/apps/delta``
(the changes of the last few minutes, each instance tagged ``ADDED``, ``MODIFIED`` or
``DELETED``) on an interval. This backend does the same every ``farp.watch_interval``.
Every delta carries ``apps__hashcode``, a digest of the server's whole registry (how many
instances are in each status); the client computes it over its own copy after applying
the delta, and a mismatch (a change that left the delta window, a missed poll) means the
copy has drifted: the full registry is fetched again. The copy keeps instances in every
status because the digest counts them all; snapshots carry the ``UP`` ones only.

An instance's ``metadata`` carries its ``farp.*`` keys; its address is ``ipAddr`` and
``port.$``. On an outage the last snapshot stays, retries back off (capped, with jitter),
the log says once that Eureka is unavailable and once that it is back, and the first poll
after recovery is a full fetch (the deltas seen before cannot be trusted to connect).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from gateway.discovery.base import DiscoveredInstance
from gateway.discovery.remote import ResilientBackend

log = logging.getLogger("octopus.discovery.eureka")

#: app name -> instance id -> instance document (all statuses).
Registry = dict[str, dict[str, dict[str, Any]]]


class _EurekaError(Exception):
    """An unsuccessful or malformed answer from Eureka."""


def reconcile_hashcode(registry: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Eureka's ``apps__hashcode``: ``STATUS_count_`` for each status present, statuses in
    ascending order (Eureka counts into a TreeMap), e.g. ``DOWN_1_UP_3_``; ``""`` when empty."""
    counts = Counter(
        str(instance.get("status") or "UNKNOWN")
        for instances in registry.values()
        for instance in instances.values()
    )
    return "".join(f"{status}_{counts[status]}_" for status in sorted(counts))


def _as_list(value: Any) -> list[Any]:
    """Eureka's JSON writes a one-element collection as the element itself on some servers."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _applications(document: Any) -> dict[str, Any]:
    root = document.get("applications") if isinstance(document, dict) else None
    if not isinstance(root, dict):
        raise _EurekaError("answer without an 'applications' object")
    return root


def _instance_id(instance: Mapping[str, Any]) -> str:
    # Old servers have no instanceId; Eureka itself then identifies instances by host name.
    return str(instance.get("instanceId") or instance.get("hostName") or instance.get("ipAddr"))


def _port(value: Any) -> int | None:
    if isinstance(value, dict):
        value = value.get("$")
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class EurekaBackend(ResilientBackend):
    """A Eureka registry, fetched in full once and then followed through deltas.

    ``relists`` counts full fetches forced by a hash mismatch; the other outage
    bookkeeping is :class:`ResilientBackend`'s.
    """

    name = "eureka"

    def __init__(
        self,
        url: str = "http://127.0.0.1:8761/eureka",
        username: str | None = None,
        password: str | None = None,
        *,
        interval: float = 5.0,
        request_timeout: float = 10.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
    ) -> None:
        super().__init__(backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.url = url.rstrip("/")
        self.username = username
        self.password = password
        self.interval = interval
        self.request_timeout = request_timeout
        #: Full registry fetches, including those forced by a hash mismatch.
        self.full_fetches = 0
        self._registry: Registry = {}
        self._client: httpx.AsyncClient | None = None

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        last: list[DiscoveredInstance] | None = None
        full = True
        while True:
            try:
                if full or not await self._apply_delta():
                    await self._fetch_full()
                full = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: keep the last snapshot and retry
                full = True
                await asyncio.sleep(self.failed(exc, f"poll {self.url}"))
                continue
            self.recovered()
            snapshot = self._snapshot()
            if snapshot != last:
                last = snapshot
                yield snapshot
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _fetch_full(self) -> None:
        root = _applications(await self._get("apps"))
        registry: Registry = {}
        for app in _as_list(root.get("application")):
            for instance in _as_list(app.get("instance")):
                name = str(app.get("name") or instance.get("app") or "")
                registry.setdefault(name, {})[_instance_id(instance)] = instance
        self._registry = registry
        self.full_fetches += 1

    async def _apply_delta(self) -> bool:
        """Merge ``/apps/delta`` into the local copy; False when a full fetch is needed."""
        document = await self._get("apps/delta", allow_forbidden=True)
        if document is None:
            return False  # the server has deltas disabled (it answers 403)
        root = _applications(document)
        for app in _as_list(root.get("application")):
            for instance in _as_list(app.get("instance")):
                name = str(app.get("name") or instance.get("app") or "")
                ident = _instance_id(instance)
                if instance.get("actionType") == "DELETED":
                    instances = self._registry.get(name, {})
                    instances.pop(ident, None)
                    if not instances:
                        self._registry.pop(name, None)
                else:  # ADDED and MODIFIED both carry the whole instance
                    self._registry.setdefault(name, {})[ident] = instance
        remote = str(root.get("apps__hashcode") or "")
        local = reconcile_hashcode(self._registry)
        if remote != local:
            self.relists += 1
            log.info(
                "eureka delta does not match the local copy, fetching the full registry",
                extra={"local": local, "remote": remote},
            )
            return False
        return True

    async def _get(self, path: str, *, allow_forbidden: bool = False) -> Any:
        response = await self._http().get(path)
        if allow_forbidden and response.status_code == 403:
            return None
        if response.status_code != 200:
            raise _EurekaError(f"GET {self.url}/{path} answered {response.status_code}")
        return response.json()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            auth = httpx.BasicAuth(self.username, self.password or "") if self.username else None
            self._client = httpx.AsyncClient(
                base_url=self.url,
                auth=auth,
                # Eureka answers XML unless asked for JSON.
                headers={"Accept": "application/json"},
                timeout=httpx.Timeout(self.request_timeout),
            )
        return self._client

    def _snapshot(self) -> list[DiscoveredInstance]:
        found = []
        for app, instances in self._registry.items():
            for ident, instance in instances.items():
                if instance.get("status") != "UP":
                    continue
                host = instance.get("ipAddr") or instance.get("hostName")
                port = _port(instance.get("port"))
                if not host or port is None:
                    continue
                address = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
                metadata = instance.get("metadata") or {}
                found.append(
                    DiscoveredInstance(
                        key=f"eureka:{app}/{ident}",
                        manifest=None,
                        address=address,
                        # Eureka upper-cases application names; services are conventionally
                        # lower-case, and the manifest's own service_name wins anyway.
                        service_name=app.lower(),
                        instance_id=ident,
                        metadata={
                            k: str(v) for k, v in metadata.items() if str(k).startswith("farp.")
                        },
                    )
                )
        return sorted(found, key=lambda instance: instance.key)
