"""GraphQL routes at table-build time: policies attached, the combined endpoint added.

Called by the routing table builder once per table, so that requests find everything
compiled on their route (DESIGN §2.2: nothing per request). Three kinds of routes get a
``GraphQLRoute``:

- static routes with a ``graphql:`` key (the key is what makes them GraphQL routes);
  unset limits come from the top-level ``graphql:`` section;
- FARP routes of kind ``graphql`` (``endpoints.graphql``), with the top-level defaults;
- the combined endpoint (``graphql.combined_path``, default ``/graphql``) when at least
  two FARP services publish GraphQL schemas, ``graphql.stitching`` is on and no other
  route claims that path. Root-strategy services all mount ``/graphql``; their own
  routes there are replaced by the combined one, which serves all of them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.graphql.policy import GraphQLPolicy
from gateway.graphql.stitch import ServiceInput, StitchedSchema, StitchedService, merge_schemas
from gateway.routing.table import Route
from gateway.routing.template import compile_template

if TYPE_CHECKING:
    from gateway.farp.routes import FarpService
    from gateway.upstream.upstream import Upstream

__all__ = ["COMBINED_SOURCE", "GraphQLRoute", "attach_graphql", "policy_from_settings"]

log = logging.getLogger("octopus.graphql")

#: ``Route.source`` of the combined endpoint.
COMBINED_SOURCE = "graphql:combined"
_DEFAULT_POLICY = GraphQLPolicy()


@dataclass(frozen=True, slots=True)
class GraphQLRoute:
    """What a GraphQL route carries: its policy and, for the combined endpoint, the
    stitched schema."""

    policy: GraphQLPolicy
    stitched: StitchedSchema | None = None


def policy_from_settings(defaults: Any, overrides: Any = None) -> GraphQLPolicy:
    """The policy of one route: ``overrides`` (a route's ``graphql:``) over ``defaults``
    (the top-level ``graphql:``); either may be None."""
    if defaults is None:
        base = _DEFAULT_POLICY
    else:
        persisted = defaults.persisted_queries
        base = GraphQLPolicy(
            max_depth=defaults.max_depth,
            max_aliases=defaults.max_aliases,
            max_complexity=defaults.max_complexity,
            introspection=defaults.introspection,
            list_multipliers=defaults.list_multipliers,
            allow_list=frozenset(persisted.allow_list),
            allow_list_only=persisted.only,
            max_body_size=defaults.max_body_size,
        )
    if overrides is None:
        return base
    changes: dict[str, Any] = {
        name: getattr(overrides, name)
        for name in (
            "max_depth",
            "max_aliases",
            "max_complexity",
            "introspection",
            "list_multipliers",
            "max_body_size",
        )
        if getattr(overrides, name, None) is not None
    }
    persisted = getattr(overrides, "persisted_queries", None)
    if persisted is not None:
        changes["allow_list"] = frozenset(persisted.allow_list)
        changes["allow_list_only"] = persisted.only
    return dataclasses.replace(base, **changes)


def attach_graphql(
    settings: Any,
    routes: Sequence[Route],
    services: Sequence[FarpService],
    upstreams: Mapping[str, Upstream],
) -> tuple[list[Route], list[dict[str, Any]]]:
    """``routes`` with GraphQL policies attached and the combined endpoint added, and
    the GraphQL conflicts (root fields, types, a claimed combined path)."""
    defaults = getattr(settings, "graphql", None)
    default_policy = policy_from_settings(defaults)
    static = {config.name: config for config in getattr(settings, "routes", ())}
    attached: list[Route] = []
    for route in routes:
        if route.source == "static":
            overrides = getattr(static.get(route.name), "graphql", None)
            if overrides is not None:
                policy = policy_from_settings(defaults, overrides)
                route = dataclasses.replace(route, kind="graphql", graphql=GraphQLRoute(policy))
        elif route.kind == "graphql" and route.graphql is None:
            route = dataclasses.replace(route, graphql=GraphQLRoute(default_policy))
        attached.append(route)
    if defaults is not None and not defaults.stitching:
        return attached, []
    path = defaults.combined_path if defaults is not None else "/graphql"
    return _add_combined(attached, services, upstreams, path, default_policy)


def _add_combined(
    routes: list[Route],
    services: Sequence[FarpService],
    upstreams: Mapping[str, Upstream],
    path: str,
    policy: GraphQLPolicy,
) -> tuple[list[Route], list[dict[str, Any]]]:
    publishing = [
        s
        for s in services
        if s.documents.get("graphql") is not None and getattr(s, "protocol", "http") != "grpc"
    ]
    if len(publishing) < 2:
        return routes, []
    own_sources = {f"farp:{s.name}" for s in publishing}

    def replaceable(route: Route) -> bool:
        return route.kind == "graphql" and route.source in own_sources

    claimant = next(
        (
            r
            for r in routes
            if r.template.match(path) is not None
            and (r.methods is None or "POST" in r.methods)
            and not replaceable(r)
        ),
        None,
    )
    if claimant is not None:
        log.warning(
            "combined GraphQL endpoint not served: its path is claimed by another route",
            extra={"path": path, "route": claimant.name},
        )
        return routes, [
            {
                "kind": "graphql",
                "method": "POST",
                "path": path,
                "host": None,
                "winner": claimant.name,
                "losers": [COMBINED_SOURCE],
                "reason": "path_claimed",
            }
        ]
    inputs = [
        ServiceInput(
            name=s.name,
            upstream_name=s.upstream_name,
            document=s.documents["graphql"],
            priority=s.priority,
            version=s.version,
            first_seen=s.first_seen,
        )
        for s in publishing
    ]
    merged = merge_schemas(inputs, path)
    if merged is None:
        return routes, []
    bound: dict[str, StitchedService] = {}
    for service in publishing:
        own_path = _graphql_path(service)
        target = Route(
            name=f"graphql:{service.upstream_name}",
            source=f"farp:{service.name}",
            template=compile_template(own_path),
            upstream_name=service.upstream_name,
            upstream=upstreams.get(service.upstream_name),
            methods=frozenset({"POST"}),
            kind="graphql",
        )
        bound[service.upstream_name] = StitchedService(
            service.name, service.upstream_name, own_path, target
        )
    combined = Route(
        name=COMBINED_SOURCE,
        source=COMBINED_SOURCE,
        template=compile_template(path),
        upstream_name="graphql",
        upstream=None,
        methods=frozenset({"GET", "HEAD", "POST"}),
        order=max((r.order for r in routes), default=-1) + 1,
        kind="graphql",
        graphql=GraphQLRoute(policy, StitchedSchema(merged, bound)),
    )
    kept = [r for r in routes if not (replaceable(r) and r.template.match(path) is not None)]
    return [*kept, combined], list(merged.conflicts)


def _graphql_path(service: FarpService) -> str:
    """The service's own GraphQL endpoint (``endpoints.graphql``, default ``/graphql``)."""
    for manifest in service.manifests:
        endpoint = manifest.endpoints.get("graphql")
        if isinstance(endpoint, str) and endpoint:
            if "://" in endpoint:  # a URL: its path
                endpoint = "/" + endpoint.split("://", 1)[1].partition("/")[2]
            return endpoint if endpoint.startswith("/") else "/" + endpoint
    return "/graphql"
