"""The immutable routing table and its request-time matcher.

The table is built once per configuration or discovery change (``builder.py``) and
swapped in with one assignment; a request reads the current table once and keeps it.
Matching: path first (static segments beat ``{param}`` beat ``{rest:path}``, leftmost
first), then host (exact beats ``*.suffix`` beats any), then the number of header and
query matchers, then ``priority``, then definition order. A path that matches with no
route for the method gives 405 with ``Allow``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from gateway.proxy.websocket import WebSocketOptions
from gateway.routing.template import PathTemplate, fill_template

if TYPE_CHECKING:
    from gateway.graphql.routing import GraphQLRoute
    from gateway.upstream.upstream import Upstream


DEFAULT_WEBSOCKET = WebSocketOptions()


@dataclass(frozen=True, slots=True)
class AuthHints:
    """What a service's manifest says about authenticating a route."""

    public: bool = False
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route: what it matches and how its requests are forwarded."""

    name: str
    source: str  # "static" or "farp:<service>"
    template: PathTemplate
    upstream_name: str
    upstream: Upstream | None
    methods: frozenset[str] | None = None
    host: str | None = None  # exact host, or "*.suffix"
    headers: tuple[tuple[bytes, bytes], ...] = ()  # lower-cased names
    query: tuple[tuple[str, str], ...] = ()
    priority: int = 0
    strip_prefix: str | None = None
    add_prefix: str | None = None
    rewrite: tuple[tuple[re.Pattern[str], str], ...] = ()
    timeout: float | None = None
    retries: int | None = None
    plugins: tuple[str, ...] = ()
    order: int = 0
    #: When set, the upstream path is this template filled with the matched parameters
    #: (FARP routes: the service's own path, whatever the public mount and rewrites).
    upstream_template: str | None = None
    kind: str = "http"  # http | websocket | sse | graphql
    retry_non_idempotent: bool = False
    websocket: WebSocketOptions = DEFAULT_WEBSOCKET
    #: FARP auth hints, set only when ``farp.trust_auth_hints`` is on.
    auth_hints: AuthHints | None = None
    #: GraphQL routes: the policy (and, on the combined endpoint, the stitched schema).
    graphql: GraphQLRoute | None = None

    @property
    def path(self) -> str:
        return self.template.template

    def sort_key(self) -> tuple[Any, ...]:
        """Most specific first (used with ``reverse=True``), earlier definitions win ties."""
        host_rank = 0 if self.host is None else (1 if "*" in self.host else 2)
        return (
            self.template.specificity,
            host_rank,
            len(self.headers) + len(self.query),
            self.priority,
            -self.order,
        )

    def host_matches(self, host: str) -> bool:
        if self.host is None:
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        if self.host.endswith(".*"):  # FARP subdomain strategy: "{subdomain}.<any host>"
            return host.startswith(self.host[:-1]) and len(host) > len(self.host) - 1
        return host == self.host

    @property
    def transforms_path(self) -> bool:
        return bool(self.strip_prefix or self.rewrite or self.add_prefix or self.upstream_template)

    def forward_path(self, raw_path: str, params: dict[str, str] | None = None) -> str:
        """The path sent upstream: strip_prefix, then rewrite rules, then add_prefix."""
        if self.upstream_template is not None:
            return fill_template(self.upstream_template, params or {})
        path = raw_path
        if self.strip_prefix and path.startswith(self.strip_prefix):
            rest = path[len(self.strip_prefix) :]
            path = rest if rest.startswith("/") else "/" + rest
        for pattern, replacement in self.rewrite:
            path = pattern.sub(replacement, path)
        if self.add_prefix:
            path = self.add_prefix.rstrip("/") + (path if path.startswith("/") else "/" + path)
        return path or "/"


@dataclass(frozen=True, slots=True)
class Match:
    """A successful lookup: the route and the template parameters."""

    route: Route
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class NoMatch:
    """A failed lookup; ``allow`` is non-empty when the path exists for other methods."""

    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoutingTable:
    """All routes, indexed for lookup. Never mutated after construction."""

    routes: tuple[Route, ...]
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    conflicts: tuple[dict[str, Any], ...] = ()
    version: int = 0
    _static: dict[str, tuple[Route, ...]] = field(default_factory=dict, repr=False)
    _by_first: dict[str, tuple[Route, ...]] = field(default_factory=dict, repr=False)
    _dynamic_first: tuple[Route, ...] = field(default=(), repr=False)
    _needs_host: bool = field(default=False, repr=False)

    @classmethod
    def build(
        cls,
        routes: Iterable[Route],
        upstreams: dict[str, Upstream] | None = None,
        conflicts: Sequence[dict[str, Any]] = (),
        version: int = 0,
    ) -> RoutingTable:
        ordered = tuple(sorted(routes, key=Route.sort_key, reverse=True))
        static: dict[str, list[Route]] = {}
        by_first: dict[str, list[Route]] = {}
        dynamic_first: list[Route] = []
        for route in ordered:
            template = route.template
            if template.is_static:
                static.setdefault(template.template, []).append(route)
            elif template.first_segment is not None:
                by_first.setdefault(template.first_segment, []).append(route)
            else:
                dynamic_first.append(route)
        # Each first-segment bucket also holds the templates that start with a parameter,
        # merged in specificity order, so a lookup scans one pre-sorted tuple.
        merged = {
            first: tuple(sorted(bucket + dynamic_first, key=Route.sort_key, reverse=True))
            for first, bucket in by_first.items()
        }
        return cls(
            routes=ordered,
            upstreams=dict(upstreams or {}),
            conflicts=tuple(conflicts),
            version=version,
            _static={path: tuple(bucket) for path, bucket in static.items()},
            _by_first=merged,
            _dynamic_first=tuple(dynamic_first),
            _needs_host=any(r.host is not None for r in ordered),
        )

    @classmethod
    def empty(cls) -> RoutingTable:
        return cls.build(())

    def match(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        query_string: bytes = b"",
    ) -> Match | NoMatch:
        """Find the route for a request; the hot path of every request."""
        host = _host_of(headers) if self._needs_host else ""
        allow: set[str] = set()
        candidates = self._static.get(path)
        if candidates:
            found = _first_match(candidates, method, path, host, headers, query_string, allow)
            if found is not None:
                return found
        first = path[1:].split("/", 1)[0]
        candidates = self._by_first.get(first, self._dynamic_first)
        if candidates:
            found = _first_match(candidates, method, path, host, headers, query_string, allow)
            if found is not None:
                return found
        return NoMatch(tuple(sorted(allow)))


def _first_match(
    candidates: tuple[Route, ...],
    method: str,
    path: str,
    host: str,
    headers: Sequence[tuple[bytes, bytes]],
    query_string: bytes,
    allow: set[str],
) -> Match | None:
    for route in candidates:
        params = route.template.match(path)
        if params is None:
            continue
        if route.host is not None and not route.host_matches(host):
            continue
        if route.headers and not _headers_match(route.headers, headers):
            continue
        if route.query and not _query_matches(route.query, query_string):
            continue
        if route.methods is not None and method not in route.methods:
            allow.update(route.methods)
            continue
        return Match(route, params)
    return None


def _host_of(headers: Sequence[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"host":
            host = value.decode("latin-1").lower()
            if host.startswith("["):  # [v6]:port
                return host.split("]", 1)[0] + "]"
            return host.rsplit(":", 1)[0] if ":" in host else host
    return ""


def _headers_match(
    wanted: tuple[tuple[bytes, bytes], ...], headers: Sequence[tuple[bytes, bytes]]
) -> bool:
    return all(any(n == name and v == value for n, v in headers) for name, value in wanted)


def _query_matches(wanted: tuple[tuple[str, str], ...], query_string: bytes) -> bool:
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return all(pair in pairs for pair in wanted)
