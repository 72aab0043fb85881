"""The pure function from configuration to a routing table.

Given the same settings (and, later, the same FARP manifests) it builds an equal table;
it never touches the network. Upstream objects are created here, their connection
endpoints (with their pools, health and breakers) come from the long-lived
``EndpointRegistry`` so a rebuild keeps warm connections and live state.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import ssl
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from gateway.farp.routes import FarpService, GeneratedRoute
from gateway.graphql.routing import attach_graphql
from gateway.proxy.websocket import WebSocketOptions
from gateway.routing.table import AuthHints, Route, RoutingTable
from gateway.routing.template import compile_template
from gateway.upstream.registry import EndpointRegistry
from gateway.upstream.upstream import EndpointAddress, Upstream, UpstreamPolicy
from settings import ConfigError

log = logging.getLogger("octopus.routing")

log = logging.getLogger("octopus.routing")

#: FARP instances are health-checked at their ``endpoints.health`` unless the
#: ``routing.health_check`` defaults say otherwise.
FARP_HEALTH_DEFAULT = SimpleNamespace(
    type="http",
    path="/health",
    interval=10.0,
    timeout=2.0,
    healthy_threshold=2,
    unhealthy_threshold=3,
)
#: The gRPC upstream of a FARP service (``{service}:grpc``, h2c endpoints): an HTTP/1.1
#: probe cannot talk to an HTTP/2-only gRPC server, so the check is a TCP connect.
FARP_GRPC_HEALTH_DEFAULT = SimpleNamespace(**{**vars(FARP_HEALTH_DEFAULT), "type": "tcp"})

_DOLLAR_GROUP = re.compile(r"\$(\d+)|\$\{(\w+)\}")


def build_table(
    settings: Any,
    endpoints: EndpointRegistry,
    version: int = 0,
    services: Sequence[FarpService] = (),
    conflicts: Sequence[dict[str, Any]] = (),
    plain_services: Mapping[str, Sequence[tuple[str, int]]] | None = None,
) -> RoutingTable:
    """Compile static ``upstreams``/``routes`` plus FARP services into a RoutingTable.

    ``plain_services`` are discovered services without FARP metadata (name → endpoint
    URLs and weights): they generate no routes, but static routes may name them.
    """
    upstreams = {name: build_upstream(settings, name, endpoints) for name in settings.upstreams}
    for name, members in sorted((plain_services or {}).items()):
        if name not in upstreams:
            upstreams[name] = build_plain_upstream(settings, name, members, endpoints)
    routes = [build_route(index, route, upstreams) for index, route in enumerate(settings.routes)]
    order = len(routes)
    for service in services:
        if service.upstream_name in upstreams:
            log.warning(
                "FARP service %r shadows a static upstream of the same name; static wins",
                service.upstream_name,
            )
        else:
            upstreams[service.upstream_name] = build_farp_upstream(settings, service, endpoints)
        for generated in service.routes:
            route = build_farp_route(order, service, generated, upstreams)
            if settings.farp.trust_auth_hints and (generated.public or generated.scopes):
                hints = AuthHints(generated.public, generated.scopes)
                route = dataclasses.replace(route, auth_hints=hints)
            routes.append(route)
            order += 1
    endpoints.retain(
        {(name, e.url) for name, upstream in upstreams.items() for e in upstream.endpoints}
    )
    endpoints.upstreams = dict(upstreams)
    routes, graphql_conflicts = attach_graphql(settings, routes, services, upstreams)
    conflicts = [*conflicts, *graphql_conflicts]
    return RoutingTable.build(routes, upstreams, conflicts=conflicts, version=version)


def _policy(resolved: Any) -> UpstreamPolicy:
    return UpstreamPolicy(
        timeout=resolved.timeout,
        connect_timeout=resolved.connect_timeout,
        read_timeout=resolved.read_timeout,
        retries=resolved.retries or 0,
        retry_statuses=frozenset(resolved.retry_on_status or ()),
    )


def _assemble(
    name: str,
    tuning: Any,
    members: Sequence[tuple[str, int]],
    registry: EndpointRegistry,
    *,
    tls: Any = None,
    health_paths: dict[str, str] | None = None,
    load_balance: str | None = None,
    health_check: Any = None,
) -> Upstream:
    """One Upstream from endpoint URLs and weights and a tuning source (a resolved upstream
    or the ``routing:`` defaults): the piece every kind of upstream is built with."""
    endpoints = [
        registry.endpoint_for(
            name,
            EndpointAddress.parse(url),
            weight,
            verify=tls.verify if tls is not None else True,
            ca=tls.ca if tls is not None else None,
            max_connections=tuning.max_connections or 512,
            idle_timeout=tuning.idle_timeout or 60.0,
            breaker=tuning.circuit_breaker,
            health_path=(health_paths or {}).get(url),
        )
        for url, weight in members
    ]
    return Upstream(
        name=name,
        endpoints=endpoints,
        load_balance=load_balance or tuning.load_balance or "round-robin",
        policy=_policy(tuning),
        hash_on=tuning.hash_on,
        health_check=health_check or tuning.health_check,
        previous=registry.upstreams.get(name),
    )


def build_farp_upstream(
    settings: Any, service: FarpService, registry: EndpointRegistry
) -> Upstream:
    """An upstream whose endpoints are the service's serving instances, tuned by the
    ``routing:`` defaults, health-checked at each instance's ``endpoints.health``."""
    defaults = settings.routing
    weighted = len({weight for _, weight in service.endpoints}) > 1
    return _assemble(
        service.upstream_name,
        defaults,
        service.endpoints,
        registry,
        health_paths={
            f"http://{m.instance.address}": m.health_path
            for m in service.manifests
            if m.instance is not None and m.instance.address
        },
        # Instance weights that differ ask for weighted balancing unless routing: says
        # which balancer to use.
        load_balance=defaults.load_balance
        if defaults.load_balance not in (None, "round-robin")
        else ("weighted" if weighted else "round-robin"),
        health_check=defaults.health_check
        or (FARP_GRPC_HEALTH_DEFAULT if service.protocol == "grpc" else FARP_HEALTH_DEFAULT),
    )


