"""The request event shared by event sinks and exporters, and the sink's batching queue.

Why a queue between the request and the sink: a request must never wait for Kafka or
Redis. A request only builds a small dict and appends it to a bounded in-memory queue
(``put`` never awaits); one background task per worker drains the queue in batches of
up to ``batch_size``, or every ``flush_interval`` when traffic is low, and hands each
batch to a *transport* (``send_batch(events)``). When the sink is slow or dead the queue
fills up and new events are dropped and counted (``dropped``) rather than buffered
without bound or pushed back onto requests: telemetry is worth less than latency.
A batch whose send fails or times out (``send_timeout``) is counted in ``failed`` and
not retried, so one stuck broker cannot pin memory; the transport's own client
(aiokafka, redis-py) reconnects on the next batch.

The event (one per request, emitted when the response head is known)::

    {"timestamp": "2025-01-01T12:00:00.123Z", "request_id": "...", "method": "GET",
     "path": "/users/7", "route": "/users/{id}", "upstream": "users", "status": 200,
     "duration_ms": 3.2, "client_ip": "10.0.0.1", "bytes": 512, "error": "..."}

``route`` is the route's path template (bounded, the same label as
``octopus_requests_total``); ``bytes`` is the response ``Content-Length`` when the
response has one; ``error`` appears only on events made from ``on_error``.
``duration_ms`` runs from the first event/exporter plugin's ``on_request`` to the
response head (time to first byte seen by the gateway), so put these plugins first in
``middleware:`` to time everything, auth included. When a plugin earlier in the chain
answers directly, this plugin's ``on_request`` never ran and ``duration_ms`` is null.

Requests that match no route (404/405) run no plugins and make no event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from plugins.api import Plugin, RequestContext, Response
from settings.fields import Duration

log = logging.getLogger("octopus.plugins.events")

#: ``ctx.state`` key holding ``time.perf_counter()`` at the first timing plugin's
#: ``on_request``; shared so every sink and exporter measures the same interval.
STARTED_KEY = "octopus.started"
#: ``ctx.state`` key set once an event was made for the request (``on_error`` and
#: ``on_response`` may both fire; one request makes one event per sink).
_EMITTED_KEY = "octopus.event.emitted"

Event = dict[str, Any]


def mark_started(ctx: RequestContext) -> None:
    """Remember when the request reached the first timing plugin (first one wins)."""
    ctx.state.setdefault(STARTED_KEY, time.perf_counter())


def elapsed_ms(ctx: RequestContext) -> float | None:
    """Milliseconds since :func:`mark_started`, or None when it never ran."""
    started = ctx.state.get(STARTED_KEY)
    if started is None:
        return None
    return round((time.perf_counter() - started) * 1000.0, 3)


def content_length(response: Response) -> int | None:
    for name, value in response.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def utc_timestamp(now: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds: what log pipelines parse without configuration."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def make_event(
    ctx: RequestContext,
    status: int,
    *,
    response: Response | None = None,
    error: BaseException | None = None,
) -> Event:
    """The event for one request (see the module docstring for the shape)."""
    event: Event = {
        "timestamp": utc_timestamp(),
        "request_id": ctx.request_id,
        "method": ctx.method,
        "path": ctx.path,
        "route": ctx.route_path,
        "upstream": ctx.upstream,
        "status": status,
        "duration_ms": elapsed_ms(ctx),
        "client_ip": ctx.client_ip,
    }
    if response is not None:
        size = content_length(response)
        if size is not None:
            event["bytes"] = size
    if error is not None:
        event["error"] = f"{type(error).__name__}: {error}"[:500]
    return event


class EventTransport(Protocol):
    """Where batches go. Small on purpose, so a sink can be tested without its broker.

    ``prepare`` runs in ``start()`` and does no I/O: it builds the client, so a bad
    configuration fails the gateway's startup loudly. ``open`` connects; it runs in the
    background and is retried with backoff, so an unreachable broker never delays
    startup. ``send_batch`` raises on failure.
    """

    async def prepare(self) -> None: ...

    async def open(self) -> None: ...

    async def send_batch(self, events: list[Event]) -> None: ...

    async def close(self) -> None: ...


class EventSink:
    """A bounded, non-blocking queue drained in batches by one background task."""

    #: Reconnect/resend backoff after a failure: doubles up to the maximum.
    BACKOFF_MIN = 0.1
    BACKOFF_MAX = 5.0

    def __init__(
        self,
        transport: EventTransport,
        *,
        name: str = "events",
        queue_size: int = 10_000,
        batch_size: int = 100,
        flush_interval: float = 1.0,
        send_timeout: float = 5.0,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self.transport = transport
        self.name = name
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.send_timeout = send_timeout
        self.shutdown_timeout = shutdown_timeout
        self._queue: deque[Event] = deque()
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        #: Events handed to the transport successfully.
        self.sent = 0
        #: Events refused because the queue was full (the sink is slow or dead).
        self.dropped = 0
        #: Events in batches whose send failed or timed out.
        self.failed = 0
        #: Batches sent successfully.
        self.batches = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def stats(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "sent": self.sent,
            "dropped": self.dropped,
            "failed": self.failed,
            "batches": self.batches,
        }

    def put(self, event: Event) -> bool:
        """Queue ``event`` without waiting; False (and counted) when the queue is full."""
        queue = self._queue
        if len(queue) >= self.queue_size:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning(
                    "event queue full, dropping events",
                    extra={"sink": self.name, "dropped": self.dropped},
                )
            return False
        queue.append(event)
        if len(queue) >= self.batch_size and self._wake is not None:
            self._wake.set()
        return True

    async def start(self) -> None:
        await self.transport.prepare()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-sink")

    async def stop(self) -> None:
        """Flush what is queued, bounded by ``shutdown_timeout``, then close."""
        task = self._task
        if task is None:
            return
        self._task = None
        assert self._stopping is not None and self._wake is not None
        self._stopping.set()
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=self.shutdown_timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        elif not task.cancelled() and task.exception() is not None:
            log.error("event sink task crashed", exc_info=task.exception())
        if self._queue:
            log.warning(
                "event sink stopped with events unsent",
                extra={"sink": self.name, "lost": len(self._queue)},
            )
            self.dropped += len(self._queue)
            self._queue.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.close(), timeout=max(self.shutdown_timeout, 0.1))

    async def _run(self) -> None:
        """Send full batches as soon as they fill, and everything once the interval ends.

        Only full batches go out early: a partial remainder waits for more events or
        for ``flush_interval``, so a steady stream is sent in whole batches.
        """
        assert self._wake is not None and self._stopping is not None
        backoff = self.BACKOFF_MIN
        while True:
            due = False  # True once the interval ran out (or at stop): partial batches go
            if not self._stopping.is_set() and len(self._queue) < self.batch_size:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval)
                except TimeoutError:
                    due = True
            stopping = self._stopping.is_set()
            if not self._queue or await self._drain(partial=due or stopping):
                backoff = self.BACKOFF_MIN
            else:  # the transport failed: wait before trying again
                if stopping:
                    return
                await self._pause(backoff)
                backoff = min(backoff * 2, self.BACKOFF_MAX)
                continue
            if stopping:
                return

    async def _drain(self, *, partial: bool) -> bool:
        """Send queued events batch by batch (the last one short only when ``partial``);
        False after the first failure."""
        if not self._connected:
            try:
                await asyncio.wait_for(self.transport.open(), timeout=self.send_timeout)
            except Exception as exc:
                log.warning("event sink unreachable", extra={"sink": self.name, "error": repr(exc)})
                return False
            self._connected = True
        queue = self._queue
        while len(queue) >= self.batch_size or (partial and queue):
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            try:
                await asyncio.wait_for(self.transport.send_batch(batch), timeout=self.send_timeout)
            except asyncio.CancelledError:  # stop() gave up on this send
                self.failed += len(batch)
                raise
            except Exception as exc:
                self.failed += len(batch)
                log.warning(
                    "event batch failed",
                    extra={"sink": self.name, "events": len(batch), "error": repr(exc)},
                )
                return False
            self.sent += len(batch)
            self.batches += 1
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when the sink is stopping."""
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


