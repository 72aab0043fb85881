"""From validated manifests and their schema documents to routes (FARP.md §3).

Pure functions: the same manifests and documents always give the same routes. The
result is a list of ``FarpService``: one upstream (its endpoints are the serving
instances) and the routes that lead to it, after mount strategy, rewrite and conflict
resolution.

gRPC (FARP.md §3: "a gRPC schema, or capabilities containing grpc, makes the
service's package.Service names routable on the gRPC listener"): the names come from
the ``grpc`` schema document, in one of these forms

* ``{"services": ["echo.Echo", ...]}`` (entries may also be ``{"name": "echo.Echo"}``);
* a ``FileDescriptorSet`` in protobuf's JSON form, ``{"file": [{"package": "echo",
  "service": [{"name": "Echo", ...}]}]}``, or a single ``FileDescriptorProto``
  (``{"package": ..., "service": [...]}``);

or, for a manifest with ``grpc`` in its capabilities and no such schema, from
``route_table`` entries with ``protocol: grpc`` (``{"path": "/echo.Echo/{method}"}``).
Each name becomes the route ``/{package.Service}/{method}`` (kind ``grpc``, method
POST). gRPC paths are fixed by the protocol, so mount strategies, rewrites and
subdomains do not apply to them, and all instances of a service share them whatever
the strategy: the gRPC routes of a service get their own upstream,
``{service_name}:grpc``, whose endpoints are every serving instance at ``h2c://``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.farp.manifest import Manifest, semver_key
from gateway.routing.template import TemplateError, compile_template

log = logging.getLogger("octopus.farp")

HTTP_OPERATIONS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PARAM_NAME = re.compile(r"\{([^}/]+)\}")
_DOLLAR = re.compile(r"\$(\d+)")


@dataclass(frozen=True)
class GeneratedRoute:
    """One public route of a FARP service."""

    public_path: str  # path template clients use
    upstream_path: str | None  # template sent upstream (None: forward the public path)
    methods: frozenset[str]
    host: str | None
    kind: str  # "http" | "websocket" | "sse" | "graphql" | "grpc"
    operation_id: str | None = None
    #: The manifest's auth hints for this route (honoured only with
    #: ``farp.trust_auth_hints``): no authentication needed, and scopes required.
    public: bool = False
    scopes: tuple[str, ...] = ()


@dataclass
class FarpService:
    """A service's upstream and routes as the table builder needs them."""

    name: str
    upstream_name: str
    endpoints: list[tuple[str, int]]  # (url, weight) of serving instances
    routes: list[GeneratedRoute]
    priority: int
    version: str | None
    first_seen: float
    manifests: list[Manifest] = field(default_factory=list)
    documents: dict[str, Any] = field(default_factory=dict)  # schema type -> document
    #: "grpc": the gRPC routes of a service; its endpoints speak HTTP/2 only (h2c).
    protocol: str = "http"


def mount_prefix(manifest: Manifest) -> str:
    routing = manifest.routing
    strategy = routing.strategy
    if strategy == "instance":
        return "/" + manifest.instance_id
    if strategy == "service":
        return "/" + manifest.service_name
    if strategy == "versioned":
        return f"/{manifest.service_name}/{manifest.service_version or 'v1'}"
    if strategy == "custom":
        return "/" + (routing.base_path or "").strip("/")
    return ""


def _join(prefix: str, path: str) -> str:
    joined = "/" + "/".join(part for part in (prefix + "/" + path).split("/") if part)
    if path.endswith("/") and joined != "/":
        joined += "/"
    return joined


def _sanitise_params(path: str) -> str:
    """OpenAPI allows parameter names our templates do not (``{user-id}``)."""
    return _PARAM_NAME.sub(lambda m: "{" + re.sub(r"\W", "_", m.group(1)) + "}", path)


