"""Octopus configuration: schema, loading and validation.

Everything the rest of the gateway needs is importable from here::

    from settings import Settings, load_settings, ConfigError, DEFAULT_CONFIG_YAML

    settings = load_settings("config.yaml")        # or None, a dict, a Settings
    settings.server.http_port                      # ints, float seconds, int bytes
    settings.upstream_config("users").timeout      # tuning merged with routing:

Submodules are implementation detail except where re-exported below.
"""

from settings.discovery import (
    DISCOVERY_BACKENDS,
    ConsulDiscovery,
    DiscoveryBackendEntry,
    DiscoverySettings,
    DnsDiscovery,
    EtcdDiscovery,
    EurekaDiscovery,
    FileDiscovery,
    KubernetesDiscovery,
    RedisDiscovery,
    StaticDiscovery,
)
from settings.errors import ConfigError
from settings.loader import DEFAULT_CONFIG_YAML, load_settings
from settings.models import (
    BUILTIN_PLUGINS,
    MIDDLEWARE_ALIASES,
    AdminAuthSettings,
    AdminSettings,
    FarpSettings,
    LoggingSettings,
    MetricsSettings,
    ObservabilitySettings,
    PluginSettings,
    ServerSettings,
    Settings,
    TLSSettings,
    TracingSettings,
)
from settings.routes import HTTP_METHODS, MatchSettings, RewriteRule, RouteSettings
from settings.units import parse_duration, parse_size
from settings.unsupported import unsupported_features
from settings.upstreams import (
    LOAD_BALANCERS,
    CircuitBreakerSettings,
    EndpointSettings,
    HealthCheckSettings,
    ResolvedUpstream,
    RoutingDefaults,
    UpstreamSettings,
    UpstreamTLSSettings,
)

__all__ = [
    "BUILTIN_PLUGINS",
    "DEFAULT_CONFIG_YAML",
    "DISCOVERY_BACKENDS",
    "HTTP_METHODS",
    "LOAD_BALANCERS",
    "MIDDLEWARE_ALIASES",
    "AdminAuthSettings",
    "AdminSettings",
    "CircuitBreakerSettings",
    "ConfigError",
    "ConsulDiscovery",
    "DiscoveryBackendEntry",
    "DiscoverySettings",
    "DnsDiscovery",
    "EndpointSettings",
    "EtcdDiscovery",
    "EurekaDiscovery",
    "FarpSettings",
    "FileDiscovery",
    "HealthCheckSettings",
    "KubernetesDiscovery",
    "LoggingSettings",
    "MatchSettings",
    "MetricsSettings",
    "ObservabilitySettings",
    "PluginSettings",
    "RedisDiscovery",
    "ResolvedUpstream",
    "RewriteRule",
    "RouteSettings",
    "RoutingDefaults",
    "ServerSettings",
    "Settings",
    "StaticDiscovery",
    "TLSSettings",
    "TracingSettings",
    "UpstreamSettings",
    "UpstreamTLSSettings",
    "load_settings",
    "parse_duration",
    "parse_size",
    "unsupported_features",
]