class EventSinkConfig(BaseModel):
    """Queue options every event sink shares."""

    model_config = ConfigDict(extra="forbid")

    #: Events held while the sink is slow or down; beyond it events are dropped.
    queue_size: int = Field(10_000, ge=1)
    #: Most events in one send.
    batch_size: int = Field(100, ge=1)
    #: Longest an event waits in the queue when traffic is too low to fill a batch.
    flush_interval: Duration = 1.0
    #: One batch's send (and one connection attempt) is abandoned after this.
    send_timeout: Duration = 5.0
    #: ``stop()`` spends at most this long flushing what is queued.
    shutdown_timeout: Duration = 5.0


class EventSinkPlugin(Plugin):
    """Base of the event sink plugins: one event per request into an :class:`EventSink`.

    Subclasses give ``make_transport()``; tests override it to swap the broker for an
    in-memory transport while keeping the queue, batching and encoding.
    """

    Config: ClassVar[type[BaseModel]] = EventSinkConfig
    config: EventSinkConfig

    def __init__(self) -> None:
        super().__init__()
        self.sink: EventSink | None = None

    def make_transport(self) -> EventTransport:
        raise NotImplementedError

    async def start(self) -> None:
        config = self.config
        self.sink = EventSink(
            self.make_transport(),
            name=self.metadata.name,
            queue_size=config.queue_size,
            batch_size=config.batch_size,
            flush_interval=config.flush_interval,
            send_timeout=config.send_timeout,
            shutdown_timeout=config.shutdown_timeout,
        )
        await self.sink.start()

    async def stop(self) -> None:
        if self.sink is not None:
            await self.sink.stop()

    async def on_request(self, ctx: RequestContext) -> Response | None:
        mark_started(ctx)
        return None

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        key = f"{_EMITTED_KEY}:{self.metadata.name}"
        if self.sink is None or key in ctx.state:
            return
        ctx.state[key] = True
        self.sink.put(make_event(ctx, response.status, response=response))

    async def on_error(self, ctx: RequestContext, error: BaseException) -> None:
        """An error before any response head becomes a 500 event carrying the error.

        After the head, the request's event is already queued with the status the
        client saw, so the error adds nothing here (one event per request).
        """
        key = f"{_EMITTED_KEY}:{self.metadata.name}"
        if self.sink is None or key in ctx.state:
            return
        ctx.state[key] = True
        self.sink.put(make_event(ctx, 500, error=error))
