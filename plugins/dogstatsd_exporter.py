"""``dogstatsd-exporter``: a counter and a timing per request, sent to DogStatsD over UDP.

Per request two lines are buffered::

    octopus.requests:1|c|#route:/users/{id},method:GET,status:200,env:prod
    octopus.request.duration:3.214|ms|#route:/users/{id},method:GET,status:200,env:prod

and buffered lines are packed into datagrams of at most ``max_packet_size`` bytes
(1432 by default: fits a 1500-byte Ethernet MTU after IP/UDP headers, so datagrams are
never fragmented), sent when the next line would not fit and every ``flush_interval``.
Lines are never split across datagrams. The agent aggregates, so nothing is kept here
beyond one datagram's worth.

Why UDP through an asyncio datagram transport: sending never blocks and never fails a
request. A missing agent (ICMP "port unreachable") or a full socket buffer only
counts (``send_errors``, ``dropped``); the transport's own buffer is capped so a
stalled socket cannot grow memory.

``route`` is the route template (bounded cardinality), ``status`` the status code.
Tag values lose the characters DogStatsD reserves (``|``, ``,``, ``#``, whitespace),
which become ``_``. ``duration_type`` picks ``ms`` (timer), ``h`` (histogram) or ``d``
(distribution, aggregated globally by Datadog).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from plugins.api import Plugin, PluginMetadata, RequestContext, Response
from plugins.events import STARTED_KEY, mark_started
from settings.fields import Duration

log = logging.getLogger("octopus.plugins.dogstatsd")

_TAG_UNSAFE = re.compile(r"[|,#\s]")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")
#: Datagrams waiting in asyncio's transport buffer beyond this are dropped.
MAX_TRANSPORT_BUFFER = 256 * 1024
#: Distinct (route, method, status) tag strings kept pre-formatted.
_TAG_CACHE_SIZE = 4096


class DogStatsdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8125, ge=1, le=65535)
    #: Metric name prefix: ``<prefix>.requests`` and ``<prefix>.request.duration``.
    prefix: str = "octopus"
    #: Constant tags on every metric: ``{env: prod}`` or ``["env:prod", "canary"]``.
    tags: dict[str, str] | list[str] = Field(default_factory=dict)
    max_packet_size: int = Field(1432, ge=64, le=65_000)
    flush_interval: Duration = 1.0
    duration_type: Literal["ms", "h", "d"] = "ms"


def sanitize_tag(value: str) -> str:
    return _TAG_UNSAFE.sub("_", value)


def metric_name(prefix: str, name: str) -> str:
    full = f"{prefix}.{name}" if prefix else name
    return _NAME_UNSAFE.sub("_", full)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: DogStatsdExporter) -> None:
        self.owner = owner

    def error_received(self, exc: Exception) -> None:
        # ECONNREFUSED from an ICMP "port unreachable": no agent listening (yet).
        self.owner.send_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.transport = None


class DogStatsdExporter(Plugin):
    """Buffers StatsD lines per request; sends full datagrams and flushes periodically."""

    metadata = PluginMetadata(
        name="dogstatsd-exporter",
        version="1.0.0",
        description="Sends a request counter and timing per request to DogStatsD (UDP).",
    )
    Config: ClassVar[type[BaseModel]] = DogStatsdConfig
    config: DogStatsdConfig

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.DatagramTransport | None = None
        self._buffer: list[bytes] = []
        self._size = 0
        self._tag_cache: dict[tuple[str, str, int], str] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._global = ""
        self._counter = ""
        self._timer = ""
        #: Datagrams handed to the socket; lines dropped (no socket, buffer full);
        #: errors the socket reported (usually: nothing listening).
        self.datagrams = 0
        self.dropped = 0
        self.send_errors = 0

    def configure(self, config: BaseModel) -> None:
        super().configure(config)
        tags = self.config.tags
        pairs = [f"{k}:{v}" for k, v in tags.items()] if isinstance(tags, dict) else list(tags)
        self._global = ",".join(sanitize_tag(tag) for tag in pairs)
        self._counter = metric_name(self.config.prefix, "requests")
        self._timer = metric_name(self.config.prefix, "request.duration")

    async def start(self) -> None:
        await self._connect()
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="dogstatsd-exporter")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if self._stopping is not None:
            self._stopping.set()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=2)
        self.flush()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    async def _connect(self) -> None:
        """Open the UDP socket; a failure (e.g. DNS) is logged and retried at each flush."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self), remote_addr=(self.config.host, self.config.port)
            )
        except OSError as exc:
            log.warning(
                "dogstatsd socket failed",
                extra={"host": self.config.host, "port": self.config.port, "error": str(exc)},
            )
            return
        self.transport = transport

    async def on_request(self, ctx: RequestContext) -> Response | None:
        mark_started(ctx)
        return None

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        tags = self._tags(ctx.route_path or "unmatched", ctx.method, response.status)
        self.add(f"{self._counter}:1|c|#{tags}")
        started = ctx.state.get(STARTED_KEY)
        if started is not None:
            ms = (time.perf_counter() - started) * 1000.0
            self.add(f"{self._timer}:{ms:.3f}|{self.config.duration_type}|#{tags}")

    def _tags(self, route: str, method: str, status: int) -> str:
        key = (route, method, status)
        found = self._tag_cache.get(key)
        if found is None:
            found = f"route:{sanitize_tag(route)},method:{sanitize_tag(method)},status:{status}"
            if self._global:
                found = f"{found},{self._global}"
            if len(self._tag_cache) < _TAG_CACHE_SIZE:
                self._tag_cache[key] = found
        return found

    def add(self, line: str) -> None:
        """Buffer one line; send the buffer first when the line would not fit."""
        data = line.encode()
        extra = len(data) + (1 if self._buffer else 0)
        if self._buffer and self._size + extra > self.config.max_packet_size:
            self.flush()
            extra = len(data)
        self._buffer.append(data)
        self._size += extra
        if self._size >= self.config.max_packet_size:  # one oversized line: alone
            self.flush()

    def flush(self) -> None:
        """Send the buffered lines as one datagram (never blocks)."""
        if not self._buffer:
            return
        lines, self._buffer, self._size = self._buffer, [], 0
        transport = self.transport
        if transport is None or transport.get_write_buffer_size() > MAX_TRANSPORT_BUFFER:
            self.dropped += len(lines)
            return
        transport.sendto(b"\n".join(lines))
        self.datagrams += 1

    async def _run(self) -> None:
        assert self._stopping is not None
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.config.flush_interval)
            if self.transport is None:
                await self._connect()
            self.flush()

    def stats(self) -> dict[str, Any]:
        return {"datagrams": self.datagrams, "dropped": self.dropped, "errors": self.send_errors}


PLUGIN = DogStatsdExporter