def build_plain_upstream(
    settings: Any, name: str, members: Sequence[tuple[str, int]], registry: EndpointRegistry
) -> Upstream:
    """A discovered service without FARP metadata: its instances, the routing defaults."""
    return _assemble(name, settings.routing, members, registry)


def build_farp_route(
    order: int, service: FarpService, generated: GeneratedRoute, upstreams: dict[str, Upstream]
) -> Route:
    host = f" {generated.host}" if generated.host else ""
    return Route(
        name=f"farp:{service.upstream_name}:{generated.public_path}{host}",
        source=f"farp:{service.name}",
        template=compile_template(generated.public_path),
        upstream_name=service.upstream_name,
        upstream=upstreams.get(service.upstream_name),
        methods=generated.methods | ({"HEAD"} if "GET" in generated.methods else set()),
        host=generated.host,
        priority=service.priority,
        order=order,
        upstream_template=generated.upstream_path,
        kind=generated.kind,
    )


def build_upstream(settings: Any, name: str, registry: EndpointRegistry) -> Upstream:
    try:
        return _build_upstream(settings, name, registry)
    except (OSError, ssl.SSLError) as exc:
        # A CA bundle that is missing or unreadable is a configuration error: say which key.
        ca = settings.upstream_config(name).tls
        where = f"upstreams.{name}.tls.ca" if ca is not None and ca.ca else f"upstreams.{name}"
        raise ConfigError(f"{where}: cannot load TLS settings: {exc}") from None


def _build_upstream(settings: Any, name: str, registry: EndpointRegistry) -> Upstream:
    resolved = settings.upstream_config(name)
    members = [(endpoint.url, endpoint.weight) for endpoint in resolved.endpoints]
    return _assemble(name, resolved, members, registry, tls=resolved.tls)


def build_route(
    index: int, config: Any, upstreams: dict[str, Upstream], source: str = "static"
) -> Route:
    template = compile_template(config.match.path)
    methods = None
    if config.match.methods:
        names = {m.upper() for m in config.match.methods}
        if "GET" in names:
            names.add("HEAD")  # a GET route answers HEAD, as every HTTP server does
        methods = frozenset(names)
    strip: str | None = None
    if config.strip_prefix is True:
        strip = template.literal_prefix.rstrip("/") or None
    elif isinstance(config.strip_prefix, str) and config.strip_prefix:
        strip = config.strip_prefix.rstrip("/") or None
    rewrite = tuple(
        (re.compile(rule.pattern), _python_replacement(rule.replacement)) for rule in config.rewrite
    )
    return Route(
        name=config.name,
        source=source,
        template=template,
        upstream_name=config.upstream,
        upstream=upstreams.get(config.upstream),
        methods=methods,
        host=config.match.host.lower() if config.match.host else None,
        headers=tuple(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in config.match.headers.items()
        ),
        query=tuple(config.match.query.items()),
        priority=config.priority,
        strip_prefix=strip,
        add_prefix=config.add_prefix,
        rewrite=rewrite,
        timeout=config.timeout,
        retries=config.retries,
        plugins=tuple(config.plugins),
        order=index,
        retry_non_idempotent=config.retry_non_idempotent,
        websocket=WebSocketOptions(
            idle_timeout=config.websocket.idle_timeout,
            max_message_size=config.websocket.max_message_size,
        ),
    )


def _python_replacement(replacement: str) -> str:
    """``$1``/``${name}`` (the config's spelling) → ``\\g<1>``/``\\g<name>`` for ``re.sub``."""
    escaped = replacement.replace("\\", "\\\\")
    return _DOLLAR_GROUP.sub(lambda m: f"\\g<{m.group(1) or m.group(2)}>", escaped)
