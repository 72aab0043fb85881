"""The state of one running gateway process: settings, the current routing table,
connection pools, metrics, and the lifecycle of background work.

The routing table is one attribute; swapping it is one assignment, and a request that
already read it keeps the table it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from gateway.discovery.factory import create_backends
from gateway.extensions.loader import PluginError, load_plugins
from gateway.farp.schemas import SchemaFetcher
from gateway.farp.watcher import FarpWatcher
from gateway.observability.metrics import GatewayMetrics
from gateway.proxy.headers import TrustedProxies
from gateway.proxy.websocket import WebSocketSession
from gateway.routing.builder import build_table
from gateway.routing.table import RoutingTable
from gateway.upstream.health_monitor import HealthMonitor
from gateway.upstream.registry import EndpointRegistry, PoolRegistry
from settings import ConfigError

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracing

log = logging.getLogger("octopus")


class Gateway:
    """Everything a gateway process owns at run time."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.pools = PoolRegistry()
        self.endpoints = EndpointRegistry(self.pools)
        self.endpoints.on_breaker_change = self._breaker_changed
        self.health = HealthMonitor()
        self.metrics = GatewayMetrics()
        self._breaker_series: set[tuple[str, str]] = set()  # (upstream, url) in the gauge
        #: None unless ``observability.tracing.enabled``: the request path checks only that.
        self.tracing: Tracing | None = _create_tracing(settings)
        self.trusted_proxies = TrustedProxies(settings.server.trusted_proxies)
        try:
            self.plugins = load_plugins(settings)
        except PluginError as exc:
            raise ConfigError(str(exc).splitlines()) from None
        for plugin in self.plugins.by_name.values():
            meta = plugin.metadata
            self.metrics.plugin_loaded.labels(meta.name, meta.version).set(1)
        self.started = False
        self.ready = False
        self._draining = False
        self.websockets: set[WebSocketSession] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self.started_at = time.time()
        self.farp: FarpWatcher | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._start_lock: asyncio.Lock | None = None
        self.table: RoutingTable = RoutingTable.empty()
        self.swap(build_table(settings, self.endpoints, version=1))

    @property
    def draining(self) -> bool:
        """Set when shutdown begins: readiness turns 503 so load balancers stop sending,
        and open WebSocket sessions are closed with 1001 (going away)."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        if value and self.websockets:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to close
                task = asyncio.get_running_loop().create_task(self._close_websockets())
                # Keep a reference: the loop holds tasks weakly, so an unreferenced one
                # could be collected before it ran.
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _close_websockets(self) -> None:
        sessions = list(self.websockets)
        await asyncio.gather(*(s.close_for_drain() for s in sessions), return_exceptions=True)

    @property
    def discovery_state(self) -> list[dict[str, Any]]:
        if self.farp is None:
            return []
        return [backend.describe() for backend in self.farp.backends]

    def swap(self, table: RoutingTable) -> None:
        """Make ``table`` the one new requests use."""
        self.table = table
        self.refresh_breaker_metrics()
        if self.started:
            self.health.reconcile(table)

    def refresh_breaker_metrics(self) -> None:
        """Put every breaker's current state in the metrics (before a scrape), and drop
        the series of endpoints the table no longer has.

        Open → half-open is driven by time and happens when someone reads the state;
        with no traffic nobody does, and the gauge would show ``open`` long after.
        """
        current: set[tuple[str, str]] = set()
        for upstream in self.table.upstreams.values():
            for endpoint in upstream.endpoints:
                if endpoint.breaker is not None:
                    self.metrics.set_breaker(upstream.name, endpoint.url, endpoint.breaker.state)
                    current.add((upstream.name, endpoint.url))
        for upstream_name, url in self._breaker_series - current:
            with contextlib.suppress(KeyError):
                self.metrics.breaker_state.remove(upstream_name, url)
        self._breaker_series = current

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background until it ends or ``shutdown()`` cancels it.

        For work started on demand after start-up (the push API's heartbeat eviction),
        so that it stops with the gateway instead of dying with the event loop.
        """
        task = asyncio.get_running_loop().create_task(coro, name=name)
        # A new list, not an in-place removal: shutdown() may be iterating the old one.
        self._tasks = [t for t in self._tasks if not t.done()] + [task]
        return task

    def _breaker_changed(self, upstream: str, url: str, old: str, new: str) -> None:
        log.warning(
            "circuit breaker changed",
            extra={"upstream": upstream, "endpoint": url, "from": old, "to": new},
        )
        self.metrics.set_breaker(upstream, url, new)

    async def startup(self) -> None:
        """Start background work once (lifespan, or the first request when mounted)."""
        if self.started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.started:
                return
            self.started = True
            for plugin in self.plugins.by_name.values():
                await plugin.start()
            self.health.reconcile(self.table)
            if self.settings.farp.enabled:
                self.farp = FarpWatcher(
                    self,
                    create_backends(self.settings),
                    SchemaFetcher(ttl=self.settings.farp.schema_cache_ttl),
                    retry_interval=self.settings.farp.watch_interval,
                )
                self._tasks.append(asyncio.create_task(self.farp.run(), name="farp-watcher"))
            else:
                self.ready = True
            log.info(
                "gateway started",
                extra={"routes": len(self.table.routes), "upstreams": len(self.table.upstreams)},
            )

    async def shutdown(self) -> None:
        """Stop background work and close pooled connections."""
        self.draining = True
        self.ready = False
        await self._close_websockets()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.health.close()
        for plugin in self.plugins.by_name.values():
            try:
                await plugin.stop()
            except Exception:
                log.exception("plugin failed to stop", extra={"plugin": plugin.metadata.name})
        await self.pools.close()
        if self.tracing is not None:
            # Flushes buffered spans; the exporter may block on the network.
            await asyncio.to_thread(self.tracing.shutdown)
        self.started = False


def _create_tracing(settings: Any) -> Tracing | None:
    """The tracer of this gateway, or None when tracing is off (the SDK is not imported)."""
    config = settings.observability.tracing
    if not config.enabled:
        return None
    try:
        from gateway.observability.tracing import Tracing
    except ImportError as exc:
        raise ConfigError(
            [
                "observability.tracing.enabled: tracing needs the OpenTelemetry SDK and "
                f"OTLP exporters ({exc.name} is missing): reinstall octopus-gateway"
            ]
        ) from None
    return Tracing(config)
