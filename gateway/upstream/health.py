"""Active health checks: probe every endpoint on a timer and flip ``healthy``.

Why active checks when breakers and outlier ejection already react to errors: those
only learn from traffic. An endpoint that died while idle would take the next real
requests down with it, and an ejected or unhealthy endpoint gets no traffic at all, so
only a probe can see that it came back.

How (close to nginx ``health_check`` / Envoy ``health_checks``):

* one asyncio task per target, so a probe stuck until its timeout delays no other
  target; the first probe runs within ``interval * jitter`` of :meth:`start`, then
  every ``interval`` (± ``jitter``, so the probes of many gateways and targets do not
  line up into bursts);
* ``http``: ``GET path HTTP/1.1`` with ``Connection: close`` over a raw asyncio stream
  (TLS for https/h2 endpoints); a 2xx or 3xx status line passes. Only the status line
  matters; the rest is drained briefly so the upstream can close cleanly;
* ``tcp``: the connection is accepted;
* ``healthy`` flips only after ``healthy_threshold`` passes or ``unhealthy_threshold``
  failures in a row (hysteresis: one lost packet must not eject an endpoint);
* FARP services name their own health endpoint (``endpoints.health``): a path on the
  instance, or an absolute URL such as ``http://host:9090/healthz``; give it per target
  with ``health_path``.

Plain HTTP/1.1 probes suit http/https endpoints; an h2c endpoint that only speaks HTTP/2
with prior knowledge should use ``kind="tcp"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from gateway.upstream.tls import client_context

__all__ = [
    "ActiveHealthChecker",
    "HealthSettings",
    "HealthTarget",
    "Probe",
    "ProbeFailed",
    "probe_for",
]

log = logging.getLogger("octopus.health")

_DEFAULT_PORTS = {"http": 80, "https": 443, "h2c": 80, "h2": 443}
_TLS_SCHEMES = frozenset({"https", "h2"})
#: Bytes of a response body read after the status line before hanging up anyway.
_DRAIN_LIMIT = 64 * 1024


class _Address(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def tls(self) -> bool: ...


class HealthTarget(Protocol):
    """What the checker reads and writes (``upstream.Endpoint`` fits)."""

    @property
    def address(self) -> _Address: ...

    healthy: bool


T = TypeVar("T", bound=HealthTarget)


class HealthSettings(Protocol):
    """What :meth:`ActiveHealthChecker.from_settings` reads (``HealthCheckSettings`` fits)."""

    @property
    def type(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def interval(self) -> float: ...

    @property
    def timeout(self) -> float: ...

    @property
    def healthy_threshold(self) -> int: ...

    @property
    def unhealthy_threshold(self) -> int: ...


class ProbeFailed(Exception):
    """The endpoint answered, but not with a passing status."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Where and what to probe, resolved once per target."""

    host: str
    port: int
    tls: bool
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    def request(self) -> bytes:
        return (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n"
            "User-Agent: octopus-health-check\r\n"
            "Accept: */*\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")


def probe_for(address: _Address, health: str) -> Probe:
    """The probe for an endpoint: ``health`` is a path on it, or an absolute URL.

    Raises ValueError for something that cannot be probed (unknown scheme, no host,
    whitespace that would break the request line).
    """
    health = health.strip()
    if any(char in health for char in " \t\r\n"):
        raise ValueError(f"health path {health!r} contains whitespace")
    if "://" in health:
        parts = urlsplit(health)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"health URL {health!r}: scheme must be http or https")
        if not parts.hostname:
            raise ValueError(f"health URL {health!r} has no host")
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError:
            raise ValueError(f"health URL {health!r} has an invalid port") from None
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return Probe(parts.hostname, port, scheme in _TLS_SCHEMES, path)
    path = health if health.startswith("/") else "/" + health
    return Probe(address.host, address.port, address.tls, path)


