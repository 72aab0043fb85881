"""The pure function from configuration to a routing table.

Given the same settings (and, later, the same FARP manifests) it builds an equal table;
it never touches the network. Upstream objects are created here, their connection
pools come from the long-lived ``PoolRegistry`` so a rebuild keeps warm connections.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.routing.table import Route, RoutingTable
from gateway.routing.template import compile_template
from gateway.upstream.registry import PoolRegistry
from gateway.upstream.upstream import Endpoint, EndpointAddress, Upstream, UpstreamPolicy

_DOLLAR_GROUP = re.compile(r"\$(\d+)|\$\{(\w+)\}")


def build_table(settings: Any, pools: PoolRegistry, version: int = 0) -> RoutingTable:
    """Compile ``settings.upstreams`` and ``settings.routes`` into a RoutingTable."""
    upstreams = {name: build_upstream(settings, name, pools) for name in settings.upstreams}
    routes = [build_route(index, route, upstreams) for index, route in enumerate(settings.routes)]
    return RoutingTable.build(routes, upstreams, version=version)


def build_upstream(settings: Any, name: str, pools: PoolRegistry) -> Upstream:
    resolved = settings.upstream_config(name)
    tls = resolved.tls
    endpoints = []
    for endpoint in resolved.endpoints:
        address = EndpointAddress.parse(endpoint.url)
        pool = pools.pool_for(
            address,
            verify=tls.verify if tls is not None else True,
            ca=tls.ca if tls is not None else None,
            max_connections=resolved.max_connections or 512,
            idle_timeout=resolved.idle_timeout or 60.0,
        )
        endpoints.append(Endpoint(address=address, weight=endpoint.weight, pool=pool))
    policy = UpstreamPolicy(
        timeout=resolved.timeout,
        connect_timeout=resolved.connect_timeout,
        read_timeout=resolved.read_timeout,
        retries=resolved.retries or 0,
    )
    return Upstream(
        name=name,
        endpoints=endpoints,
        load_balance=resolved.load_balance or "round-robin",
        policy=policy,
    )


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
    )


def _python_replacement(replacement: str) -> str:
    """``$1``/``${name}`` (the config's spelling) → ``\\g<1>``/``\\g<name>`` for ``re.sub``."""
    escaped = replacement.replace("\\", "\\\\")
    return _DOLLAR_GROUP.sub(lambda m: f"\\g<{m.group(1) or m.group(2)}>", escaped)
