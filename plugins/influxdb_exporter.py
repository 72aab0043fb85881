"""``influxdb-exporter``: per-route request counts and latency, written as line protocol.

Requests only update an in-memory aggregate (a dict lookup and a few additions); every
``interval`` a background task turns the window's aggregates into InfluxDB line
protocol and POSTs them to ``url`` (v2 ``/api/v2/write?org=..&bucket=..`` or v1
``/write?db=..``), so the database being slow or down never touches requests.

One point per (route, method, status class) per interval::

    octopus_requests,instance=gw1-4242,method=GET,route=/users/{id},status_class=2xx \
        count=12i,duration_count=12i,duration_sum_ms=40.1,duration_mean_ms=3.34,\
        duration_max_ms=9.8,duration_p50_ms=3.1,duration_p99_ms=9.8 1735732800

Counts are per interval (deltas, like StatsD), so ``sum()`` over time gives totals.
p50/p99 come from a fixed log-spaced histogram (interpolated inside the bucket):
accurate to a bucket, constant memory, no per-request allocation. ``route`` is the
route template, never the raw path, so series stay bounded.

Why the ``instance`` tag (on by default): every worker process writes its own
aggregates with the same timestamp; InfluxDB treats points with equal measurement,
tags and time as one point and keeps the last write, so without a per-process tag N
workers would overwrite each other. Turn it off (``instance_tag: false``) only with one
worker, or use ``tags`` to set something unique yourself.

A failed write is kept and retried with the next one, up to ``max_pending`` lines
(oldest dropped first, counted). ``stop()`` writes the last window, bounded by
``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from bisect import bisect_left
from collections import deque
from typing import ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from plugins.api import Plugin, PluginMetadata, RequestContext, Response
from plugins.events import STARTED_KEY, mark_started
from settings.fields import Duration

log = logging.getLogger("octopus.plugins.influxdb")

#: Upper bounds (ms) of the latency histogram buckets; one more bucket holds the rest.
BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000,
)  # fmt: skip
#: Timestamp multipliers per ``precision`` query value (v2 spelling, then v1).
_PRECISION = {
    "s": 1,
    "ms": 1e3,
    "us": 1e6,
    "ns": 1e9,
    "u": 1e6,
    "n": 1e9,
    "m": 1 / 60,
    "h": 1 / 3600,
}


class InfluxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The write endpoint with its query (org/bucket or db); ``precision=s`` is added
    #: when absent, and timestamps follow the precision given.
    url: str = Field(min_length=1)
    #: Sent as ``Authorization: Token <token>`` (v2 tokens, or v1 ``user:password``).
    token: str | None = None
    measurement: str = Field("octopus_requests", min_length=1)
    interval: Duration = 10.0
    #: One write's timeout (and the bound on the final write at shutdown).
    timeout: Duration = 5.0
    #: Constant tags added to every point (``region: eu``).
    tags: dict[str, str] = Field(default_factory=dict)
    #: Add ``instance=<hostname>-<pid>`` so workers do not overwrite each other's points.
    instance_tag: bool = True
    #: Lines kept for retry while writes fail.
    max_pending: int = Field(10_000, ge=1)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// write URL")
        with_precision(url)
        return url


# --- line protocol ---------------------------------------------------------------


def escape_measurement(value: str) -> str:
    return _no_newlines(value).replace(",", r"\,").replace(" ", r"\ ")


def escape_key(value: str) -> str:
    """Tag keys, tag values and field keys: comma, equals sign and space are escaped."""
    return _no_newlines(value).replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def escape_string_field(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _no_newlines(value: str) -> str:
    # Line protocol has no escape for a newline in keys or tag values.
    return value.replace("\r", " ").replace("\n", " ")


def format_field(value: int | float | str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(round(value, 3))
    return escape_string_field(value)


def format_line(
    measurement: str,
    tags: dict[str, str],
    fields: dict[str, int | float | str | bool],
    timestamp: int | None = None,
) -> str:
    """One point. Tags are sorted (what InfluxDB stores, and cheaper for it to parse);
    empty tag values are left out because line protocol has no empty tag."""
    parts = [escape_measurement(measurement)]
    for key in sorted(tags):
        if tags[key] != "":
            parts.append(f"{escape_key(key)}={escape_key(tags[key])}")
    head = ",".join(parts)
    body = ",".join(f"{escape_key(key)}={format_field(value)}" for key, value in fields.items())
    line = f"{head} {body}"
    return line if timestamp is None else f"{line} {timestamp}"


# --- aggregation -----------------------------------------------------------------


class LatencyHistogram:
    """Fixed buckets: constant memory, quantiles accurate to a bucket."""

    __slots__ = ("count", "counts", "max", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_MS) + 1)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect_left(BUCKETS_MS, ms)] += 1
        self.count += 1
        self.sum += ms
        if ms > self.max:
            self.max = ms

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, interpolated linearly inside its bucket, capped at max."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for index, in_bucket in enumerate(self.counts):
            if in_bucket and seen + in_bucket >= rank:
                lower = BUCKETS_MS[index - 1] if index > 0 else 0.0
                upper = BUCKETS_MS[index] if index < len(BUCKETS_MS) else self.max
                value = lower + (upper - lower) * max(rank - seen, 0) / in_bucket
                return min(value, self.max)
            seen += in_bucket
        return self.max


class RouteStats:
    """One (route, method, status class) in one interval."""

    __slots__ = ("count", "latency")

    def __init__(self) -> None:
        self.count = 0
        self.latency = LatencyHistogram()

    def fields(self) -> dict[str, int | float | str | bool]:
        latency = self.latency
        fields: dict[str, int | float | str | bool] = {
            "count": self.count,
            "duration_count": latency.count,
        }
        if latency.count:
            fields.update(
                duration_sum_ms=latency.sum,
                duration_mean_ms=latency.sum / latency.count,
                duration_max_ms=latency.max,
                duration_p50_ms=latency.quantile(0.5),
                duration_p99_ms=latency.quantile(0.99),
            )
        return fields


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def with_precision(url: str) -> tuple[str, float]:
    """``url`` with ``precision=s`` unless it names one; and the timestamp multiplier."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = dict(query).get("precision")
    if given is None:
        query.append(("precision", "s"))
        return urlunsplit(parts._replace(query=urlencode(query))), 1.0
    if given not in _PRECISION:
        raise ValueError(f"unknown precision {given!r} (use s, ms, us or ns)")
    return url, float(_PRECISION[given])


