"""Connection pools that outlive routing tables.

A table swap must not drop warm connections: pools are keyed by where they connect and
how, and a new table built with the same endpoint gets the same pool back.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from gateway.upstream.breaker import CircuitBreaker
from gateway.upstream.http2 import H2Pool
from gateway.upstream.pool import ConnectionPool
from gateway.upstream.tls import client_context
from gateway.upstream.upstream import Endpoint, EndpointAddress, Upstream

PoolKey = tuple[str, str, int, bool, str | None, int, float]


class PoolRegistry:
    """Owns every upstream connection pool of one gateway process."""

    def __init__(self) -> None:
        self._pools: dict[PoolKey, ConnectionPool | H2Pool] = {}

    def pool_for(
        self,
        address: EndpointAddress,
        *,
        verify: bool = True,
        ca: str | None = None,
        max_connections: int = 512,
        idle_timeout: float = 60.0,
    ) -> ConnectionPool | H2Pool:
        key: PoolKey = (
            address.scheme,
            address.host,
            address.port,
            verify,
            ca,
            max_connections,
            idle_timeout,
        )
        pool = self._pools.get(key)
        if pool is None and address.scheme in ("h2c", "h2"):
            # HTTP/2 multiplexes streams over a few connections (gateway/upstream/http2.py).
            pool = H2Pool(
                address.host,
                address.port,
                ssl_context=client_context(verify, ca, ("h2",)) if address.tls else None,
                server_hostname=address.host,
                max_connections=max_connections,
                idle_timeout=idle_timeout,
            )
            self._pools[key] = pool
        elif pool is None:
            context = client_context(verify, ca, ("http/1.1",)) if address.tls else None
            pool = ConnectionPool(
                address.host,
                address.port,
                ssl_context=context,
                server_hostname=address.host,
                max_connections=max_connections,
                idle_timeout=idle_timeout,
            )
            self._pools[key] = pool
        return pool

    @staticmethod
    def probe_context(
        address: EndpointAddress, *, verify: bool = True, ca: str | None = None
    ) -> ssl.SSLContext | None:
        """The TLS context health probes use: they speak HTTP/1.1, so they must offer
        ``http/1.1`` in ALPN even when the endpoint's pool negotiates ``h2``."""
        return client_context(verify, ca, ("http/1.1",)) if address.tls else None

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()


BreakerListener = Callable[[str, str, str, str], None]


class EndpointRegistry:
    """Endpoints that outlive routing tables, keyed by (upstream name, endpoint URL).

    A rebuilt table gets the same Endpoint objects back, so in-flight counts, latency,
    health and circuit-breaker state survive hot swaps. Settings that change (weight,
    breaker configuration, health path) are applied to the kept object.
    """

    def __init__(self, pools: PoolRegistry) -> None:
        self.pools = pools
        self._endpoints: dict[tuple[str, str], tuple[Endpoint, Any]] = {}
        #: Told (upstream, url, old state, new state) on every breaker transition.
        self.on_breaker_change: BreakerListener | None = None
        #: The last Upstream built under each name, so the next table's can take over
        #: its retry budget and outlier ejections.
        self.upstreams: dict[str, Upstream] = {}

    def endpoint_for(
        self,
        upstream: str,
        address: EndpointAddress,
        weight: int,
        *,
        verify: bool = True,
        ca: str | None = None,
        max_connections: int = 512,
        idle_timeout: float = 60.0,
        breaker: Any = None,
        health_path: str | None = None,
    ) -> Endpoint:
        key = (upstream, address.url)
        pool = self.pools.pool_for(
            address,
            verify=verify,
            ca=ca,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
        )
        probe_context = PoolRegistry.probe_context(address, verify=verify, ca=ca)
        known = self._endpoints.get(key)
        if known is not None and known[0].pool is pool:
            endpoint, breaker_settings = known
            endpoint.weight = weight
            endpoint.health_path = health_path
            endpoint.probe_ssl_context = probe_context
            if breaker_settings != breaker:
                endpoint.breaker = self._breaker(upstream, address.url, breaker)
                self._endpoints[key] = (endpoint, breaker)
            return endpoint
        endpoint = Endpoint(
            address,
            weight,
            pool,
            breaker=self._breaker(upstream, address.url, breaker),
            health_path=health_path,
        )
        endpoint.probe_ssl_context = probe_context
        self._endpoints[key] = (endpoint, breaker)
        return endpoint

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Forget endpoints no table uses any more."""
        for key in list(self._endpoints):
            if key not in keys:
                del self._endpoints[key]

    def _breaker(self, upstream: str, url: str, settings: Any) -> CircuitBreaker | None:
        if settings is None:
            return None
        listener = self.on_breaker_change

        def changed(old: str, new: str) -> None:
            if listener is not None:
                listener(upstream, url, old, new)

        return CircuitBreaker.from_settings(settings, on_change=changed)