def _apply_rewrites(path: str, rules: Iterable[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        path = re.sub(pattern, _DOLLAR.sub(r"\\g<\1>", replacement), path)
    return path


def public_path(manifest: Manifest, path: str) -> str:
    """The public path of a service path: mount prefix, then the manifest's rewrites.

    Public so that the federated documents (``gateway.farp.federation``) place each
    operation exactly where ``routes_for_manifest`` mounted it.
    """
    return _apply_rewrites(_join(mount_prefix(manifest), path), manifest.routing.rewrite)


def operations_from_openapi(
    document: Mapping[str, Any],
) -> list[tuple[str, frozenset[str], str | None]]:
    """(path, methods, first operationId) for every path of an OpenAPI 3.0/3.1 document."""
    found = []
    paths = document.get("paths") or {}
    if not isinstance(paths, Mapping):
        return found
    for path, item in paths.items():
        if not isinstance(path, str) or not path.startswith("/") or not isinstance(item, Mapping):
            continue
        methods = frozenset(m.upper() for m in item if m in HTTP_OPERATIONS)
        if not methods:
            continue
        operation_id = next(
            (
                op.get("operationId")
                for m, op in item.items()
                if m in HTTP_OPERATIONS and isinstance(op, Mapping) and op.get("operationId")
            ),
            None,
        )
        found.append((path, methods, operation_id))
    return found


def channels_from_asyncapi(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(path, kind) for AsyncAPI channels served over WebSocket or SSE."""
    servers = document.get("servers") or {}
    servers = servers if isinstance(servers, Mapping) else {}
    protocol_of = {
        str(name): str(server.get("protocol", "")).lower()
        for name, server in servers.items()
        if isinstance(server, Mapping)
    }
    protocols = set(protocol_of.values())
    found = []
    channels = document.get("channels") or {}
    if not isinstance(channels, Mapping):
        return found
    for name, channel in channels.items():
        channel = channel if isinstance(channel, Mapping) else {}
        address = channel.get("address") or name
        if not isinstance(address, str):
            continue
        bindings = channel.get("bindings") or {}
        channel_protocols = set(bindings) if isinstance(bindings, Mapping) else set()
        # A channel listing its servers (names in 2.x, $refs in 3.0) is served only there.
        listed = channel.get("servers")
        if isinstance(listed, list) and listed:
            names = [
                entry.get("$ref", "").rsplit("/", 1)[-1] if isinstance(entry, Mapping) else entry
                for entry in listed
            ]
            channel_protocols |= {protocol_of.get(str(n), "") for n in names}
            all_protocols = channel_protocols
        else:
            all_protocols = channel_protocols | protocols
        if all_protocols & {"ws", "wss", "websocket", "websockets"}:
            found.append(("/" + address.lstrip("/"), "websocket"))
        elif all_protocols & {"sse", "http", "https"}:
            found.append(("/" + address.lstrip("/"), "sse"))
    return found


_GRPC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def grpc_service_names(document: Any) -> list[str]:
    """``package.Service`` names from a ``grpc`` schema document (forms: module doc)."""
    names: list[str] = []
    if not isinstance(document, Mapping):
        return names
    listed = document.get("services")
    if isinstance(listed, list):
        for entry in listed:
            name = entry.get("name") if isinstance(entry, Mapping) else entry
            if isinstance(name, str):
                names.append(name.strip().lstrip("."))
    files = document.get("file")
    files = files if isinstance(files, list) else [document] if "service" in document else []
    for descriptor in files:
        if not isinstance(descriptor, Mapping):
            continue
        package = descriptor.get("package")
        prefix = f"{package}." if isinstance(package, str) and package else ""
        services = descriptor.get("service")
        for service in services if isinstance(services, list) else ():
            if isinstance(service, Mapping) and isinstance(service.get("name"), str):
                names.append(prefix + service["name"])
    unique = []
    for name in names:
        if _GRPC_NAME.match(name) and name not in unique:
            unique.append(name)
        elif not _GRPC_NAME.match(name):
            log.warning("gRPC service name skipped", extra={"grpc_service": name})
    return unique


def grpc_routes_for_manifest(
    manifest: Manifest, documents: Mapping[str, Any]
) -> list[GeneratedRoute]:
    """The gRPC routes one manifest asks for (see the module doc)."""
    post = frozenset({"POST"})
    paths: list[str] = []
    if "grpc" in documents:
        paths = [f"/{name}/{{method}}" for name in grpc_service_names(documents["grpc"])]
    elif "grpc" in manifest.capabilities:
        paths = [
            _sanitise_params(str(entry["path"]))
            for entry in manifest.route_table
            if str(entry.get("protocol") or "").lower() == "grpc"
        ]
    routes = []
    for path in paths:
        try:
            compile_template(path)
        except TemplateError as exc:
            log.warning(
                "FARP route skipped",
                extra={"service": manifest.service_name, "path": path, "reason": str(exc)},
            )
            continue
        routes.append(GeneratedRoute(path, None, post, None, "grpc"))
    return routes


def routes_for_manifest(manifest: Manifest, documents: Mapping[str, Any]) -> list[GeneratedRoute]:
    """Every public route one manifest asks for."""
    hints = manifest.routing
    host = f"{(hints.subdomain or '').lower()}.*" if hints.strategy == "subdomain" else None
    own: list[tuple[str, frozenset[str], str, str | None]] = []
    declared_public: set[str] = set()
    if manifest.route_table:
        for entry in manifest.route_table:
            methods = frozenset(str(m).upper() for m in entry.get("methods") or ["GET"])
            protocol = str(entry.get("protocol") or "http").lower()
            if protocol == "grpc":
                continue  # grpc_routes_for_manifest
            kind = protocol if protocol in ("websocket", "sse", "graphql") else "http"
            own.append((entry["path"], methods, kind, entry.get("operation_id")))
            if entry.get("public") is True:
                declared_public.add(entry["path"])
    else:
        openapi = documents.get("openapi")
        if isinstance(openapi, Mapping):
            for path, methods, operation_id in operations_from_openapi(openapi):
                own.append((path, methods, "http", operation_id))
        asyncapi = documents.get("asyncapi")
        if isinstance(asyncapi, Mapping):
            for path, kind in channels_from_asyncapi(asyncapi):
                own.append((path, frozenset({"GET"}), kind, None))
        if "graphql" in documents or "graphql" in manifest.capabilities:
            path = str(manifest.endpoints.get("graphql") or "/graphql")
            own.append((path, frozenset({"GET", "POST"}), "graphql", None))
    routes = []
    for path, methods, kind, operation_id in own:
        path = _sanitise_params(path)
        public = public_path(manifest, path)
        try:
            compile_template(public)
            if hints.strip_prefix:
                compile_template(path)
        except TemplateError as exc:
            # One odd path must not cost the service (or the whole table) its routes.
            log.warning(
                "FARP route skipped",
                extra={"service": manifest.service_name, "path": public, "reason": str(exc)},
            )
            continue
        upstream = path if hints.strip_prefix else None
        is_public, scopes = _auth_hints(manifest, path, methods, path in declared_public)
        routes.append(
            GeneratedRoute(public, upstream, methods, host, kind, operation_id, is_public, scopes)
        )
    return routes


def _auth_hints(
    manifest: Manifest, path: str, methods: frozenset[str], declared_public: bool
) -> tuple[bool, tuple[str, ...]]:
    """Whether the manifest says ``path`` needs no authentication, and the scopes it needs.

    ``auth.public_routes`` globs, ``route_table[].public`` and ``access_control`` entries
    with ``allow_anonymous`` make a route public; ``auth.required_scopes`` apply to all.
    Globs match the service's own path (``/health``, ``/public/*``).
    """
    auth = manifest.auth or {}
    public = declared_public or any(
        isinstance(glob, str) and fnmatch.fnmatchcase(path, glob)
        for glob in auth.get("public_routes") or ()
    )
    for rule in auth.get("access_control") or ():
        if not isinstance(rule, Mapping) or not rule.get("allow_anonymous"):
            continue
        rule_methods = {str(m).upper() for m in rule.get("methods") or ()}
        if fnmatch.fnmatchcase(path, str(rule.get("path") or "")) and (
            not rule_methods or methods <= rule_methods
        ):
            public = True
    scopes = tuple(str(s) for s in auth.get("required_scopes") or () if isinstance(s, str))
    return public, scopes


def build_services(
    manifests: Iterable[Manifest],
    documents: Mapping[tuple[str, str], Mapping[str, Any]],
    first_seen: Mapping[tuple[str, str], float],
) -> tuple[list[FarpService], list[dict[str, Any]]]:
    """Group manifests into services, generate routes and resolve conflicts."""
    groups: dict[str, list[Manifest]] = {}
    for manifest in manifests:
        if manifest.routing.strategy == "instance":
            upstream_name = f"{manifest.service_name}@{manifest.instance_id}"
        else:
            upstream_name = manifest.service_name
        groups.setdefault(upstream_name, []).append(manifest)
    services: list[FarpService] = []
    grpc_services = _grpc_services(groups.values(), documents, first_seen)
    with_grpc = {service.name for service in grpc_services}
    for upstream_name, members in sorted(groups.items()):
        # The newest manifest describes the routes; every serving instance is an endpoint.
        members.sort(key=lambda m: (m.updated_at, m.instance_id), reverse=True)
        lead = members[0]
        docs = documents.get(lead.key, {})
        routes = routes_for_manifest(lead, docs)
        if not routes and lead.service_name in with_grpc:
            continue  # a gRPC-only service: no HTTP upstream to health-check for nothing
        endpoints = [
            (f"http://{m.instance.address}", m.instance.weight)
            for m in members
            if m.instance is not None and m.instance.address and m.serving
        ]
        services.append(
            FarpService(
                name=lead.service_name,
                upstream_name=upstream_name,
                endpoints=endpoints,
                routes=routes,
                priority=lead.routing.priority,
                version=lead.service_version,
                first_seen=min(first_seen.get(m.key, 0.0) for m in members),
                manifests=members,
                documents=dict(docs),
            )
        )
    services.extend(grpc_services)
    conflicts = resolve_conflicts(services)
    return services, conflicts


def _grpc_services(
    groups: Iterable[list[Manifest]],
    documents: Mapping[tuple[str, str], Mapping[str, Any]],
    first_seen: Mapping[tuple[str, str], float],
) -> list[FarpService]:
    """One ``{service_name}:grpc`` service per service with gRPC routes: gRPC paths
    cannot be mounted per instance, so every instance serves them, whatever the mount
    strategy, as ``h2c://`` endpoints."""
    by_name: dict[str, list[Manifest]] = {}
    for members in groups:
        for manifest in members:
            by_name.setdefault(manifest.service_name, []).append(manifest)
    services = []
    for name, members in sorted(by_name.items()):
        members.sort(key=lambda m: (m.updated_at, m.instance_id), reverse=True)
        lead = members[0]
        docs = documents.get(lead.key, {})
        routes = grpc_routes_for_manifest(lead, docs)
        if not routes:
            continue
        services.append(
            FarpService(
                name=name,
                upstream_name=f"{name}:grpc",
                endpoints=[
                    (f"h2c://{m.instance.address}", m.instance.weight)
                    for m in members
                    if m.instance is not None and m.instance.address and m.serving
                ],
                routes=routes,
                priority=lead.routing.priority,
                version=lead.service_version,
                first_seen=min(first_seen.get(m.key, 0.0) for m in members),
                manifests=members,
                documents={"grpc": docs["grpc"]} if "grpc" in docs else {},
                protocol="grpc",
            )
        )
    return services


def _route_key(route: GeneratedRoute) -> tuple[str, str | None]:
    return (_PARAM_NAME.sub("{}", route.public_path), route.host)


def _precedence(service: FarpService) -> tuple[Any, ...]:
    """Sort key: higher priority, then higher semver, then earlier registration first."""
    return (-service.priority, tuple(-x for x in semver_key(service.version)), service.first_seen)


def resolve_conflicts(services: list[FarpService]) -> list[dict[str, Any]]:
    """Give each (method, path, host) to one service: priority, then semver, then first.

    Losing methods are removed from the loser's route (the route goes when none remain).
    Returns the conflicts for logs and the admin API.
    """
    claims: dict[tuple[str, str, str | None], list[FarpService]] = {}
    for service in services:
        for route in service.routes:
            path, host = _route_key(route)
            for method in route.methods:
                claims.setdefault((method, path, host), []).append(service)
    conflicts = []
    losing: dict[int, set[tuple[str, str, str | None]]] = {}
    # Host is None for "any host": sort it as "" (None and str do not compare).
    ordered = sorted(claims.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or ""))
    for (method, path, host), claimants in ordered:
        unique = list({id(s): s for s in claimants}.values())
        if len(unique) < 2:
            continue
        ranked = sorted(
            unique,
            key=lambda s: (-s.priority, tuple(-x for x in semver_key(s.version)), s.first_seen),
        )
        winner = ranked[0]
        runner_up = ranked[1]
        if winner.priority != runner_up.priority:
            reason = "priority"
        elif semver_key(winner.version) != semver_key(runner_up.version):
            reason = "service_version"
        else:
            reason = "first_registered"
        for loser in ranked[1:]:
            losing.setdefault(id(loser), set()).add((method, path, host))
        conflict = {
            "method": method,
            "path": path,
            "host": host,
            "winner": winner.upstream_name,
            "losers": [s.upstream_name for s in ranked[1:]],
            "reason": reason,
        }
        log.warning("route conflict", extra={"conflict": conflict})
        conflicts.append(conflict)
    for service in services:
        lost = losing.get(id(service))
        if not lost:
            continue
        kept = []
        for route in service.routes:
            path, host = _route_key(route)
            methods = frozenset(m for m in route.methods if (m, path, host) not in lost)
            if methods:
                kept.append(dataclasses.replace(route, methods=methods))
        service.routes = kept
    return conflicts
