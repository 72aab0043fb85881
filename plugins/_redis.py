"""The Redis connection the built-in rate-limit and cache plugins share the habits of.

Not part of the plugin API. Both plugins sit on the request path, so Redis must never
cost more than a few milliseconds, even when it is dead or black-holed:

- short socket and connect timeouts, and no retries inside the client (a silent retry
  doubles the cost of every failure);
- a circuit: after a failure nobody talks to Redis for ``retry_interval`` (1 s), so a
  dead Redis costs one refused connection per second per process, not one per request;
- state changes (up → down, down → up) are logged once each, not once per request, and
  counted in attributes (``failures``), because a Prometheus counter of the gateway is
  not reachable from a plugin.

Scripts run with EVALSHA, falling back to EVAL when Redis answers NOSCRIPT (a restarted
or flushed server forgot them); EVAL also caches the script again for the next call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

#: What counts as "Redis is unavailable": any client error (refused, reset, timeout,
#: protocol surprise, OOM answer) and OS-level socket errors.
REDIS_ERRORS: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError)


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


class Script:
    """A Lua script called by SHA1, re-sent in full only when Redis does not know it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


class RedisLink:
    """One lazily created async client plus the circuit and state logging around it.

    Use: ``if link.available(): try: ... link.succeeded() except REDIS_ERRORS as e:
    link.failed(e)``. The client is created on first use inside the running event loop
    (each worker process has its own).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        log: logging.Logger,
        retry_interval: float = 1.0,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.log = log
        #: Operations that failed because Redis was unreachable or broken.
        self.failures = 0
        #: Operations skipped without trying because the circuit was open.
        self.skipped = 0
        #: Up → down transitions seen (each one logged once).
        self.outages = 0
        self.up = True
        self._retry_at = 0.0
        self._client: aioredis.Redis | None = None

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),
            )
        return self._client

    def available(self) -> bool:
        """False while the circuit is open (a failure less than ``retry_interval`` ago)."""
        if self._retry_at and time.monotonic() < self._retry_at:
            self.skipped += 1
            return False
        return True

    def succeeded(self) -> None:
        self._retry_at = 0.0
        if not self.up:
            self.up = True
            self.log.warning("redis reachable again", extra={"redis": redacted(self.url)})

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        self._retry_at = time.monotonic() + self.retry_interval
        if self.up:
            self.up = False
            self.outages += 1
            self.log.warning(
                "redis unavailable",
                extra={"redis": redacted(self.url), "error": f"{type(error).__name__}: {error}"},
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await client.aclose()
