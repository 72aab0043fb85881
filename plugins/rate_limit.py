"""``rate-limit``: GCRA rate limiting, in process or shared through Redis.

Config (``plugins: [{name: rate-limit, config: {...}}]``), defaults in brackets:

- ``limit`` [100] requests per ``window`` [``1m``];
- ``key`` [``ip``]: what a bucket is per: ``ip``, ``header:NAME``, ``claim:NAME`` (a claim of
  the verified token the auth plugin left in ``ctx.state["claims"]``), ``route``, or several
  joined with ``+`` (``ip+route``). A missing header or claim falls back to the client IP,
  so a client cannot escape its limit by leaving the header out;
- ``backend`` [``local``]: ``local`` keeps buckets in this process (with ``--workers N``
  each worker has its own: the effective limit is N times ``limit``); ``redis`` shares
  them between workers and gateway instances through ``redis_url``
  [``redis://127.0.0.1:6379/0``];
- ``fail_open`` [true]: when Redis is unreachable, let requests through (true) or answer
  503 (false);
- extensions: ``redis_timeout`` [``200ms``] socket/connect timeout, ``prefix``
  [``octopus:rl:``] for Redis keys.

Why GCRA (the generic cell rate algorithm): one number per bucket (the theoretical
arrival time, TAT), O(1) per check, no background refill, and smooth: ``limit`` requests
may arrive at once, after which one more is admitted every ``window / limit``. In Redis
the whole check is one Lua script (read TAT, decide, write TAT with an expiry), so it is
atomic across workers and instances, and it takes the time from Redis (``TIME``) so that
instances with skewed clocks still agree.

Every response carries ``RateLimit-Policy: <limit>;w=<window>``, ``RateLimit: limit=,
remaining=, reset=`` (draft-ietf-httpapi-ratelimit-headers) and ``X-RateLimit-Limit``,
``X-RateLimit-Remaining``, ``X-RateLimit-Reset``; ``reset`` is the number of seconds until
the bucket is full again, and ``w`` the window, both in whole seconds (rounded up). A
refused request gets 429 with ``Retry-After`` (whole seconds, at least 1) in the gateway's
JSON error shape. When Redis is unreachable and ``fail_open`` lets a request through, it
carries no rate limit headers (the state is unknown).

Counters (a Prometheus counter of the gateway is not reachable from a plugin, so they
are attributes, see :attr:`RateLimitPlugin.stats`; Redis outages are also logged once per
state change): ``rejected``, ``passed_open``, ``refused_closed``, ``redis_failures``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from plugins._redis import REDIS_ERRORS, RedisLink, Script
from plugins.api import Plugin, PluginMetadata, RequestContext, Response
from settings.units import parse_duration

log = logging.getLogger("octopus.plugins.rate_limit")

Seconds = Annotated[float, BeforeValidator(parse_duration)]
_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Bucket keys longer than this are hashed: header values are client-controlled.
_LONG_KEY = 128


class RateLimitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(100, ge=1)
    window: Seconds = 60.0
    key: str = "ip"
    backend: Literal["local", "redis"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    fail_open: bool = True
    redis_timeout: Seconds = 0.2
    prefix: str = "octopus:rl:"

    @field_validator("window", "redis_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        parse_key(value)
        return value


def parse_key(spec: str) -> tuple[tuple[str, str], ...]:
    """``ip+header:X-Api-Key`` → ``(("ip", ""), ("header", "x-api-key"))``."""
    parts: list[tuple[str, str]] = []
    for raw in spec.split("+"):
        part = raw.strip()
        kind, _, name = part.partition(":")
        kind = kind.strip().lower()
        name = name.strip()
        if kind in ("ip", "route") and not name:
            parts.append((kind, ""))
        elif kind == "header" and _NAME.match(name):
            parts.append((kind, name.lower()))
        elif kind == "claim" and name:
            parts.append((kind, name))
        else:
            raise ValueError(
                f"invalid key part {part!r}: use ip, route, header:NAME or claim:NAME, "
                "joined with + (e.g. ip+route)"
            )
    return tuple(parts)


@dataclass(frozen=True)
class Decision:
    """The outcome of one check; times in seconds from now."""

    allowed: bool
    remaining: int
    reset: float
    retry_after: float


class LocalBuckets:
    """GCRA buckets of one process: key → TAT (``time.monotonic`` seconds).

    The OrderedDict is kept in last-update order, and a bucket's TAT is at most one
    window after its last update, so the oldest entries are the first to expire: each
    check drops up to two expired ones from the front. O(1) per check, and an idle
    bucket is gone about one window after it became full again.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.window = window
        self.interval = window / limit
        # Float sums of ``interval`` may overshoot ``window`` by a few ulps.
        self._slack = self.interval * 1e-6
        self.tats: OrderedDict[str, float] = OrderedDict()

    def check(self, key: str, now: float) -> Decision:
        tats = self.tats
        tat = tats.get(key, now)
        if tat < now:
            tat = now
        new_tat = tat + self.interval
        allow_at = new_tat - self.window
        if allow_at - now > self._slack:
            decision = Decision(False, 0, tat - now, allow_at - now)
        else:
            tats[key] = new_tat
            tats.move_to_end(key)
            remaining = int((self.window - (new_tat - now)) / self.interval + 1e-6)
            decision = Decision(True, max(0, remaining), new_tat - now, 0.0)
        for _ in range(2):
            oldest = next(iter(tats), None)
            if oldest is None or tats[oldest] > now:
                break
            del tats[oldest]
        return decision


