"""``cache``: a shared HTTP response cache in Redis (RFC 9111, the parts a gateway needs).

Config, defaults in brackets:

- ``redis_url`` [``redis://127.0.0.1:6379/0``], ``default_ttl`` [``60s``]: freshness of a
  response that states none, ``max_entry_size`` [``1MiB``]: larger bodies pass through
  uncached;
- extensions: ``methods`` [GET, HEAD] (a subset of those two), ``statuses`` [200, 203, 204,
  301, 404, 410] (the final, heuristically cacheable statuses a gateway sees most; 206 is
  left out because ranges are not stored, redirects other than 301 because they are
  usually per-request), ``prefix`` [``octopus:cache:``] of every Redis key,
  ``lock_timeout`` [``5s``] how long concurrent requests for a key being fetched wait
  for it (like nginx ``proxy_cache_lock_timeout``), ``redis_timeout`` [``200ms``].

What is stored: responses to GET (HEAD is answered from the GET entry; a HEAD miss
passes through and stores nothing), with a status in ``statuses``, no ``Set-Cookie``, no
``Cache-Control: no-store | private | no-cache``, no ``Vary: *``, and a positive freshness
lifetime: ``s-maxage`` (wins, this is a shared cache), else ``max-age``, else
``Expires - Date`` (``Expires`` is ignored when either is present), else ``default_ttl``;
an ``Age`` from upstream is subtracted. A request with ``Authorization`` only stores a
response marked ``public``, ``s-maxage`` or ``must-revalidate`` (RFC 9111 §3.5).

Requests: ``Cache-Control: no-store`` bypasses the cache; ``no-cache`` (or ``Pragma:
no-cache``) skips the lookup but stores the fresh answer; ``max-age=N`` accepts only
entries at most N seconds old; ``only-if-cached`` answers 504 on a miss. A successful
POST/PUT/PATCH/DELETE drops the stored GET entry of the same URI (RFC 9111 §4.4).

Key: method (HEAD maps to GET), host, path (decoded and raw), the query with its
parameters sorted by name, and, when the stored response has ``Vary``, the values of
those request headers (the base key then holds a small "varies on" record and each
variant has a key of its own). Request headers are snapshotted when the request reaches
this plugin, so the lookup and the store agree even if later plugins add headers.
Keys are ``{prefix}{hash(path)}:{hash(rest)}``, so a purge by path is one SCAN pattern.
Order plugins so that auth runs *before* the cache: a hit is answered by this plugin.

Stampedes: one upstream fetch per key at a time in a process (the first request leads,
the others await its result), and across processes a short Redis lock (``SET NX PX
lock_timeout``): requests of other processes poll the cache (10 → 50 ms apart) until
the entry appears, the lock is gone or ``lock_timeout`` passed, then go upstream. A
fetch that fails (``on_error``: upstream error, response aborted) releases its waiters at
once; one whose response never completes holds them at most ``lock_timeout``.

``X-Cache: HIT`` (with ``Age``) or ``X-Cache: MISS`` (anything not answered from the
cache) on GET/HEAD responses. Redis down → requests pass through uncached (never an
error), the outage is logged once per state change and counted (``stats``).
Purge: ``DELETE /_/cache`` (every key under ``prefix``) or ``DELETE /_/cache?path=/x``
on the admin API (``purge``).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import re
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from plugins._redis import REDIS_ERRORS, RedisLink, Script
from plugins.api import Headers, Plugin, PluginMetadata, RequestContext, Response
from settings.units import parse_duration, parse_size

log = logging.getLogger("octopus.plugins.cache")

Seconds = Annotated[float, BeforeValidator(parse_duration)]
Bytes = Annotated[int, BeforeValidator(parse_size)]

#: Response headers never stored: per-request, recomputed on a hit, or hop-by-hop.
_NOT_STORED = frozenset(
    {
        b"age",
        b"x-cache",
        b"x-request-id",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"set-cookie",
        b"ratelimit",
        b"ratelimit-policy",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
    }
)
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ENTRY = b"OCE1"
_VARIES = b"OCV1"
_GLOB = re.compile(r"([*?\[\]\\])")

#: Delete the lock only if it is still ours (it may have expired and been re-taken).
UNLOCK = Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    redis_url: str = "redis://127.0.0.1:6379/0"
    default_ttl: Seconds = 60.0
    max_entry_size: Bytes = 1024 * 1024
    methods: list[Literal["GET", "HEAD"]] = Field(default_factory=lambda: ["GET", "HEAD"])
    statuses: list[int] = Field(default_factory=lambda: [200, 203, 204, 301, 404, 410])
    prefix: str = "octopus:cache:"
    lock_timeout: Seconds = 5.0
    redis_timeout: Seconds = 0.2

    @field_validator("methods", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [v.upper() if isinstance(v, str) else v for v in value]
        return value

    @field_validator("default_ttl")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("max_entry_size", "lock_timeout", "redis_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value


def cache_control(values: list[str]) -> dict[str, str | None]:
    """``Cache-Control`` directives (names lower-cased, quoted values unquoted)."""
    directives: dict[str, str | None] = {}
    for value in values:
        for part in _split_outside_quotes(value):
            name, sep, argument = part.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            if sep:
                argument = argument.strip()
                if len(argument) >= 2 and argument[0] == argument[-1] == '"':
                    argument = argument[1:-1]
                directives.setdefault(name, argument)
            else:
                directives.setdefault(name, None)
    return directives


def _split_outside_quotes(value: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _seconds(value: str | None) -> int | None:
    """A delta-seconds value, or None when absent or malformed."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def _digest(*parts: str, size: int = 16) -> str:
    hasher = hashlib.blake2b(digest_size=size)
    for part in parts:
        hasher.update(part.encode("utf-8", "surrogateescape"))
        hasher.update(b"\x00")
    return hasher.hexdigest()