def _status_passes(line: bytes) -> bool:
    """Whether an HTTP status line says 2xx or 3xx."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return False
    code = parts[1]
    return len(code) == 3 and code.isdigit() and 200 <= int(code) < 400


class _Counters:
    __slots__ = ("failures", "last_error", "passes")

    def __init__(self) -> None:
        self.passes = 0
        self.failures = 0
        self.last_error = ""


class ActiveHealthChecker(Generic[T]):
    """Probes a fixed set of targets until stopped; one checker per upstream."""

    def __init__(
        self,
        targets: Sequence[T],
        *,
        kind: str = "http",
        path: str = "/health",
        interval: float = 10.0,
        timeout: float = 2.0,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 3,
        jitter: float = 0.1,
        on_change: Callable[[T, bool], None] | None = None,
        health_path: Callable[[T], str | None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if kind not in ("http", "tcp"):
            raise ValueError(f"health check kind must be http or tcp (got {kind!r})")
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.kind = kind
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.jitter = min(max(jitter, 0.0), 1.0)
        self._on_change = on_change
        self._ssl_context = ssl_context
        self._rng = rng or random.Random()
        self._targets = tuple(targets)
        self._probes = tuple(self._resolve(target, health_path) for target in self._targets)
        self._counters = tuple(_Counters() for _ in self._targets)
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(
        cls,
        targets: Sequence[T],
        settings: HealthSettings,
        *,
        on_change: Callable[[T, bool], None] | None = None,
        health_path: Callable[[T], str | None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ActiveHealthChecker[T]:
        """Build from a ``HealthCheckSettings``."""
        return cls(
            targets,
            kind=settings.type,
            path=settings.path,
            interval=settings.interval,
            timeout=settings.timeout,
            healthy_threshold=settings.healthy_threshold,
            unhealthy_threshold=settings.unhealthy_threshold,
            on_change=on_change,
            health_path=health_path,
            ssl_context=ssl_context,
        )

    def _resolve(self, target: T, health_path: Callable[[T], str | None] | None) -> Probe:
        own = health_path(target) if health_path is not None else None
        if own:
            try:
                return probe_for(target.address, own)
            except ValueError as exc:
                log.warning("%s; probing %s instead", exc, self.path)
        return probe_for(target.address, self.path)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def targets(self) -> tuple[T, ...]:
        return self._targets

    @property
    def probes(self) -> tuple[Probe, ...]:
        """The resolved probe of each target, in target order."""
        return self._probes

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        """Start probing (needs a running event loop); a second call does nothing."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(index), name=f"health-check:{probe.host}:{probe.port}")
            for index, probe in enumerate(self._probes)
        ]

    async def stop(self) -> None:
        """Stop probing and wait for the probe tasks to end."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, index: int) -> None:
        # Spread the first round too: a table swap starts every checker at once.
        await asyncio.sleep(self._rng.uniform(0.0, self.interval * self.jitter))
        spread = self.jitter * self.interval
        while True:
            await self._check(index)
            await asyncio.sleep(self.interval + self._rng.uniform(-spread, spread))

    # -- probing ---------------------------------------------------------------------

    def _index_of(self, target: T) -> int:
        for index, candidate in enumerate(self._targets):
            if candidate is target:
                return index
        raise ValueError("not a target of this checker")

    async def check(self, target: T) -> bool:
        """Probe one target now and apply the result; returns whether the probe passed."""
        return await self._check(self._index_of(target))

    async def check_all(self) -> None:
        """Probe every target once, concurrently (startup, an admin "check now")."""
        await asyncio.gather(*(self._check(index) for index in range(len(self._targets))))

    def counters(self, target: T) -> tuple[int, int, str]:
        """``(consecutive passes, consecutive failures, last error)`` of a target."""
        counters = self._counters[self._index_of(target)]
        return counters.passes, counters.failures, counters.last_error

    async def _check(self, index: int) -> bool:
        probe = self._probes[index]
        counters = self._counters[index]
        try:
            if self.kind == "tcp":
                await self._tcp(probe)
            else:
                await self._http(probe)
        except Exception as exc:  # any failure of the probe is a failed check
            counters.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
            self._apply(index, False)
            return False
        counters.last_error = ""
        self._apply(index, True)
        return True

    def _apply(self, index: int, passed: bool) -> None:
        target = self._targets[index]
        counters = self._counters[index]
        if passed:
            counters.passes += 1
            counters.failures = 0
            if not target.healthy and counters.passes >= self.healthy_threshold:
                self._flip(target, True)
        else:
            counters.failures += 1
            counters.passes = 0
            if target.healthy and counters.failures >= self.unhealthy_threshold:
                self._flip(target, False)

    def _flip(self, target: T, healthy: bool) -> None:
        target.healthy = healthy
        log.info(
            "endpoint %s:%s is now %s",
            target.address.host,
            target.address.port,
            "healthy" if healthy else "unhealthy",
        )
        if self._on_change is None:
            return
        try:
            self._on_change(target, healthy)
        except Exception:
            log.exception("health check on_change callback failed")

    async def _connect(
        self, probe: Probe, tls: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if tls:
            # Offer only http/1.1 so an h2 endpoint that also speaks 1.1 agrees to it.
            context = self._ssl_context or client_context(True, None, ("http/1.1",))
            return await asyncio.open_connection(
                probe.host, probe.port, ssl=context, server_hostname=probe.host
            )
        return await asyncio.open_connection(probe.host, probe.port)

    async def _tcp(self, probe: Probe) -> None:
        """Passes when the TCP connection is accepted (no TLS handshake, no request)."""
        async with asyncio.timeout(self.timeout):
            _, writer = await self._connect(probe, tls=False)
        writer.close()

    async def _http(self, probe: Probe) -> None:
        """Passes on a 2xx/3xx status line within ``timeout``; raises otherwise."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await self._connect(probe, tls=probe.tls)
                writer.write(probe.request())
                await writer.drain()
                line = await reader.readline()
            if not line:
                raise ConnectionError("connection closed before a status line")
            if not _status_passes(line):
                status = line.decode("latin-1", "replace").strip()[:80]
                raise ProbeFailed(f"unhealthy status: {status}")
            # Let the upstream finish its response and close first (no RST, no noise in
            # its logs); the verdict is already known, so errors here do not matter.
            with contextlib.suppress(Exception):
                async with asyncio.timeout_at(deadline):
                    drained = 0
                    while drained < _DRAIN_LIMIT:
                        chunk = await reader.read(16 * 1024)
                        if not chunk:
                            break
                        drained += len(chunk)
        finally:
            if writer is not None:
                writer.close()