#: The distributed check. KEYS[1]: the bucket. ARGV[1]: emission interval (µs),
#: ARGV[2]: window (µs). Returns {allowed, remaining, reset µs, retry-after µs}.
GCRA_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at > now then
  return {0, 0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
           math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, math.floor((window - (new_tat - now)) / interval), new_tat - now, 0}
"""
GCRA = Script(GCRA_LUA)


class RateLimitPlugin(Plugin):
    metadata = PluginMetadata(
        name="rate-limit",
        version="1.0.0",
        description="GCRA rate limiting per IP, header, claim or route; local or Redis.",
    )
    Config = RateLimitConfig
    config: RateLimitConfig

    def __init__(self) -> None:
        super().__init__()
        self.rejected = 0
        self.passed_open = 0
        self.refused_closed = 0
        self._link: RedisLink | None = None
        self._local: LocalBuckets | None = None
        self._state_key = f"rate-limit:{id(self)}"

    def configure(self, config: Any) -> None:
        super().configure(config)
        self._parts = parse_key(config.key)
        window = config.window
        shown = int(window) if window == int(window) else math.ceil(window)
        self._limit_text = str(config.limit)
        self._policy = f"{config.limit};w={max(1, shown)}".encode()
        self._interval_us = max(1, round(window * 1_000_000 / config.limit))
        self._window_us = round(window * 1_000_000)
        self._redis_prefix = f"{config.prefix}{config.limit}/{round(window * 1000)}ms:"
        if config.backend == "local":
            self._local = LocalBuckets(config.limit, window)
        else:
            self._link = RedisLink(config.redis_url, timeout=config.redis_timeout, log=log)

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: refusals, fail-open passes, fail-closed 503s, Redis errors."""
        link = self._link
        return {
            "rejected": self.rejected,
            "passed_open": self.passed_open,
            "refused_closed": self.refused_closed,
            "redis_failures": link.failures if link else 0,
            "redis_outages": link.outages if link else 0,
        }

    async def start(self) -> None:
        # Learn Redis' state early (logged once if down); never fail start-up for it.
        if self._link is not None:
            await self._redis_check("octopus:startup-probe", probe=True)

    async def stop(self) -> None:
        if self._link is not None:
            await self._link.close()

    def bucket_key(self, ctx: RequestContext) -> str:
        """The bucket a request counts against, e.g. ``ip=10.0.0.1|route=users``."""
        pieces: list[str] = []
        for kind, name in self._parts:
            if kind == "ip":
                pieces.append(f"ip={ctx.client_ip}")
            elif kind == "route":
                pieces.append(f"route={ctx.route_name}")
            elif kind == "header":
                value = ctx.header(name)
                pieces.append(f"h:{name}={value}" if value is not None else f"ip={ctx.client_ip}")
            else:
                claims = ctx.state.get("claims")
                value = claims.get(name) if isinstance(claims, dict) else None
                pieces.append(f"c:{name}={value}" if value is not None else f"ip={ctx.client_ip}")
        key = "|".join(pieces)
        if len(key) > _LONG_KEY:
            key = "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        return key

    async def on_request(self, ctx: RequestContext) -> Response | None:
        key = self.bucket_key(ctx)
        if self._local is not None:
            decision: Decision | None = self._local.check(key, time.monotonic())
        else:
            decision = await self._redis_check(key)
            if decision is None:
                if self.config.fail_open:
                    self.passed_open += 1
                    return None
                self.refused_closed += 1
                return Response.error(
                    503,
                    "rate_limit_unavailable",
                    "the rate limit store is unavailable; request refused",
                    ctx.request_id,
                )
        assert decision is not None
        ctx.state[self._state_key] = decision
        if decision.allowed:
            return None
        self.rejected += 1
        retry = max(1, math.ceil(decision.retry_after))
        headers = [(b"retry-after", str(retry).encode()), *self._headers(decision)]
        return Response.error(
            429, "rate_limited", f"rate limit exceeded; retry in {retry} s", ctx.request_id, headers
        )

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        decision = ctx.state.get(self._state_key)
        if decision is None:
            return
        # Several limiters on one route: the most restrictive one's numbers are shown.
        shown = response.header("x-ratelimit-remaining")
        if shown is not None and shown.isdigit() and int(shown) < decision.remaining:
            return
        names = {name for name, _ in self._headers(decision)}
        response.headers[:] = [(h, v) for h, v in response.headers if h not in names]
        response.headers.extend(self._headers(decision))

    def _headers(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        remaining = str(decision.remaining)
        reset = str(max(0, math.ceil(decision.reset - 1e-6)))
        limit = self._limit_text
        return [
            (b"ratelimit-policy", self._policy),
            (b"ratelimit", f"limit={limit}, remaining={remaining}, reset={reset}".encode()),
            (b"x-ratelimit-limit", limit.encode()),
            (b"x-ratelimit-remaining", remaining.encode()),
            (b"x-ratelimit-reset", reset.encode()),
        ]

    async def _redis_check(self, key: str, *, probe: bool = False) -> Decision | None:
        """The shared check; None when Redis is unreachable (or its circuit is open)."""
        link = self._link
        assert link is not None
        if not link.available():
            return None
        try:
            if probe:
                await link.client.ping()
                link.succeeded()
                return None
            reply = await GCRA(
                link.client, [self._redis_prefix + key], [self._interval_us, self._window_us]
            )
        except REDIS_ERRORS as exc:
            link.failed(exc)
            return None
        link.succeeded()
        allowed, remaining, reset_us, retry_us = (int(x) for x in reply)
        return Decision(bool(allowed), max(0, remaining), reset_us / 1e6, retry_us / 1e6)


PLUGIN = RateLimitPlugin
