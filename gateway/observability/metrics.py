"""Prometheus metrics with the names fixed by DESIGN.md §9.

Label values are bounded: routes are labelled by their path template, unknown methods
become ``OTHER``. Label children are cached per key so the hot path does one dict
lookup and one increment per metric.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
UNMATCHED = "unmatched"


class GatewayMetrics:
    """The gateway's metric families in their own registry (one per gateway instance)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "octopus_requests_total",
            "HTTP requests handled, by method, status and route template.",
            ["method", "status", "route"],
            registry=r,
        )
        self.duration = Histogram(
            "octopus_request_duration_seconds",
            "Time from request start to the end of the response, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "octopus_upstream_requests_total",
            "Requests sent to upstreams, by upstream and the status it answered (or error).",
            ["upstream", "status"],
            registry=r,
        )
        self.active_connections = Gauge(
            "octopus_active_connections",
            "Requests and WebSocket sessions in progress.",
            registry=r,
        )
        self.farp_services = Gauge(
            "octopus_farp_services_total",
            "FARP services currently routed.",
            registry=r,
        )
        self.farp_routes = Gauge(
            "octopus_farp_routes_total",
            "Routes generated from FARP manifests, by service and route type.",
            ["service", "type"],
            registry=r,
        )
        self.farp_schema_updates = Counter(
            "octopus_farp_schema_updates_total",
            "Schema sets accepted for a service (first sight or a changed checksum).",
            ["service"],
            registry=r,
        )
        self.farp_rejected = Counter(
            "octopus_farp_manifests_rejected_total",
            "Manifests rejected, by reason; the last good version keeps serving.",
            ["reason"],
            registry=r,
        )
        self.farp_fetch_failures = Counter(
            "octopus_farp_schema_fetch_failures_total",
            "Schema fetches that failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "octopus_circuit_breaker_state",
            "Circuit breaker state per endpoint: 0 closed, 1 half-open, 2 open.",
            ["upstream", "endpoint"],
            registry=r,
        )
        self.plugin_loaded = Gauge(
            "octopus_plugin_loaded",
            "Plugins loaded, by name and version (always 1).",
            ["plugin", "version"],
            registry=r,
        )
        self._request_children: dict[tuple[str, int, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}
        self._upstream_children: dict[tuple[str, str], Any] = {}

    def observe_request(self, method: str, status: int, route: str, seconds: float) -> None:
        if method not in KNOWN_METHODS:
            method = "OTHER"
        key = (method, status, route)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(method, str(status), route)
            self._request_children[key] = child
        child.inc()
        dkey = (method, route)
        hist = self._duration_children.get(dkey)
        if hist is None:
            hist = self.duration.labels(method, route)
            self._duration_children[dkey] = hist
        hist.observe(seconds)

    def observe_upstream(self, upstream: str, status: int | str) -> None:
        key = (upstream, str(status))
        child = self._upstream_children.get(key)
        if child is None:
            child = self.upstream_requests.labels(upstream, str(status))
            self._upstream_children[key] = child
        child.inc()

    def set_breaker(self, upstream: str, endpoint: str, state: str) -> None:
        code = {"closed": 0, "half-open": 1, "open": 2}.get(state, 0)
        self.breaker_state.labels(upstream, endpoint).set(code)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