class InfluxDbExporter(Plugin):
    """Aggregates per route in memory; a background task writes each interval."""

    metadata = PluginMetadata(
        name="influxdb-exporter",
        version="1.0.0",
        description="Writes per-route request counts and latency to InfluxDB.",
    )
    Config: ClassVar[type[BaseModel]] = InfluxConfig
    config: InfluxConfig

    def __init__(self) -> None:
        super().__init__()
        self._window: dict[tuple[str, str, str], RouteStats] = {}
        self._pending: deque[str] = deque()
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._write_url = ""
        self._scale = 1.0
        self._tags: dict[str, str] = {}
        #: Successful writes, failed writes, and lines dropped from the retry backlog.
        self.writes = 0
        self.failures = 0
        self.dropped_lines = 0

    def configure(self, config: BaseModel) -> None:
        super().configure(config)
        self._write_url, self._scale = with_precision(self.config.url)
        self._tags = dict(self.config.tags)

    async def start(self) -> None:
        # Here, not in configure: start runs in the worker process, after any fork.
        if self.config.instance_tag:
            self._tags.setdefault("instance", f"{socket.gethostname()}-{os.getpid()}")
        headers = {"content-type": "text/plain; charset=utf-8"}
        if self.config.token:
            headers["authorization"] = f"Token {self.config.token}"
        self._client = httpx.AsyncClient(headers=headers, timeout=self.config.timeout)
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="influxdb-exporter")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None or self._stopping is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=self.config.timeout + 1)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def on_request(self, ctx: RequestContext) -> Response | None:
        mark_started(ctx)
        return None

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        key = (ctx.route_path or "unmatched", ctx.method, status_class(response.status))
        stats = self._window.get(key)
        if stats is None:
            stats = self._window[key] = RouteStats()
        stats.count += 1
        started = ctx.state.get(STARTED_KEY)
        if started is not None:
            stats.latency.observe((time.perf_counter() - started) * 1000.0)

    def take_lines(self, now: float | None = None) -> list[str]:
        """The current window as lines (the window starts afresh)."""
        window, self._window = self._window, {}
        stamp = int((time.time() if now is None else now) * self._scale)
        lines = []
        for (route, method, klass), stats in window.items():
            tags = {**self._tags, "route": route, "method": method, "status_class": klass}
            lines.append(format_line(self.config.measurement, tags, stats.fields(), stamp))
        return lines

    async def flush(self) -> bool:
        """Write the window plus any backlog; True when the write succeeded."""
        self._pending.extend(self.take_lines())
        overflow = len(self._pending) - self.config.max_pending
        for _ in range(max(overflow, 0)):
            self._pending.popleft()
            self.dropped_lines += 1
        if not self._pending or self._client is None:
            return True
        lines = list(self._pending)
        try:
            reply = await self._client.post(self._write_url, content="\n".join(lines) + "\n")
        except httpx.HTTPError as exc:
            self.failures += 1
            log.warning("influxdb write failed", extra={"error": repr(exc)})
            return False
        if reply.status_code >= 300:
            self.failures += 1
            log.warning(
                "influxdb write refused",
                extra={"status": reply.status_code, "body": reply.text[:300]},
            )
            # 4xx other than 429 means the lines themselves are refused: retrying the
            # same bytes would fail forever, so they are dropped (and counted).
            if 400 <= reply.status_code < 500 and reply.status_code != 429:
                self.dropped_lines += len(lines)
                for _ in lines:
                    self._pending.popleft()
            return False
        for _ in lines:
            self._pending.popleft()
        self.writes += 1
        return True

    async def _run(self) -> None:
        assert self._stopping is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.config.interval)
            # Read before writing: requests answered during a write stopping is waiting
            # for still get one more (final) write.
            stopping = self._stopping.is_set()
            try:
                await self.flush()
            except Exception:
                log.exception("influxdb exporter flush failed")
            if stopping:
                return


PLUGIN = InfluxDbExporter
