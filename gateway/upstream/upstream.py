"""An upstream: a named set of endpoints and the balancer that picks one per request."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.upstream.errors import NoEndpoint
from gateway.upstream.pool import ConnectionPool

DEFAULT_PORTS = {"http": 80, "https": 443, "h2c": 80, "h2": 443}


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    """Where an endpoint lives, parsed once from its URL."""

    url: str
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> EndpointAddress:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"endpoint {url!r}: scheme must be one of {sorted(DEFAULT_PORTS)}")
        if not parts.hostname:
            raise ValueError(f"endpoint {url!r} has no host")
        port = parts.port or DEFAULT_PORTS[scheme]
        return cls(url=url, scheme=scheme, host=parts.hostname, port=port)

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "h2")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def host_header(self) -> bytes:
        """The Host header an upstream expects: the port only when it is not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return (host if self.port == default else f"{host}:{self.port}").encode()


@dataclass(slots=True)
class Endpoint:
    """One endpoint of an upstream; ``in_flight`` and ``healthy`` are its live state."""

    address: EndpointAddress
    weight: int
    pool: ConnectionPool
    healthy: bool = True
    in_flight: int = 0
    ewma_ms: float = 0.0
    host_header: bytes = b""

    def __post_init__(self) -> None:
        self.host_header = self.address.host_header

    @property
    def url(self) -> str:
        return self.address.url


@dataclass(slots=True)
class UpstreamPolicy:
    """Resolved timeouts and retry settings of an upstream (route values may override)."""

    timeout: float | None = 30.0
    connect_timeout: float | None = 5.0
    read_timeout: float | None = 60.0
    retries: int = 2


@dataclass(slots=True)
class Upstream:
    """A named set of endpoints with its balancing policy."""

    name: str
    endpoints: list[Endpoint]
    load_balance: str = "round-robin"
    policy: UpstreamPolicy = field(default_factory=UpstreamPolicy)
    _cycle: itertools.cycle[Endpoint] | None = None
    _weighted_current: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cycle = itertools.cycle(self.endpoints) if self.endpoints else None
        self._weighted_current = [0] * len(self.endpoints)

    def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint:
        """The endpoint for the next attempt, avoiding ``exclude`` when another exists."""
        endpoints = self.endpoints
        if len(endpoints) == 1:
            only = endpoints[0]
            if only.healthy and only.weight > 0:
                return only
            raise NoEndpoint(f"upstream {self.name!r} has no healthy endpoint")
        if self.load_balance == "weighted":
            chosen = self._pick_weighted(exclude)
        else:
            chosen = self._pick_round_robin(exclude)
        if chosen is None:
            raise NoEndpoint(f"upstream {self.name!r} has no healthy endpoint")
        return chosen

    def _pick_round_robin(self, exclude: Sequence[Endpoint]) -> Endpoint | None:
        if self._cycle is None:
            return None
        fallback = None
        for _ in range(len(self.endpoints)):
            endpoint = next(self._cycle)
            if not endpoint.healthy or endpoint.weight <= 0:
                continue
            if endpoint in exclude:
                fallback = fallback or endpoint
                continue
            return endpoint
        return fallback

    def _pick_weighted(self, exclude: Sequence[Endpoint]) -> Endpoint | None:
        """Smooth weighted round-robin (nginx's algorithm): even spread, exact ratios."""
        current = self._weighted_current
        total = 0
        best = -1
        for index, endpoint in enumerate(self.endpoints):
            if not endpoint.healthy or endpoint.weight <= 0 or endpoint in exclude:
                continue
            current[index] += endpoint.weight
            total += endpoint.weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:
            return self._pick_round_robin(()) if exclude else None
        current[best] -= total
        return self.endpoints[best]
