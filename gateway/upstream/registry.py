"""Connection pools that outlive routing tables.

A table swap must not drop warm connections: pools are keyed by where they connect and
how, and a new table built with the same endpoint gets the same pool back.
"""

from __future__ import annotations

from gateway.upstream.pool import ConnectionPool
from gateway.upstream.tls import client_context
from gateway.upstream.upstream import EndpointAddress

PoolKey = tuple[str, str, int, bool, str | None, int, float]


class PoolRegistry:
    """Owns every upstream connection pool of one gateway process."""

    def __init__(self) -> None:
        self._pools: dict[PoolKey, ConnectionPool] = {}

    def pool_for(
        self,
        address: EndpointAddress,
        *,
        verify: bool = True,
        ca: str | None = None,
        max_connections: int = 512,
        idle_timeout: float = 60.0,
    ) -> ConnectionPool:
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
        if pool is None:
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

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