def path_hash(path: str) -> str:
    """The key part a purge by path matches on."""
    return _digest(path, size=8)


def vary_hash(names: tuple[str, ...], headers: Headers) -> str:
    """The variant of a request: the values of the headers the response varies on."""
    values = []
    for name in names:
        key = name.encode("latin-1")
        found = [v.decode("latin-1").strip() for h, v in headers if h == key]
        values.append(f"{name}:{','.join(found)}")
    return _digest(*values)


@dataclass
class Entry:
    """A stored response. ``stored_at`` is wall-clock time: shared by processes."""

    status: int
    headers: Headers
    body: bytes
    stored_at: float
    initial_age: int
    ttl: float
    vary: tuple[str, ...] = ()
    variant: str = ""

    def age(self, now: float) -> int:
        return self.initial_age + max(0, int(now - self.stored_at))

    def fresh(self, now: float) -> bool:
        return now < self.stored_at + self.ttl

    def encode(self) -> bytes:
        meta = {
            "s": self.status,
            "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
            "t": self.stored_at,
            "a": self.initial_age,
            "l": self.ttl,
            "v": list(self.vary),
            "x": self.variant,
        }
        head = json.dumps(meta, separators=(",", ":")).encode()
        return _ENTRY + struct.pack(">I", len(head)) + head + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        (size,) = struct.unpack(">I", raw[4:8])
        meta = json.loads(raw[8 : 8 + size])
        return cls(
            status=int(meta["s"]),
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["h"]],
            body=raw[8 + size :],
            stored_at=float(meta["t"]),
            initial_age=int(meta["a"]),
            ttl=float(meta["l"]),
            vary=tuple(meta["v"]),
            variant=str(meta["x"]),
        )


@dataclass
class _Flight:
    """The in-process fetch of one key; waiters await ``future`` (an Entry or None)."""

    future: asyncio.Future[Entry | None]
    started: float


@dataclass
class _Plan:
    status: int
    headers: Headers
    ttl: float
    initial_age: int
    vary: tuple[str, ...]


@dataclass
class _State:
    """What this plugin remembers about one GET/HEAD request."""

    base: str
    lock_key: str
    headers: Headers
    authorized: bool
    store: bool = True
    hit: bool = False
    flight: _Flight | None = None
    lock: str | None = None
    plan: _Plan | None = None


@dataclass
class _Invalidate:
    """An unsafe request: on success, drop the stored GET entry of its URI."""

    base: str


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    #: Requests answered from another request's fetch (in process or via the lock).
    coalesced: int = 0
    too_large: int = 0


