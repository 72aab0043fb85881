"""The configuration schema: the root :class:`Settings` and its smaller sections.

Upstream, route and discovery sections have their own modules; this one holds
the rest and the cross-section checks (a route naming an unknown upstream, a
duplicate route name, middleware naming no plugin) that only the root can do.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from settings.discovery import DiscoverySettings, FileDiscovery
from settings.fields import (
    ConfigModel,
    Duration,
    NonNegativeInt,
    Port,
    PositiveInt,
    Ratio,
    Size,
    located_error,
)
from settings.paths import KeyPath
from settings.redaction import redact
from settings.routes import PersistedQueriesSettings, RouteSettings
from settings.upstreams import ResolvedUpstream, RoutingDefaults, UpstreamSettings

__all__ = [
    "BUILTIN_PLUGINS",
    "MIDDLEWARE_ALIASES",
    "AdminAuthSettings",
    "AdminSettings",
    "FarpSettings",
    "GraphQLSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ObservabilitySettings",
    "PluginSettings",
    "ServerSettings",
    "Settings",
    "TLSSettings",
    "TracingSettings",
    "parse_host_port",
]

#: Discovery backends that are service registries: routes may name their services.
REGISTRY_BACKENDS = frozenset({"etcd", "consul", "kubernetes", "eureka", "dns", "redis"})

#: Plugins the gateway ships, found by name alone.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "jwt-auth",
    "api-key",
    "basic-auth",
    "rate-limit",
    "cache",
    "cors",
    "compression",
    "transform",
    "kafka-events",
    "redis-events",
    "influxdb-exporter",
    "dogstatsd-exporter",
)
#: Short names DESIGN §6 uses in ``middleware:``, and the built-in each stands for.
MIDDLEWARE_ALIASES: dict[str, str] = {
    "auth": "jwt-auth",
    "rate_limit": "rate-limit",
    "cors": "cors",
    "compression": "compression",
}

_BCRYPT = re.compile(r"\$2[aby]\$\d{2}\$[./A-Za-z0-9]{53}")


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:9090`` for IPv6; empty host means all interfaces).

    Raises:
        ValueError: if there is no port or it is out of range.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid address {value!r} (use host:port, e.g. 0.0.0.0:9090)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"invalid address {value!r} (write IPv6 hosts as [::1]:9090)")
    return (host or "0.0.0.0"), int(port_text)


class ServerSettings(ConfigModel):
    """Listeners and limits of the data plane."""

    host: str = "0.0.0.0"
    http_port: Port = 8080
    admin_port: Port = 9090
    grpc_port: Port | None = None
    #: A positive int, or ``"auto"`` (one per CPU).
    workers: int | Literal["auto"] = "auto"
    graceful_timeout: Duration = 30.0
    max_body_size: Size = 10 * 1024 * 1024
    #: IPs/CIDRs whose ``X-Forwarded-*``/``Forwarded`` values are believed.
    trusted_proxies: list[str] = Field(default_factory=list)

    @field_validator("workers", mode="plain")
    @classmethod
    def _check_workers(cls, value: Any) -> int | Literal["auto"]:
        # ``plain`` so a bad value gives one message, not one per union member.
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise ValueError(f"must be 'auto' or an integer >= 1 (got {value!r})")

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, proxies: list[str]) -> list[str]:
        bad: list[str] = []
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                bad.append(proxy)
        if bad:
            raise ValueError(f"not an IP address or CIDR: {', '.join(map(repr, bad))}")
        return proxies


class TLSSettings(ConfigModel):
    """TLS on the data listener."""

    enabled: bool = False
    cert: str | None = None
    key: str | None = None
    #: CA bundle for verifying client certificates (mutual TLS).
    client_ca: str | None = None

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled:
            missing = [
                ((name,), "required when tls.enabled is true")
                for name in ("cert", "key")
                if not getattr(self, name)
            ]
            if missing:
                raise located_error(missing)
        return self


class FarpSettings(ConfigModel):
    """How discovered FARP manifests are turned into routes."""

    enabled: bool = True
    watch_interval: Duration = 5.0
    schema_cache_ttl: Duration = 300.0
    #: Shared secret the push API (``/_farp/v1``) requires, if set.
    registration_token: str | None = None
    heartbeat_timeout: Duration = 30.0
    #: Whether auth hints in manifests may configure auth plugins.
    trust_auth_hints: bool = False


class GraphQLSettings(ConfigModel):
    """Defaults of every GraphQL route (static routes with a ``graphql:`` key, FARP
    ``endpoints.graphql`` routes) and the combined endpoint over FARP services."""

    max_depth: PositiveInt = 15
    max_aliases: NonNegativeInt = 30
    max_complexity: PositiveInt = 1000
    introspection: bool = True
    #: ``first``/``last``/``limit`` arguments multiply their field's sub-selection cost.
    list_multipliers: bool = False
    #: GraphQL request bodies are buffered to be checked; larger ones get 413.
    max_body_size: Size = 1024 * 1024
    persisted_queries: PersistedQueriesSettings = Field(
        default_factory=lambda: PersistedQueriesSettings()
    )
    #: Serve one endpoint stitching the root fields of every FARP service that
    #: publishes a GraphQL schema (when at least two do).
    stitching: bool = True
    combined_path: str = "/graphql"

    @field_validator("combined_path")
    @classmethod
    def _static_path(cls, path: str) -> str:
        if not path.startswith("/") or "{" in path or "}" in path:
            raise ValueError(f"must be a literal absolute path like /graphql (got {path!r})")
        return path


class PluginSettings(ConfigModel):
    """One plugin instance; built-ins need only ``name``."""

    name: str
    module: str | None = None
    path: str | None = None
    #: Free-form: each plugin validates its own config.
    config: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    #: When a non-auth plugin raises: ``open`` skips it, ``closed`` refuses the request
    #: with 503 (gateway extension). Auth plugins always fail closed.
    failure: Literal["open", "closed"] | None = None


class AdminAuthSettings(ConfigModel):
    """Basic auth in front of the admin API."""

    type: Literal["basic"] = "basic"
    username: str
    password_hash: str

    @field_validator("password_hash")
    @classmethod
    def _bcrypt(cls, value: str) -> str:
        if not _BCRYPT.fullmatch(value):
            # Never echo the value: it may be a plaintext password pasted by mistake.
            raise ValueError("must be a bcrypt hash ($2a$, $2b$ or $2y$ followed by cost and salt)")
        return value


class AdminSettings(ConfigModel):
    """The admin plane (``/_/...``)."""

    enabled: bool = True
    #: ``host:port``; when unset the admin listener uses ``server.host:server.admin_port``.
    address: str | None = None
    auth: AdminAuthSettings | None = None

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    def listen_address(self, server: ServerSettings) -> tuple[str, int]:
        """Where the admin listener binds: ``address`` if set, else the server's host
        with ``server.admin_port``."""
        if self.address is not None:
            return parse_host_port(self.address)
        return server.host, server.admin_port


class MetricsSettings(ConfigModel):
    """Prometheus exposition."""

    enabled: bool = True
    path: str = "/metrics"
    #: Also answer ``path`` on the data listener (``octopus run`` keeps metrics on the
    #: admin listener otherwise). Off by default: the data port faces clients.
    expose_on_data_port: bool = False

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"must start with '/' (got {path!r})")
        return path


class TracingSettings(ConfigModel):
    """OpenTelemetry tracing."""

    enabled: bool = False
    exporter: Literal["otlp", "otlp-http", "otlp-grpc", "console", "none"] = "otlp"
    endpoint: str | None = None
    sample_ratio: Ratio = 1.0
    service_name: str = "octopus"


class LoggingSettings(ConfigModel):
    """Log level and shape."""

    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True
    #: The share of requests that get an access-log line (0..1), for busy gateways.
    access_log_sample: Ratio = 1.0

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, str):
            lowered = value.strip().lower()
            return "warning" if lowered == "warn" else lowered
        return value


class ObservabilitySettings(ConfigModel):
    """Metrics, tracing and logging."""

    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)


class Settings(ConfigModel):
    """The whole configuration.

    Build it with :func:`settings.load_settings` (files, dicts, env overrides and
    line-numbered errors); constructing it directly validates too but reports
    errors the pydantic way.  Fields are declared in dependency order: a field
    validator can only see fields declared before it, and the route checks need
    ``upstreams`` and ``plugins``.
    """

    server: ServerSettings = Field(default_factory=ServerSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    # The default names its file block explicitly, as the embedded default.yaml does.
    discovery: DiscoverySettings = Field(
        default_factory=lambda: DiscoverySettings(file=FileDiscovery())
    )
    farp: FarpSettings = Field(default_factory=FarpSettings)
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    plugins: list[PluginSettings] = Field(default_factory=list)
    routes: list[RouteSettings] = Field(default_factory=list)
    routing: RoutingDefaults = Field(default_factory=RoutingDefaults)
    graphql: GraphQLSettings = Field(default_factory=GraphQLSettings)
    #: Plugin names run on every route, in this order.
    middleware: list[str] = Field(default_factory=list)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)

    _source: str = PrivateAttr(default="<dict>")

    @property
    def source(self) -> str:
        """Where this came from: a file path, ``<default>`` or ``<dict>``."""
        return self._source

    @field_validator("plugins")
    @classmethod
    def _unique_plugin_names(cls, plugins: list[PluginSettings]) -> list[PluginSettings]:
        issues = _duplicates([plugin.name for plugin in plugins], "plugin", "plugins")
        if issues:
            raise located_error(issues)
        return plugins

    @field_validator("routes")
    @classmethod
    def _check_routes(
        cls, routes: list[RouteSettings], info: ValidationInfo
    ) -> list[RouteSettings]:
        issues = _duplicates([route.name for route in routes], "route", "routes")
        upstreams: dict[str, UpstreamSettings] | None = info.data.get("upstreams")
        plugins: list[PluginSettings] | None = info.data.get("plugins")
        discovery = info.data.get("discovery")
        # With a service registry, a route may name a discovered service as its upstream
        # (instances without FARP metadata are still plain upstream endpoints).
        discovers_services = discovery is not None and any(
            name in REGISTRY_BACKENDS for name, _ in discovery.entries()
        )
        for index, route in enumerate(routes):
            # Skip a check when the section it needs failed validation itself:
            # its own errors are already reported and these would only be noise.
            if upstreams is not None and route.upstream not in upstreams and not discovers_services:
                known = ", ".join(sorted(upstreams)) or "none defined"
                issues.append(
                    (
                        (index, "upstream"),
                        f"route {route.name!r} names unknown upstream {route.upstream!r} "
                        f"(known: {known})",
                    )
                )
            if plugins is not None:
                names = {plugin.name for plugin in plugins}
                for position, name in enumerate(route.plugins):
                    if name not in names:
                        issues.append(
                            (
                                (index, "plugins", position),
                                f"route {route.name!r} names unknown plugin {name!r} "
                                "(it must be an entry of the top-level plugins list)",
                            )
                        )
        if issues:
            raise located_error(issues)
        return routes

    @field_validator("middleware")
    @classmethod
    def _check_middleware(cls, middleware: list[str], info: ValidationInfo) -> list[str]:
        plugins: list[PluginSettings] | None = info.data.get("plugins")
        if plugins is None:
            return middleware
        allowed = {plugin.name for plugin in plugins} | set(BUILTIN_PLUGINS)
        allowed |= set(MIDDLEWARE_ALIASES)
        issues: list[tuple[KeyPath, str]] = [
            (
                (index,),
                f"unknown plugin {name!r} (name a plugins entry or a built-in: "
                f"{', '.join(BUILTIN_PLUGINS)})",
            )
            for index, name in enumerate(middleware)
            if name not in allowed
        ]
        if issues:
            raise located_error(issues)
        return middleware

    def upstream_config(self, name: str) -> ResolvedUpstream:
        """Upstream ``name`` with every unset tuning key taken from ``routing:``.

        Raises:
            KeyError: if there is no such upstream.
        """
        return ResolvedUpstream.resolve(name, self.upstreams[name], self.routing)

    def redacted(self) -> dict[str, Any]:
        """A JSON-able dump with secrets replaced by ``***`` (for ``/_/config``)."""
        return redact(self.model_dump(mode="json"))


def _duplicates(names: list[str], what: str, section: str) -> list[tuple[KeyPath, str]]:
    """One issue per repeated name, naming both indexes (names are references)."""
    first: dict[str, int] = {}
    issues: list[tuple[KeyPath, str]] = []
    for index, name in enumerate(names):
        if name in first:
            issues.append(
                (
                    (index, "name"),
                    f"duplicate {what} name {name!r} "
                    f"({section}[{first[name]}] and {section}[{index}])",
                )
            )
        else:
            first[name] = index
    return issues
