"""The admin plane: health, readiness, routes, services, config and metrics.

Served on the admin listener, or under ``/_/`` on the data port when the gateway runs
as a plain ASGI app. Not on the hot path, so Starlette keeps it short. When
``admin.auth`` is configured every endpoint except liveness and readiness (which
orchestrators probe without credentials) requires HTTP basic auth; the FARP push API
(``/_farp/``, see ``app.farp_push``) also accepts ``farp.registration_token``, because
the services that register should not hold the operators' admin password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from typing import Any

import bcrypt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.dashboard import dashboard_routes
from app.docs import docs_routes
from app.farp_push import (
    PushTokenGuard,
    is_push_path,
    push_routes,
    registration_token_matches,
    unauthorized,
)
from gateway.routing.table import Route as TableRoute
from gateway.runtime import Gateway

log = logging.getLogger("octopus.admin")

OPEN_PATHS = frozenset({"/_/health", "/_/ready"})


def route_view(route: TableRoute) -> dict[str, Any]:
    """A route as the admin API and ``octopus routes --json`` show it."""
    return {
        "name": route.name,
        "source": route.source,
        "methods": sorted(route.methods) if route.methods else [],
        "host": route.host,
        "path": route.path,
        "upstream": route.upstream_name,
        "priority": route.priority,
    }


def routes_document(gateway: Gateway) -> dict[str, Any]:
    table = gateway.table
    routes = sorted(table.routes, key=lambda r: r.order)
    return {"routes": [route_view(r) for r in routes], "conflicts": list(table.conflicts)}


def services_document(gateway: Gateway) -> dict[str, Any]:
    upstreams = []
    for upstream in gateway.table.upstreams.values():
        upstreams.append(
            {
                "name": upstream.name,
                "load_balance": upstream.load_balance,
                "endpoints": [
                    {
                        "url": endpoint.url,
                        "address": endpoint.address.address,
                        "weight": endpoint.weight,
                        "healthy": endpoint.healthy,
                        "breaker": endpoint.breaker_state,
                        "in_flight": endpoint.in_flight,
                        "ewma_ms": round(endpoint.ewma_ms, 3),
                        "ejected": endpoint.is_ejected,
                    }
                    for endpoint in upstream.endpoints
                ],
            }
        )
    return {"upstreams": upstreams, "discovery": list(gateway.discovery_state)}


def plugins_document(gateway: Gateway) -> dict[str, Any]:
    """Loaded plugins, where each came from, and the routes whose chain runs it."""
    loaded = gateway.plugins
    routes = sorted(gateway.table.routes, key=lambda r: r.order)
    chains = [(route.name, loaded.chain_for(route.plugins)) for route in routes]
    return {
        "plugins": [
            {
                "name": name,
                "version": plugin.metadata.version,
                "description": plugin.metadata.description,
                "kind": plugin.metadata.kind,
                "source": loaded.sources.get(name, "builtin"),
                "middleware": plugin in loaded.middleware,
                "routes": [route for route, chain in chains if plugin in chain],
            }
            for name, plugin in loaded.by_name.items()
        ]
    }


async def purge_cache(gateway: Gateway, path: str | None) -> Response:
    """``DELETE /_/cache[?path=/x]``: drop the entries of every configured cache plugin."""
    caches: dict[tuple[str, str], Any] = {}
    for plugin in gateway.plugins.by_name.values():
        if plugin.metadata.name == "cache" and hasattr(plugin, "purge"):
            # Plugins sharing one Redis and prefix share their entries: purge once.
            caches.setdefault((plugin.config.redis_url, plugin.config.prefix), plugin)
    if not caches:
        return JSONResponse(
            {"error": "not_found", "message": "no cache plugin is configured"}, status_code=404
        )
    if path is not None and not path.startswith("/"):
        return JSONResponse(
            {"error": "bad_request", "message": "path must start with /"}, status_code=400
        )
    purged = 0
    try:
        for plugin in caches.values():
            purged += await plugin.purge(path)
    except Exception as exc:  # the cache's store (Redis) is unreachable or failing
        log.warning("cache purge failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        return JSONResponse(
            {"error": "unavailable", "message": f"cache store unavailable: {exc}"},
            status_code=503,
        )
    return JSONResponse({"purged": purged, "path": path})


class AdminAuth:
    """Basic auth against a bcrypt hash; verified credentials are remembered by digest,
    because bcrypt is deliberately slow and dashboards poll."""

    def __init__(
        self,
        app: Any,
        username: str,
        password_hash: str,
        *,
        registration_token: str | None = None,
    ) -> None:
        self.app = app
        self.username = username
        self.password_hash = password_hash.encode()
        self.registration_token = registration_token
        self._verified: set[bytes] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _admin_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self._authorised(scope):
            await self.app(scope, receive, send)
            return
        token = self.registration_token
        if token and is_push_path(scope):
            if registration_token_matches(scope, token):
                await self.app(scope, receive, send)
            else:
                await unauthorized()(scope, receive, send)
            return
        response = JSONResponse(
            {"error": "unauthorized", "message": "admin credentials required"},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="octopus-admin"'},
        )
        await response(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:6].lower() == b"basic ":
                try:
                    decoded = base64.b64decode(value[6:].strip(), validate=True)
                except (binascii.Error, ValueError):
                    return False
                user, _, password = decoded.partition(b":")
                if user.decode("utf-8", "replace") != self.username:
                    return False
                digest = hashlib.sha256(decoded).digest()
                if digest in self._verified:
                    return True
                try:
                    ok = bcrypt.checkpw(password, self.password_hash)
                except ValueError:
                    return False
                if ok:
                    self._verified.add(digest)
                return ok
        return False


def _admin_path(scope: Scope) -> str:
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path


def create_admin_app(gateway: Gateway) -> Any:
    """The admin ASGI app for ``gateway``."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if gateway.ready and not gateway.draining:
            return JSONResponse({"status": "ready", "routes": len(gateway.table.routes)})
        state = "draining" if gateway.draining else "starting"
        return JSONResponse({"status": state}, status_code=503)

    async def routes(request: Request) -> Response:
        return JSONResponse(routes_document(gateway))

    async def services(request: Request) -> Response:
        return JSONResponse(services_document(gateway))

    async def plugins(request: Request) -> Response:
        return JSONResponse(plugins_document(gateway))

    async def config(request: Request) -> Response:
        return JSONResponse(gateway.settings.redacted())

    async def metrics(request: Request) -> Response:
        if not gateway.settings.observability.metrics.enabled:
            return JSONResponse(
                {"error": "not_found", "message": "metrics are disabled"}, status_code=404
            )
        gateway.refresh_breaker_metrics()
        return Response(gateway.metrics.exposition(), media_type=gateway.metrics.content_type)

    async def cache_purge(request: Request) -> Response:
        return await purge_cache(gateway, request.query_params.get("path"))

    async def index(request: Request) -> Response:
        return JSONResponse(
            {
                "name": "octopus",
                "endpoints": [
                    "/_/health",
                    "/_/ready",
                    "/_/routes",
                    "/_/services",
                    "/_/plugins",
                    "/_/stats",
                    "/_/config",
                    "/_/openapi.json",
                    "/_/asyncapi.json",
                    "/_/docs",
                    "/_farp/v1/services",
                    metrics_path,
                ],
            }
        )

    metrics_path = gateway.settings.observability.metrics.path or "/metrics"
    routes_list = [
        Route("/_/health", health),
        Route("/_/ready", ready),
        Route("/_/routes", routes),
        Route("/_/services", services),
        Route("/_/plugins", plugins),
        Route("/_/config", config),
        Route("/_/cache", cache_purge, methods=["DELETE"]),
        Route(metrics_path, metrics),
    ]
    if metrics_path != "/metrics":
        routes_list.append(Route("/metrics", metrics))
    routes_list.extend(dashboard_routes(gateway, index))
    routes_list.extend(docs_routes(gateway))
    routes_list.extend(push_routes(gateway))
    app: Any = Starlette(routes=routes_list)
    auth = gateway.settings.admin.auth
    token = gateway.settings.farp.registration_token
    if auth is not None:
        app = AdminAuth(app, auth.username, auth.password_hash, registration_token=token)
    elif token:
        app = PushTokenGuard(app, token)
    return app