class CachePlugin(Plugin):
    metadata = PluginMetadata(
        name="cache",
        version="1.0.0",
        description="Shared HTTP response cache in Redis with stampede protection.",
    )
    Config = CacheConfig
    config: CacheConfig

    def __init__(self) -> None:
        super().__init__()
        self.counters = CacheStats()
        self._inflight: dict[str, _Flight] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state_key = f"cache:{id(self)}"
        self._link: RedisLink | None = None

    def configure(self, config: Any) -> None:
        super().configure(config)
        self._methods = frozenset(config.methods)
        self._statuses = frozenset(config.statuses)
        self._link = RedisLink(config.redis_url, timeout=config.redis_timeout, log=log)

    @property
    def link(self) -> RedisLink:
        assert self._link is not None, "configure() first"
        return self._link

    @property
    def stats(self) -> dict[str, int]:
        c = self.counters
        return {
            "hits": c.hits,
            "misses": c.misses,
            "stored": c.stored,
            "coalesced": c.coalesced,
            "too_large": c.too_large,
            "redis_failures": self.link.failures,
            "redis_outages": self.link.outages,
        }

    async def start(self) -> None:
        link = self.link
        try:
            await link.client.ping()
            link.succeeded()
        except REDIS_ERRORS as exc:  # logged once; requests pass through until it is back
            link.failed(exc)

    async def stop(self) -> None:
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        for flight in self._inflight.values():
            if not flight.future.done():
                flight.future.set_result(None)
        self._inflight.clear()
        await self.link.close()

    # --- keys -------------------------------------------------------------------

    def _keys(self, ctx: RequestContext) -> tuple[str, str]:
        query = parse_qsl(ctx.query_string.decode("latin-1"), keep_blank_values=True)
        query.sort(key=lambda pair: pair[0])  # stable: repeated names keep their order
        raw_path = ctx.scope.get("raw_path") or ctx.path.encode()
        host = (ctx.header("host") or "").lower()
        rest = _digest("GET", host, ctx.path, raw_path.decode("latin-1"), urlencode(query))
        node = f"{path_hash(ctx.path)}:{rest}"
        return self.config.prefix + node, f"{self.config.prefix}lock:{node}"

    # --- request ----------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> Response | None:
        method = ctx.method
        if method not in self._methods:
            if method in _UNSAFE:
                ctx.state[self._state_key] = _Invalidate(self._keys(ctx)[0])
            return None
        directives = cache_control(ctx.header_values("cache-control"))
        if "no-store" in directives:
            return None
        base, lock_key = self._keys(ctx)
        st = _State(
            base,
            lock_key,
            list(ctx.request_headers),
            authorized=ctx.header("authorization") is not None,
            store=method == "GET",
        )
        ctx.state[self._state_key] = st
        if not self.link.available():
            st.store = False
            return None
        no_cache = "no-cache" in directives or (
            not directives and "no-cache" in (ctx.header("pragma") or "").lower()
        )
        max_age = _seconds(directives.get("max-age"))
        if not no_cache:
            try:
                entry = await self._lookup(st)
            except REDIS_ERRORS as exc:
                self.link.failed(exc)
                st.store = False
                return None
            if entry is not None and (max_age is None or entry.age(time.time()) <= max_age):
                return self._hit(ctx, st, entry)
        if "only-if-cached" in directives:
            return Response.error(
                504, "not_cached", "no stored response and only-if-cached", ctx.request_id
            )
        if not st.store or no_cache:
            return None
        return await self._miss(ctx, st)

    async def _miss(self, ctx: RequestContext, st: _State) -> Response | None:
        """Lead the fetch of this key, or wait for the request already fetching it."""
        now = time.monotonic()
        timeout = self.config.lock_timeout
        flight = self._inflight.get(st.base)
        if flight is not None and now - flight.started < timeout:
            try:
                entry = await asyncio.wait_for(
                    asyncio.shield(flight.future), timeout - (now - flight.started)
                )
            except TimeoutError:
                entry = None
            if entry is not None and self._matches(entry, st):
                self.counters.coalesced += 1
                return self._hit(ctx, st, entry)
            return None  # fetch ourselves, and store the answer
        self._drop_stale_flights(now)
        flight = _Flight(asyncio.get_running_loop().create_future(), now)
        self._inflight.pop(st.base, None)  # re-inserted at the end: the dict stays in age order
        self._inflight[st.base] = flight
        st.flight = flight
        try:
            token = secrets.token_hex(8)
            try:
                locked = await self.link.client.set(
                    st.lock_key, token, nx=True, px=max(1, int(timeout * 1000))
                )
            except REDIS_ERRORS as exc:
                self.link.failed(exc)
                st.store = False
                self._finish(st, None)
                return None
            if locked:
                st.lock = token
                return None
            entry = await self._poll(st, time.monotonic() + timeout)
        except BaseException:
            self._finish(st, None)
            raise
        if entry is not None:
            self.counters.coalesced += 1
            self._finish(st, entry)
            return self._hit(ctx, st, entry)
        return None

    def _drop_stale_flights(self, now: float) -> None:
        """Forget up to two flights older than ``lock_timeout`` (oldest first): a fetch
        whose response never completed (client gone, body over the tee limit) never
        reports back, and its waiters have given up by then."""
        for _ in range(2):
            oldest = next(iter(self._inflight), None)
            if oldest is None:
                return
            flight = self._inflight[oldest]
            if now - flight.started < self.config.lock_timeout:
                return
            if not flight.future.done():
                flight.future.set_result(None)
            del self._inflight[oldest]

    async def _poll(self, st: _State, deadline: float) -> Entry | None:
        """Another process holds the fetch lock: wait for its entry or for the lock to go."""
        delay = 0.01
        client = self.link.client
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                stored, lock = await client.mget([st.base, st.lock_key])
                entry = await self._resolve(st, stored)
            except REDIS_ERRORS as exc:
                self.link.failed(exc)
                st.store = False
                return None
            if entry is not None:
                return entry
            if lock is None:
                return None
        return None

    async def _lookup(self, st: _State) -> Entry | None:
        stored = await self.link.client.get(st.base)
        self.link.succeeded()
        return await self._resolve(st, stored)

    async def _resolve(self, st: _State, stored: bytes | None) -> Entry | None:
        """The entry for this request from what the base key holds (following Vary)."""
        if not stored:
            return None
        if stored.startswith(_VARIES):
            names = tuple(json.loads(stored[len(_VARIES) :]))
            stored = await self.link.client.get(f"{st.base}:v:{vary_hash(names, st.headers)}")
            if not stored:
                return None
        if not stored.startswith(_ENTRY):
            return None
        try:
            entry = Entry.decode(stored)
        except (ValueError, KeyError, TypeError, struct.error):
            return None
        return entry if entry.fresh(time.time()) else None

    @staticmethod
    def _matches(entry: Entry, st: _State) -> bool:
        return not entry.vary or vary_hash(entry.vary, st.headers) == entry.variant

    def _hit(self, ctx: RequestContext, st: _State, entry: Entry) -> Response:
        st.hit = True
        st.store = False
        self.counters.hits += 1
        headers = list(entry.headers)
        if entry.status != 204:
            headers.append((b"content-length", str(len(entry.body)).encode()))
        headers.append((b"age", str(entry.age(time.time())).encode()))
        headers.append((b"x-cache", b"HIT"))
        body = b"" if ctx.method == "HEAD" else entry.body
        return Response(entry.status, headers, body)

    # --- response ---------------------------------------------------------------

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        st = ctx.state.get(self._state_key)
        if st is None:
            return
        if isinstance(st, _Invalidate):
            if response.status < 400 and self.link.available():
                try:
                    await self.link.client.delete(st.base)
                except REDIS_ERRORS as exc:
                    self.link.failed(exc)
            return
        if st.hit:
            return
        self.counters.misses += 1
        response.set_header("x-cache", "MISS")

    def wants_response_body(self, ctx: RequestContext, response: Response) -> bool:
        st = ctx.state.get(self._state_key)
        if not isinstance(st, _State) or st.hit:
            return False
        plan = self._plan(st, response) if st.store else None
        if plan is None:
            self._finish(st, None)
            return False
        st.plan = plan
        return True

    async def on_response_body(self, ctx: RequestContext, response: Response, body: bytes) -> None:
        st = ctx.state.get(self._state_key)
        if not isinstance(st, _State) or st.plan is None:
            return
        plan, st.plan = st.plan, None
        if len(body) > self.config.max_entry_size:
            self.counters.too_large += 1
            self._finish(st, None)
            return
        variant = vary_hash(plan.vary, st.headers) if plan.vary else ""
        entry = Entry(
            plan.status,
            plan.headers,
            body,
            time.time(),
            plan.initial_age,
            plan.ttl,
            plan.vary,
            variant,
        )
        try:
            await self._store(st, entry)
            self.counters.stored += 1
        except REDIS_ERRORS as exc:
            self.link.failed(exc)
        self._finish(st, entry)

    async def on_error(self, ctx: RequestContext, error: BaseException) -> None:
        """The fetch failed (upstream error, response aborted mid-body): waiters stop
        waiting for it and the lock goes, instead of both lasting ``lock_timeout``."""
        st = ctx.state.get(self._state_key)
        if isinstance(st, _State):
            st.plan = None
            self._finish(st, None)

    def _plan(self, st: _State, response: Response) -> _Plan | None:
        """How to store ``response``, or None when it must not be stored."""
        if response.status not in self._statuses:
            return None
        headers = response.headers
        if any(name == b"set-cookie" for name, _ in headers):
            return None
        directives = cache_control(_values(headers, b"cache-control"))
        if {"no-store", "private", "no-cache"} & directives.keys():
            return None
        if st.authorized and not {"public", "s-maxage", "must-revalidate"} & directives.keys():
            return None
        names = {name.strip().lower() for v in _values(headers, b"vary") for name in v.split(",")}
        vary = tuple(sorted(names - {""}))
        if "*" in vary:
            return None
        length = response.header("content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_entry_size:
            self.counters.too_large += 1
            return None
        lifetime = self._lifetime(directives, response)
        initial_age = _seconds(response.header("age")) or 0
        ttl = (lifetime or 0) - initial_age
        if ttl <= 0:
            return None
        kept = [(name, value) for name, value in headers if name not in _NOT_STORED]
        return _Plan(response.status, kept, ttl, initial_age, vary)

    def _lifetime(self, directives: dict[str, str | None], response: Response) -> float | None:
        for name in ("s-maxage", "max-age"):
            if name in directives:
                return _seconds(directives[name])  # malformed → None → not stored
        expires = response.header("expires")
        if expires is not None:
            when = _http_date(expires)
            if when is None:
                return None  # an invalid Expires means "already expired"
            date = _http_date(response.header("date") or "") or time.time()
            return when - date
        return self.config.default_ttl

    async def _store(self, st: _State, entry: Entry) -> None:
        px = max(1, int(entry.ttl * 1000))
        pipe = self.link.client.pipeline(transaction=False)
        if entry.vary:
            pipe.set(st.base, _VARIES + json.dumps(list(entry.vary)).encode(), px=px)
            pipe.set(f"{st.base}:v:{entry.variant}", entry.encode(), px=px)
        else:
            pipe.set(st.base, entry.encode(), px=px)
        await pipe.execute()
        self.link.succeeded()

    def _finish(self, st: _State, entry: Entry | None) -> None:
        """Hand the outcome to in-process waiters and release the cross-process lock."""
        flight, st.flight = st.flight, None
        if flight is not None:
            if not flight.future.done():
                flight.future.set_result(entry)
            if self._inflight.get(st.base) is flight:
                del self._inflight[st.base]
        token, st.lock = st.lock, None
        if token is not None:
            task = asyncio.get_running_loop().create_task(self._unlock(st.lock_key, token))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unlock(self, key: str, token: str) -> None:
        try:
            await UNLOCK(self.link.client, [key], [token])
        except REDIS_ERRORS as exc:  # it expires by itself after lock_timeout
            self.link.failed(exc)

    # --- admin ------------------------------------------------------------------

    async def purge(self, path: str | None = None) -> int:
        """Delete every entry under ``prefix``, or those of one path; the number of keys.

        Raises the Redis error when Redis is unreachable (the admin API answers 503).
        """
        prefix = _GLOB.sub(r"\\\1", self.config.prefix)
        pattern = f"{prefix}*" if path is None else f"{prefix}{path_hash(path)}:*"
        client = self.link.client
        deleted = 0
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.unlink(*batch)
                batch = []
        if batch:
            deleted += await client.unlink(*batch)
        return deleted


def _values(headers: Headers, name: bytes) -> list[str]:
    return [v.decode("latin-1") for h, v in headers if h == name]


def _http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return parsed.timestamp()


PLUGIN = CachePlugin
