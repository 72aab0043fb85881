"""Keeps one active health checker running per upstream of the current routing table.

After each table swap the set of checkers is reconciled: upstreams that disappeared
stop being probed, new ones start, unchanged ones keep their checker (and so their
consecutive-result counters). Health itself lives on the Endpoint objects, which
outlive tables.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from gateway.routing.table import RoutingTable
from gateway.upstream.health import ActiveHealthChecker
from gateway.upstream.upstream import Endpoint

log = logging.getLogger("octopus.health")

HealthListener = Callable[[str, Endpoint, bool], None]


class HealthMonitor:
    """Owns the running health checkers of one gateway process."""

    def __init__(self, on_change: HealthListener | None = None) -> None:
        self._checkers: dict[str, tuple[tuple[Any, ...], ActiveHealthChecker[Endpoint]]] = {}
        self._on_change = on_change
        self._stopping: set[asyncio.Task[None]] = set()

    def reconcile(self, table: RoutingTable) -> None:
        """Start, keep or stop checkers to match ``table`` (needs a running loop)."""
        wanted: dict[str, tuple[tuple[Any, ...], Any, list[Endpoint]]] = {}
        for upstream in table.upstreams.values():
            settings = upstream.health_check
            if settings is None or not upstream.endpoints:
                continue
            identity = (
                _settings_key(settings),
                tuple((id(e), e.health_path) for e in upstream.endpoints),
            )
            wanted[upstream.name] = (identity, settings, list(upstream.endpoints))
        for name in list(self._checkers):
            if name not in wanted or wanted[name][0] != self._checkers[name][0]:
                # An upstream that is no longer checked at all must not keep the last
                # verdicts of its checker: nothing would ever mark those endpoints up.
                self._stop(self._checkers.pop(name)[1], release=None if name in wanted else name)
        for name, (identity, settings, endpoints) in wanted.items():
            if name in self._checkers:
                continue
            checker = ActiveHealthChecker.from_settings(
                endpoints,
                settings,
                on_change=self._listener(name),
                health_path=lambda endpoint: endpoint.health_path,
                ssl_context=endpoints[0].probe_ssl_context,
            )
            checker.start()
            self._checkers[name] = (identity, checker)

    async def close(self) -> None:
        for _, checker in self._checkers.values():
            await checker.stop()
        self._checkers.clear()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    def _stop(self, checker: ActiveHealthChecker[Endpoint], *, release: str | None = None) -> None:
        """Stop ``checker``; with ``release`` (its upstream's name), then mark its endpoints
        healthy (after the stop, so that a probe finishing meanwhile cannot undo it)."""

        async def stop() -> None:
            await checker.stop()
            if release is None:
                return
            changed = self._listener(release)
            for endpoint in checker.targets:
                if not endpoint.healthy:
                    endpoint.healthy = True
                    changed(endpoint, True)

        task = asyncio.get_running_loop().create_task(stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _listener(self, upstream: str) -> Callable[[Endpoint, bool], None]:
        def changed(endpoint: Endpoint, healthy: bool) -> None:
            log.warning(
                "endpoint health changed",
                extra={"upstream": upstream, "endpoint": endpoint.url, "healthy": healthy},
            )
            if self._on_change is not None:
                self._on_change(upstream, endpoint, healthy)

        return changed


def _settings_key(settings: Any) -> tuple[Any, ...]:
    return tuple(
        getattr(settings, name, None)
        for name in (
            "type",
            "path",
            "interval",
            "timeout",
            "healthy_threshold",
            "unhealthy_threshold",
        )
    )
