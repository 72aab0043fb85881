"""The ``redis`` backend: manifests as string values with a TTL, change events on pub/sub.

Layout (FARP.md §5, CONFIG.md): the manifest JSON (optionally gzipped) of each instance
at ``farp:services:{service}:instances:{instance_id}``, its TTL refreshed by the
instance's heartbeats; publishers announce changes on ``farp:events`` as JSON
``{"event": "added"|"updated"|"removed", "service_name", "instance_id"}``.

``registry`` schema locations are read from ``farp:{registry_path}`` with the leading
slash dropped and the path otherwise verbatim (``/schemas/shop/openapi`` is the key
``farp:schemas/shop/openapi``). Keeping the slashes means a schema key can never be
mistaken for an instance key by the ``farp:services:*:instances:*`` scan, and a
publisher uses the same ``registry_path`` for etcd (``{prefix}{registry_path}``) and
Redis. A path already starting with ``farp:`` is used as the key itself.

Protocol: subscribe first, then ``SCAN`` + ``MGET`` (so no event falls between the
listing and the subscription), then re-read the named key on every event: the event
type is advisory, the value in Redis is the truth, which makes reordered or duplicated
events harmless. A key that expires emits no ``farp:events`` message, so the whole set is
also re-listed every ``interval``. If the server has keyspace notifications enabled
(``notify-keyspace-events`` with ``K`` and ``g``/``x``/``$``), expiries show up at once
through ``__keyspace@{db}__:farp:services:*``; nothing relies on it. Messages published
while disconnected are lost, so every reconnection re-lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.discovery.base import DiscoveredInstance
from gateway.discovery.remote import ManifestValues, ResilientBackend, decode_stored

log = logging.getLogger("octopus.discovery.redis")

KEY_PATTERN = "farp:services:*:instances:*"
EVENTS = "farp:events"
_KEY = re.compile(r"farp:services:([^:]+):instances:(.+)")
#: Messages handled before a snapshot is yielded, so a burst of events costs one rebuild.
BURST = 256
#: What ends a connection attempt as an outage: anything but cancellation. A server that
#: went away, a protocol surprise or a malformed answer is retried, never fatal.
_ERRORS = (Exception,)


def instance_key(service_name: str, instance_id: str) -> str:
    """The key holding the manifest of one instance."""
    return f"farp:services:{service_name}:instances:{instance_id}"


class RedisBackend(ResilientBackend):
    """Manifests in Redis, listed, followed through pub/sub and re-listed periodically."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        interval: float = 5.0,
        timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
    ) -> None:
        super().__init__(backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self._values: dict[str, bytes] = {}
        self._manifests = ManifestValues(self.name)
        self._kv: aioredis.Redis | None = None

    @property
    def rejected(self) -> int:
        """Stored values that did not decode as a manifest (counted once each)."""
        return self._manifests.rejected

    def _connect(self) -> aioredis.Redis:
        # No retries inside the client: the backend's own backoff decides, and a client
        # that retries silently would hide the outage for seconds.
        return aioredis.Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            health_check_interval=max(1, int(self.timeout)),
        )

    # --- the stream of snapshots ---------------------------------------------------

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        last: list[DiscoveredInstance] | None = None
        connected_before = False
        while True:
            client = self._connect()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(EVENTS)
                db = client.connection_pool.connection_kwargs.get("db", 0)
                await pubsub.psubscribe(f"__keyspace@{db}__:farp:services:*")
                self._values = await self._list(client)
                if connected_before:
                    self.relists += 1  # events published while we were away are lost
                connected_before = True
                self.recovered()
                snapshot = self._snapshot()
                if snapshot != last:
                    last = snapshot
                    yield snapshot
                loop = asyncio.get_running_loop()
                relist_at = loop.time() + self.interval
                while True:
                    wait = max(0.0, relist_at - loop.time())
                    message = await pubsub.get_message(timeout=wait)
                    if loop.time() >= relist_at:
                        self._values = await self._list(client)
                        relist_at = loop.time() + self.interval
                        changed = True
                    else:
                        changed = False
                    if message is not None:
                        changed |= await self._follow(client, pubsub, message)
                    if changed:
                        self.synced()
                        snapshot = self._snapshot()
                        if snapshot != last:
                            last = snapshot
                            yield snapshot
            except _ERRORS as exc:
                delay = self.failed(exc, f"redis {_redacted(self.url)}")
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(*_ERRORS):
                    await pubsub.aclose()
                with contextlib.suppress(*_ERRORS):
                    await client.aclose()

    async def _follow(self, client: aioredis.Redis, pubsub: Any, first: dict[str, Any]) -> bool:
        """Handle ``first`` and whatever else is already waiting; True on a change."""
        keys: set[str] = set()
        relist = False
        message: dict[str, Any] | None = first
        for _ in range(BURST):
            if message is None:
                break
            key = _key_of(message)
            if key is None:
                relist = True  # an event we cannot read: the listing is the safe answer
            elif key:
                keys.add(key)
            message = await pubsub.get_message(timeout=0.0)
        if relist:
            before = self._values
            self._values = await self._list(client)
            return before != self._values
        changed = False
        ordered = sorted(keys)
        if ordered:
            raws = await client.mget(ordered)
            for key, raw in zip(ordered, raws, strict=True):
                if raw is None:
                    changed |= self._values.pop(key, None) is not None
                elif self._values.get(key) != raw:
                    self._values[key] = raw
                    changed = True
        return changed

    async def _list(self, client: aioredis.Redis) -> dict[str, bytes]:
        keys = [
            key.decode("utf-8", "replace")
            async for key in client.scan_iter(match=KEY_PATTERN, count=500)
        ]
        keys = sorted({key for key in keys if _KEY.fullmatch(key)})
        values: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):
            batch = keys[start : start + 500]
            # MGET answers nil for a key that expired meanwhile or is not a string.
            for key, raw in zip(batch, await client.mget(batch), strict=True):
                if raw is not None:
                    values[key] = raw
        return values

    def _snapshot(self) -> list[DiscoveredInstance]:
        snapshot = []
        for key in sorted(self._values):
            found = _KEY.fullmatch(key)
            if found is None:
                continue
            document = self._manifests.decode(key, [self._values[key]])
            if document is None:
                continue
            instance = document.get("instance")
            address = instance.get("address") if isinstance(instance, dict) else None
            snapshot.append(
                DiscoveredInstance(
                    key=f"redis:{key}",
                    manifest=document,
                    address=address if isinstance(address, str) else None,
                    service_name=found.group(1),
                    instance_id=found.group(2),
                )
            )
        self._manifests.retain(set(self._values))
        return snapshot

    # --- the KV store ----------------------------------------------------------------

    @staticmethod
    def registry_key(path: str) -> str:
        """The Redis key of a ``registry`` schema location (see the module docstring)."""
        return path if path.startswith("farp:") else "farp:" + path.lstrip("/")

    async def read_key(self, path: str) -> bytes | None:
        if self._kv is None:
            self._kv = self._connect()
        key = self.registry_key(path)
        try:
            raw = await self._kv.get(key)
            return None if raw is None else decode_stored(raw)
        except _ERRORS as exc:
            log.debug("redis read failed", extra={"key": key, "error": str(exc)})
            return None

    async def close(self) -> None:
        if self._kv is not None:
            with contextlib.suppress(*_ERRORS):
                await self._kv.aclose()
            self._kv = None


def _key_of(message: dict[str, Any]) -> str | None:
    """The instance key a pub/sub message is about; "" for messages to ignore, None for
    an event that cannot be understood."""
    channel = _text(message.get("channel"))
    if message.get("type") == "pmessage":  # __keyspace@0__:farp:services:...
        key = channel.split(":", 1)[1] if ":" in channel else ""
        return key if _KEY.fullmatch(key) else ""
    if message.get("type") != "message" or channel != EVENTS:
        return ""
    try:
        event = json.loads(_text(message.get("data")))
        service, instance = event["service_name"], event["instance_id"]
    except (ValueError, KeyError, TypeError):
        log.debug("unreadable farp:events message", extra={"data": message.get("data")})
        return None
    if not isinstance(service, str) or not isinstance(instance, str):
        return None
    return instance_key(service, instance)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def _redacted(url: str) -> str:
    """The URL without its password, for logs and ``last_error``."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
