"""``redis-events``: one event per request appended to a Redis Stream, a batch per round trip.

Requests only queue their event (:mod:`plugins.events`); a background task sends each
batch as one pipeline of ``XADD stream MAXLEN ~ maxlen * event <json>`` commands, so a
batch costs one round trip and the stream stays bounded (``~`` lets Redis trim whole
radix-tree nodes, which is far cheaper than exact trimming). The entry holds the event
as compact JSON in one field, ``event``: the same bytes the Kafka sink produces, so a
consumer decodes either the same way and numbers stay numbers. Read it with
``XREAD``/``XREADGROUP``; entry ids give ordering and consumer-group bookkeeping.

A slow or dead Redis costs requests nothing: the bounded queue drops and counts. The
client does not retry silently; a failed batch is counted and the next one reconnects.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from plugins.api import PluginMetadata
from plugins.events import Event, EventSinkConfig, EventSinkPlugin, EventTransport

#: The stream entry's single field.
EVENT_FIELD = "event"


class RedisEventsConfig(EventSinkConfig):
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream: str = Field("octopus:events", min_length=1)
    #: Approximate stream length kept (``XADD ... MAXLEN ~ maxlen``).
    maxlen: int = Field(100_000, ge=1)


def encode_entry(event: Event) -> dict[str, bytes]:
    """The fields of one event's stream entry."""
    return {EVENT_FIELD: json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()}


class RedisStreamTransport:
    """Batches to a Redis Stream, one non-transactional pipeline per batch."""

    def __init__(self, config: RedisEventsConfig) -> None:
        self.config = config
        self.client: aioredis.Redis | None = None

    async def prepare(self) -> None:
        """Build the client (no I/O): a malformed ``redis_url`` fails startup."""
        timeout = self.config.send_timeout
        self.client = aioredis.Redis.from_url(
            self.config.redis_url,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    async def open(self) -> None:
        assert self.client is not None
        await self.client.ping()

    async def send_batch(self, events: list[Event]) -> None:
        assert self.client is not None
        stream, maxlen = self.config.stream, self.config.maxlen
        pipe: Any = self.client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(stream, encode_entry(event), maxlen=maxlen, approximate=True)
        await pipe.execute()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()


class RedisEventsPlugin(EventSinkPlugin):
    """Request events to a Redis Stream, batched through the shared non-blocking queue."""

    metadata = PluginMetadata(
        name="redis-events",
        version="1.0.0",
        description="Appends one JSON event per request to a Redis Stream.",
    )
    Config: ClassVar[type[BaseModel]] = RedisEventsConfig
    config: RedisEventsConfig

    def make_transport(self) -> EventTransport:
        return RedisStreamTransport(self.config)


PLUGIN = RedisEventsPlugin
