"""The lifespan task that turns discovery snapshots into routing tables.

Backends push whole snapshots; bursts are debounced; each rebuild validates what
changed, fetches schemas, generates routes with a pure function and swaps the table in
one assignment. Anything that fails (a bad manifest, an unreachable schema, a backend
outage) keeps the last good state of that instance, and the table keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from gateway.discovery.base import DiscoveredInstance, DiscoveryBackend
from gateway.discovery.metadata import is_enabled, resolve_manifest
from gateway.farp.canonical import canonical_json
from gateway.farp.manifest import Manifest, ManifestError, parse_manifest
from gateway.farp.routes import FarpService, build_services
from gateway.farp.schemas import SchemaError, SchemaFetcher
from gateway.routing.builder import build_table

if TYPE_CHECKING:
    from gateway.runtime import Gateway

log = logging.getLogger("octopus.farp")

DEBOUNCE = 0.05


@dataclass(frozen=True)
class AcceptedInstance:
    """The last good state of one discovered instance."""

    fingerprint: str
    manifest: Manifest
    documents: dict[str, Any]


class FarpWatcher:
    """Owns the FARP state of a gateway: accepted manifests and the services built from them."""

    def __init__(
        self,
        gateway: Gateway,
        backends: list[DiscoveryBackend],
        fetcher: SchemaFetcher,
        *,
        retry_interval: float = 5.0,
    ) -> None:
        self.gateway = gateway
        self.backends = backends
        self.fetcher = fetcher
        self.retry_interval = retry_interval
        self.accepted: dict[str, AcceptedInstance] = {}
        self.services: list[FarpService] = []
        self.conflicts: list[dict[str, Any]] = []
        self.pushed: dict[str, DiscoveredInstance] = {}  # from the push API
        self._snapshots: dict[int, list[DiscoveredInstance]] = {}
        self._first_seen: dict[tuple[str, str], float] = {}
        #: source key -> fingerprint of the document last rejected as invalid there. The
        #: same document is not validated, counted and logged again on every rebuild.
        self._rejected: dict[str, str] = {}
        #: Set by ``_accept`` when a schema fetch failed: worth retrying, unlike a
        #: manifest that is invalid (it stays invalid until its source changes).
        self._fetch_failed = False
        #: Manifests fetched for metadata-only instances: key -> (when, document).
        self._resolved: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self.resolve_interval = max(retry_interval, 30.0)
        self._resolve_scheduled = False
        self._client: httpx.AsyncClient | None = None
        self._changed = asyncio.Event()
        self._rebuilt = asyncio.Condition()
        self._generation = 0
        self._synced_backends: set[int] = set()
        self._version = gateway.table.version

    # --- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Consume every backend and rebuild on change, until cancelled."""
        feeders = [
            asyncio.create_task(self._feed(index, backend), name=f"discovery-{backend.name}")
            for index, backend in enumerate(self.backends)
        ]
        try:
            if not self.backends:
                await self._safe_rebuild()
            while True:
                await self._changed.wait()
                await asyncio.sleep(DEBOUNCE)
                self._changed.clear()
                await self._safe_rebuild()
        finally:
            for task in feeders:
                task.cancel()
            await asyncio.gather(*feeders, return_exceptions=True)
            for backend in self.backends:
                await backend.close()
            await self.fetcher.close()
            if self._client is not None:
                await self._client.aclose()

    async def _feed(self, index: int, backend: DiscoveryBackend) -> None:
        try:
            async for snapshot in backend.watch():
                self._snapshots[index] = snapshot
                self._synced_backends.add(index)
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a backend bug must not stop the others
            backend.state = "failed"
            backend.last_error = str(exc)
            log.exception("discovery backend stopped", extra={"backend": backend.name})
            self._synced_backends.add(index)
            self._changed.set()

    def notify(self) -> None:
        """Ask for a rebuild (the push API calls this after a change)."""
        self._changed.set()

    async def wait_rebuilt(self, after: int, timeout: float = 10.0) -> None:
        """Wait until a rebuild newer than generation ``after`` has been swapped in."""
        async with asyncio.timeout(timeout), self._rebuilt:
            await self._rebuilt.wait_for(lambda: self._generation > after)

    @property
    def generation(self) -> int:
        return self._generation

    # --- rebuild -------------------------------------------------------------------

    async def _safe_rebuild(self) -> None:
        try:
            await self._rebuild()
        except Exception:
            # A bug in route generation must not stop discovery: the last table stays.
            log.exception("routing table rebuild failed; keeping the last good table")
            asyncio.get_running_loop().call_later(self.retry_interval, self._changed.set)

    async def _rebuild(self) -> None:
        discovered: list[DiscoveredInstance] = []
        for index in sorted(self._snapshots):
            discovered.extend(self._snapshots[index])
        discovered.extend(self.pushed.values())
        discovered = [await self._resolve(instance) for instance in discovered]
        plain = _plain_services(discovered)
        self._fetch_failed = False
        accepted: dict[str, AcceptedInstance] = {}
        for instance in discovered:
            result = await self._accept(instance)
            if result is None:
                previous = self.accepted.get(instance.key)
                if previous is not None:
                    accepted[instance.key] = previous
                continue
            accepted[instance.key] = result
        retry_needed = self._fetch_failed
        self.accepted = accepted
        present = {instance.key for instance in discovered}
        self._rejected = {k: v for k, v in self._rejected.items() if k in present}
        manifests = [entry.manifest for entry in accepted.values()]
        now = time.time()
        # An instance that left and comes back is a new registration (conflict ties).
        live = {manifest.key for manifest in manifests}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in live}
        for manifest in manifests:
            self._first_seen.setdefault(manifest.key, now)
        documents = {entry.manifest.key: entry.documents for entry in accepted.values()}
        services, conflicts = build_services(manifests, documents, self._first_seen)
        self._version += 1
        table = build_table(
            self.gateway.settings,
            self.gateway.endpoints,
            version=self._version,
            services=services,
            conflicts=conflicts,
            plain_services=plain,
        )
        self.services = services
        self.conflicts = conflicts
        self.gateway.swap(table)
        self._publish_metrics(services)
        if len(self._synced_backends) >= len(self.backends):
            self.gateway.ready = True
        async with self._rebuilt:
            self._generation += 1
            self._rebuilt.notify_all()
        log.info(
            "routing table rebuilt",
            extra={
                "version": self._version,
                "routes": len(table.routes),
                "services": len(services),
            },
        )
        if retry_needed:
            asyncio.get_running_loop().call_later(self.retry_interval, self._changed.set)

    async def _resolve(self, instance: DiscoveredInstance) -> DiscoveredInstance:
        """Fetch the manifest of an instance known only by ``farp.*`` metadata.

        Cached per source for ``resolve_interval``; a failed fetch keeps the last
        manifest that source gave. Plain instances (no ``farp.enabled``) pass unchanged.
        """
        if instance.manifest is not None or not is_enabled(instance.metadata):
            return instance
        now = time.monotonic()
        cached = self._resolved.get(instance.key)
        if cached is not None and now - cached[0] < self.resolve_interval:
            document = cached[1]
        else:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=5.0, follow_redirects=True)
            document = await resolve_manifest(instance, self._client)
            if document is None and cached is not None:
                document = cached[1]
            self._resolved[instance.key] = (now, document)
        if self.resolve_interval and not self._resolve_scheduled:
            # Metadata-only instances change their manifest without a discovery event.
            self._resolve_scheduled = True
            asyncio.get_running_loop().call_later(self.resolve_interval, self._re_resolve)
        if document is None:
            return instance
        return dataclasses.replace(instance, manifest=document)

    def _re_resolve(self) -> None:
        self._resolve_scheduled = False
        self._changed.set()

    async def _accept(self, instance: DiscoveredInstance) -> AcceptedInstance | None:
        """Validate and fetch one instance's manifest; None when it must be rejected."""
        metrics = self.gateway.metrics
        document = instance.manifest
        if document is None:
            if is_enabled(instance.metadata):
                self._reject(instance.key, "", "no_manifest", "FARP instance without a manifest")
            return None  # a plain instance: an endpoint of its service, no routes
        try:
            fingerprint = hashlib.sha256(canonical_json(document)).hexdigest()
        except (TypeError, ValueError) as exc:
            mark = "unencodable:" + hashlib.sha256(repr(document).encode()).hexdigest()
            self._reject(instance.key, mark, "invalid", str(exc))
            return None
        previous = self.accepted.get(instance.key)
        if previous is not None and previous.fingerprint == fingerprint:
            return previous
        if self._rejected.get(instance.key) == fingerprint:
            return None  # rejected before, already counted and logged
        try:
            manifest = parse_manifest(document, address=instance.address)
        except ManifestError as exc:
            reason = "checksum" if exc.field == "checksum" else "invalid"
            self._reject(instance.key, fingerprint, reason, str(exc))
            return None
        except Exception as exc:  # a shape the validator did not foresee is still invalid
            self._reject(instance.key, fingerprint, "invalid", f"{type(exc).__name__}: {exc}")
            return None
        base_url = f"http://{manifest.instance.address}" if manifest.instance else None
        read_key = self._key_reader()
        documents: dict[str, Any] = {}
        for descriptor in manifest.schemas:
            try:
                documents[descriptor.type] = await self.fetcher.fetch(
                    descriptor, base_url=base_url, read_key=read_key
                )
            except SchemaError as exc:
                self._fetch_failed = True
                metrics.farp_fetch_failures.labels(exc.reason).inc()
                log.warning(
                    "schema fetch failed, keeping the last good version",
                    extra={"source": instance.key, "schema": descriptor.type, "reason": str(exc)},
                )
                return None
        if previous is None or previous.manifest.checksum != manifest.checksum:
            metrics.farp_schema_updates.labels(manifest.service_name).inc()
        self._rejected.pop(instance.key, None)
        return AcceptedInstance(fingerprint, manifest, documents)

    def _reject(self, key: str, mark: str, reason: str, message: str) -> None:
        """Count and log a rejected manifest once per distinct document at ``key``."""
        if self._rejected.get(key) == mark:
            return
        self._rejected[key] = mark
        self.gateway.metrics.farp_rejected.labels(reason).inc()
        log.warning("manifest rejected", extra={"source": key, "reason": message})

    def _key_reader(self) -> Any:
        async def read_key(path: str) -> bytes | None:
            for backend in self.backends:
                value = await backend.read_key(path)
                if value is not None:
                    return value
            return None

        return read_key

    def _publish_metrics(self, services: list[FarpService]) -> None:
        metrics = self.gateway.metrics
        metrics.farp_services.set(len({s.name for s in services}))
        counts: dict[tuple[str, str], int] = {}
        for service in services:
            for route in service.routes:
                key = (service.name, route.kind)
                counts[key] = counts.get(key, 0) + 1
        metrics.set_farp_routes(counts)


def _plain_services(instances: list[DiscoveredInstance]) -> dict[str, list[tuple[str, int]]]:
    """Discovered instances without a manifest, grouped by service: plain endpoints."""
    plain: dict[str, list[tuple[str, int]]] = {}
    for instance in instances:
        if instance.manifest is not None or not instance.service_name or not instance.address:
            continue
        url = f"http://{instance.address}"
        members = plain.setdefault(instance.service_name, [])
        if all(existing != url for existing, _ in members):
            members.append((url, 100))
    return plain
