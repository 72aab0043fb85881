"""The keep-alive connection pool of one upstream endpoint (host, port, TLS).

It only pools: who gets which connection, how many exist, who waits. Idle connections
sit in a deque used LIFO (the warmest socket is reused first) so acquire and release
are O(1); a sweep closes connections idle longer than ``idle_timeout``. When
``max_connections`` are busy, callers queue in FIFO order and a released connection is
handed straight to the first waiter.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from time import monotonic

from gateway.upstream.errors import ConnectFailed, PoolTimeout
from gateway.upstream.http1 import H1Connection


class ConnectionPool:
    """Connections to one endpoint."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_connections: int = 512,
        idle_timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._idle: deque[H1Connection] = deque()
        self._waiters: deque[asyncio.Future[H1Connection | None]] = deque()
        self._open = 0  # connections counted against max_connections (busy + idle + connecting)
        self._counted: set[int] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(1 for conn in self._idle if not conn.closed)

    async def acquire(self, connect_timeout: float | None) -> tuple[H1Connection, bool]:
        """A connection ready for one exchange, and whether it was reused."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        if self._open < self.max_connections:
            return await self._connect(connect_timeout), False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[H1Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(connect_timeout):
                conn = await waiter
        except TimeoutError:
            raise PoolTimeout(
                f"all {self.max_connections} connections to {self.host}:{self.port} stayed busy"
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
        if conn is not None and not conn.closed:
            return conn, True
        return await self._connect(connect_timeout), False

    def release(self, conn: H1Connection) -> None:
        """Take a connection back after an exchange; reuse it only if it is clean."""
        if not conn.reusable or self._closed:
            conn.close()
            self._forget(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = monotonic()
        self._idle.append(conn)
        if self._sweep_handle is None:
            self._schedule_sweep(conn.loop)

    async def close(self) -> None:
        """Close idle connections now; busy ones close when released."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    # --- internals -------------------------------------------------------------------

    async def _connect(self, timeout: float | None) -> H1Connection:
        self._open += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: H1Connection(loop, self._forget),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname if self.ssl_context else None,
                )
        except TimeoutError:
            self._slot_freed()
            raise ConnectFailed(f"connect to {self.host}:{self.port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._slot_freed()
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        except BaseException:
            self._slot_freed()
            raise
        self._counted.add(id(conn))
        return conn

    def _forget(self, conn: H1Connection) -> None:
        """Called when a connection dies or is dropped; frees its slot exactly once."""
        key = id(conn)
        if key in self._counted:
            self._counted.discard(key)
            self._slot_freed()

    def _slot_freed(self) -> None:
        self._open -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # a slot is free: the waiter connects itself
                return

    def _schedule_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        delay = max(self.idle_timeout / 2, 0.05)
        self._sweep_handle = loop.call_later(delay, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep_handle = None
        now = monotonic()
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since >= self.idle_timeout):
            idle.popleft().close()
        if idle:
            self._schedule_sweep(loop)
