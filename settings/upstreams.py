"""Upstream sections: ``upstreams.NAME`` and the ``routing`` defaults they inherit.

Each upstream may set any tuning key; a key left unset (``None``) inherits the
value from ``routing:``.  The gateway should not redo that merge everywhere, so
:class:`ResolvedUpstream` is the merged, fully concrete view.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from settings.fields import ConfigModel, Duration, Int, NonNegativeInt, PositiveInt, Ratio

__all__ = [
    "LOAD_BALANCERS",
    "CircuitBreakerSettings",
    "EndpointSettings",
    "HealthCheckSettings",
    "LoadBalance",
    "ResolvedUpstream",
    "RoutingDefaults",
    "UpstreamSettings",
    "UpstreamTLSSettings",
    "UpstreamTuning",
]

LoadBalance = Literal["round-robin", "weighted", "least-conn", "p2c-ewma", "consistent-hash"]
LOAD_BALANCERS: tuple[str, ...] = get_args(LoadBalance)

#: Scheme → default port.  h2c is HTTP/2 cleartext with prior knowledge; h2 is over TLS.
ENDPOINT_SCHEMES: dict[str, int] = {"http": 80, "https": 443, "h2c": 80, "h2": 443}

# RFC 9110 token: what a header or cookie name may consist of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class EndpointSettings(ConfigModel):
    """One address of an upstream.

    ``url`` is kept normalised (no trailing slash); ``host``/``port`` are parsed
    once here, with the scheme's default port filled in, so pools never parse.
    """

    url: str
    weight: Int = Field(default=100, ge=0, le=100)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # ``endpoints: [http://a:1, http://b:2]`` is the common case; allow it.
        return {"url": data} if isinstance(data, str) else data

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ENDPOINT_SCHEMES:
            raise ValueError(
                f"unsupported scheme in {url!r} (use http://, https://, h2c:// or h2://)"
            )
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"invalid port in {url!r} (must be 1-65535)") from None
        if port == 0:
            raise ValueError(f"invalid port in {url!r} (must be 1-65535)")
        if not parts.hostname:
            raise ValueError(f"missing host in {url!r}")
        if parts.path not in ("", "/"):
            raise ValueError(
                f"endpoint URL {url!r} must not have a path "
                "(use the route's add_prefix or rewrite instead)"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"endpoint URL {url!r} must not have a query or fragment")
        if parts.username is not None:
            raise ValueError(f"endpoint URL {url!r} must not contain credentials")
        return f"{scheme}://{parts.netloc}"

    @property
    def scheme(self) -> str:
        """``http``, ``https``, ``h2c`` or ``h2``."""
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        """Host name or IP, without IPv6 brackets."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """Explicit port, or the scheme's default."""
        parts = urlsplit(self.url)
        return parts.port if parts.port is not None else ENDPOINT_SCHEMES[parts.scheme]

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets), as shown by the admin API."""
        host = self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def tls(self) -> bool:
        """Whether the connection is encrypted (https, h2)."""
        return self.scheme in ("https", "h2")

    @property
    def http2(self) -> bool:
        """Whether the endpoint speaks HTTP/2 (h2c, h2)."""
        return self.scheme in ("h2c", "h2")


class HealthCheckSettings(ConfigModel):
    """Active health checking of each endpoint."""

    type: Literal["http", "tcp"] = "http"
    path: str = "/health"
    interval: Duration = 10.0
    timeout: Duration = 2.0
    healthy_threshold: PositiveInt = 2
    unhealthy_threshold: PositiveInt = 3

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"must start with '/' (got {path!r})")
        return path


class CircuitBreakerSettings(ConfigModel):
    """Per-endpoint breaker; ``timeout`` is how long it stays open before probing."""

    failure_threshold: PositiveInt = 5
    failure_ratio: Ratio = 0.5
    min_requests: NonNegativeInt = 20
    window: Duration = 10.0
    timeout: Duration = 60.0
    half_open_requests: PositiveInt = 1


class UpstreamTLSSettings(ConfigModel):
    """How https/h2 endpoints are verified."""

    verify: bool = True
    ca: str | None = None


class UpstreamTuning(ConfigModel):
    """Keys an upstream may set and ``routing:`` gives defaults for.

    ``None`` means "inherit from routing:" (see :class:`ResolvedUpstream`).
    """

    load_balance: LoadBalance | None = None
    hash_on: str | None = None
    timeout: Duration | None = None
    connect_timeout: Duration | None = None
    read_timeout: Duration | None = None
    retries: NonNegativeInt | None = None
    #: Upstream statuses that make an idempotent request go to another endpoint
    #: (gateway extension; default 502, 503, 504).
    retry_on_status: list[int] | None = None
    health_check: HealthCheckSettings | None = None
    circuit_breaker: CircuitBreakerSettings | None = None
    tls: UpstreamTLSSettings | None = None
    # Gateway extensions (not in the seed): pool size and keep-alive per upstream.
    max_connections: PositiveInt | None = None
    idle_timeout: Duration | None = None

    @field_validator("retry_on_status")
    @classmethod
    def _check_statuses(cls, value: list[int] | None) -> list[int] | None:
        for status in value or ():
            if not 500 <= status <= 599:
                raise ValueError(f"retry_on_status holds 5xx statuses only, not {status}")
        return value

    @field_validator("hash_on")
    @classmethod
    def _check_hash_on(cls, value: str | None) -> str | None:
        if value is None or value == "ip":
            return value
        kind, sep, name = value.partition(":")
        if sep and kind in ("header", "cookie") and _TOKEN.fullmatch(name):
            return value
        raise ValueError(f"invalid hash_on {value!r} (use ip, header:NAME or cookie:NAME)")


class UpstreamSettings(UpstreamTuning):
    """``upstreams.NAME``: endpoints plus optional tuning."""

    endpoints: list[EndpointSettings]

    @field_validator("endpoints")
    @classmethod
    def _not_empty(cls, endpoints: list[EndpointSettings]) -> list[EndpointSettings]:
        if not endpoints:
            raise ValueError("at least one endpoint is required")
        return endpoints


class RoutingDefaults(UpstreamTuning):
    """``routing:``: the values upstreams inherit; these must be concrete."""

    load_balance: LoadBalance = "round-robin"
    timeout: Duration = 30.0
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 60.0
    retries: NonNegativeInt = 2
    retry_on_status: list[int] = Field(default_factory=lambda: [502, 503, 504])
    max_connections: PositiveInt = 512
    idle_timeout: Duration = 60.0


@dataclass(frozen=True)
class ResolvedUpstream:
    """An upstream with every tuning key resolved against ``routing:``."""

    name: str
    endpoints: tuple[EndpointSettings, ...]
    load_balance: str
    hash_on: str | None
    timeout: float
    connect_timeout: float
    read_timeout: float
    retries: int
    retry_on_status: list[int]
    health_check: HealthCheckSettings | None
    circuit_breaker: CircuitBreakerSettings | None
    tls: UpstreamTLSSettings | None
    max_connections: int
    idle_timeout: float

    @classmethod
    def resolve(
        cls, name: str, upstream: UpstreamSettings, defaults: RoutingDefaults
    ) -> ResolvedUpstream:
        """Merge: the upstream's value where set, otherwise the routing default."""
        merged = {
            key: getattr(upstream, key)
            if getattr(upstream, key) is not None
            else getattr(defaults, key)
            for key in UpstreamTuning.model_fields
        }
        return cls(name=name, endpoints=tuple(upstream.endpoints), **merged)
