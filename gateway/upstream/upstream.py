"""An upstream: a named set of endpoints and the balancer that picks one per request."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.upstream.balancing import PeakEwma, make_balancer
from gateway.upstream.breaker import CircuitBreaker
from gateway.upstream.errors import NoEndpoint
from gateway.upstream.outlier import OutlierDetector
from gateway.upstream.pool import ConnectionPool
from gateway.upstream.retry_budget import RetryBudget

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


class Endpoint:
    """One endpoint of an upstream and its live state.

    Endpoint objects outlive routing tables (``EndpointRegistry``), so a table swap keeps
    in-flight counts, latency, health and breaker state.
    """

    __slots__ = (
        "address",
        "breaker",
        "ejected",
        "health_path",
        "healthy",
        "host_header",
        "in_flight",
        "latency",
        "pool",
        "probe_ssl_context",
        "weight",
    )

    def __init__(
        self,
        address: EndpointAddress,
        weight: int,
        pool: ConnectionPool,
        *,
        breaker: CircuitBreaker | None = None,
        health_path: str | None = None,
    ) -> None:
        self.address = address
        self.weight = weight
        self.pool = pool
        self.breaker = breaker
        self.health_path = health_path
        self.healthy = True
        self.in_flight = 0
        self.latency = PeakEwma()
        #: Set by the upstream's outlier detector; read by ``available``.
        self.ejected: Callable[[Endpoint], bool] | None = None
        self.host_header = address.host_header
        #: TLS context for HTTP/1.1 health probes (ALPN http/1.1 even for h2 pools).
        self.probe_ssl_context: Any = None

    @property
    def url(self) -> str:
        return self.address.url

    @property
    def ewma_ms(self) -> float:
        return self.latency.value

    @property
    def is_ejected(self) -> bool:
        return self.ejected is not None and self.ejected(self)

    @property
    def available(self) -> bool:
        """Takes new requests: healthy, not ejected, breaker not refusing, weight > 0."""
        if not self.healthy or self.weight <= 0:
            return False
        breaker = self.breaker
        if breaker is not None and not breaker.available:
            return False
        return not (self.ejected is not None and self.ejected(self))

    @property
    def breaker_state(self) -> str:
        return self.breaker.state if self.breaker is not None else "closed"

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, weight={self.weight})"


@dataclass(slots=True)
class UpstreamPolicy:
    """Resolved timeouts and retry settings of an upstream (route values may override)."""

    timeout: float | None = 30.0
    connect_timeout: float | None = 5.0
    read_timeout: float | None = 60.0
    retries: int = 2
    retry_statuses: frozenset[int] = frozenset({502, 503, 504})


class Upstream:
    """A named set of endpoints with its balancer, outlier detector and retry budget.

    Built with each routing table; the endpoints themselves persist across tables.
    """

    def __init__(
        self,
        name: str,
        endpoints: list[Endpoint],
        load_balance: str = "round-robin",
        policy: UpstreamPolicy | None = None,
        *,
        hash_on: str | None = None,
        health_check: Any = None,
        outlier_detection: bool = True,
        previous: Upstream | None = None,
    ) -> None:
        self.name = name
        self.endpoints = endpoints
        self.load_balance = load_balance
        self.policy = policy or UpstreamPolicy()
        self.hash_on = hash_on
        self.health_check = health_check
        self.balancer = make_balancer(load_balance, endpoints, hash_on)
        self.uses_key = load_balance == "consistent-hash"
        # The retry budget and ejections belong to the upstream, not to one table:
        # ``previous`` (the same upstream in the table being replaced) hands them on.
        self.budget = previous.budget if previous is not None else RetryBudget()
        self.outlier: OutlierDetector[Endpoint] | None = None
        if outlier_detection and len(endpoints) > 1:
            before = previous.outlier if previous is not None else None
            self.outlier = (
                before.carried_over(endpoints) if before is not None else OutlierDetector(endpoints)
            )
        # Always rebind: endpoints outlive tables, and an ejection decided by a previous
        # table's detector must not apply where this one ejects nothing.
        is_ejected = self.outlier.is_ejected if self.outlier is not None else None
        for endpoint in endpoints:
            endpoint.ejected = is_ejected

    def pick(self, exclude: Collection[Endpoint] = (), key: str | None = None) -> Endpoint:
        """The endpoint for the next attempt, avoiding ``exclude`` when another exists."""
        chosen = self.balancer.pick(key, exclude)
        if chosen is None:
            raise NoEndpoint(f"upstream {self.name!r} has no available endpoint")
        return chosen

    def record(self, endpoint: Endpoint, ok: bool) -> None:
        """Feed one attempt's result to the endpoint's breaker and the outlier detector."""
        breaker = endpoint.breaker
        if breaker is not None:
            if ok:
                breaker.record_success()
            else:
                breaker.record_failure()
        if self.outlier is not None:
            self.outlier.record(endpoint, ok)

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, {len(self.endpoints)} endpoints, {self.load_balance})"
