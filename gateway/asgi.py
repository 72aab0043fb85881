"""The ASGI entry points: ``app`` (for ``uvicorn gateway.asgi:app``) and ``create_app``.

``app`` is created on first access from ``OCTOPUS_CONFIG`` (or the embedded default), so
importing this module costs nothing. ``create_app`` accepts a settings object, a dict
of the YAML shape, or a file path; the result also works mounted inside Starlette or
FastAPI (``Mount("/api", app=create_app(...))``): paths are matched below ``root_path``
and background work starts on the first request when no lifespan reaches it.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from random import random
from typing import Any
from urllib.parse import quote

from gateway.errors import GatewayError, error_code, send_error
from gateway.extensions.chain import PluginChain
from gateway.graphql.handler import GraphQLHandler
from gateway.grpc.content import is_grpc_web
from gateway.observability.metrics import UNMATCHED
from gateway.proxy.http import HttpProxy, ResponseAborted, make_request_id
from gateway.proxy.websocket import WebSocketSession, upstream_headers
from gateway.routing.table import NoMatch, Route
from gateway.runtime import Gateway
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream.errors import UpstreamError
from plugins.api import RequestContext

log = logging.getLogger("octopus")
access_log = logging.getLogger("octopus.access")

ADMIN_PREFIXES = ("/_/", "/_farp/")
_MISSING = object()


class GatewayApp:
    """The data-plane ASGI application."""

    def __init__(
        self, gateway: Gateway, *, serve_admin: bool = True, keep_upstream_date: bool = False
    ) -> None:
        self.gateway = gateway
        settings = gateway.settings
        #: None unless tracing is on; the request path checks only this.
        self.tracing = gateway.tracing
        self.proxy = HttpProxy(
            max_body_size=settings.server.max_body_size,
            trusted_proxies=gateway.trusted_proxies,
            tracing=gateway.tracing,
            keep_date=keep_upstream_date,
        )
        self.metrics = gateway.metrics
        self.graphql = GraphQLHandler(self.proxy, observe_upstream=self.metrics.observe_upstream)
        logs = settings.observability.logging
        self.access_log = bool(logs.access_log) and logs.access_log_sample > 0
        #: The share of requests that get an access-log line; None: every one.
        self.access_sample: float | None = (
            logs.access_log_sample if logs.access_log_sample < 1 else None
        )
        self.serve_admin = serve_admin
        self._admin: ASGIApp | None = None
        self._chains: dict[tuple[str, ...], PluginChain | None] = {}
        self._global_chain = self._chain_for(())
        # Plugins in the global middleware that take full control (``wrap``) wrap the
        # HTTP handler, outermost first.
        self._http: ASGIApp = self.handle_http
        for plugin in reversed(gateway.plugins.middleware):
            if plugin.overrides("wrap"):
                self._http = plugin.wrap(self._http)
        metrics = settings.observability.metrics
        self.metrics_path = metrics.path if metrics.enabled else None
        #: ``octopus run`` data listener only: metrics there are opt-in, and open (no admin
        #: auth), for scrapers that can reach nothing else.
        self.data_metrics_path = (
            metrics.path
            if metrics.enabled and metrics.expose_on_data_port and not serve_admin
            else None
        )

    @property
    def settings(self) -> Any:
        return self.gateway.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self.handle_websocket(scope, receive, send)
        elif kind == "lifespan":
            await self.handle_lifespan(receive, send)

    async def handle_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.startup()
                except Exception as exc:
                    log.exception("gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route a WebSocket upgrade like a GET, run the plugin chain, then proxy frames."""
        gateway = self.gateway
        if not gateway.started:
            await gateway.startup()
        path, raw_path = _route_paths(scope)
        headers = scope["headers"]
        request_id = make_request_id(headers)
        started = time.perf_counter()
        route_label = UNMATCHED
        status = 500
        tracing = self.tracing
        span = None if tracing is None else tracing.start_server_span(scope, "GET", path)
        metrics = self.metrics
        metrics.active_connections.inc()
        try:
            if gateway.draining:
                status = 503
                await _deny_websocket(scope, send, 503, "the gateway is shutting down", request_id)
                return
            found = gateway.table.match("GET", path, headers, scope.get("query_string", b""))
            if isinstance(found, NoMatch):
                status = 405 if found.allow else 404
                await _deny_websocket(scope, send, status, f"no route for {path}", request_id)
                return
            route = found.route
            route_label = route.path
            upstream = route.upstream
            if upstream is None:
                status = 503
                await _deny_websocket(scope, send, 503, "upstream not available", request_id)
                return
            chain = self._chain_for(route.plugins)
            if chain is not None:
                ctx = self._context(scope, route, found.params, path, request_id)
                answer = await chain.run_request(ctx)
                if answer is not None:
                    status = answer.status
                    await _send_websocket_answer(scope, send, answer, request_id)
                    return
                headers = ctx.request_headers
            try:
                endpoint = upstream.pick()
            except UpstreamError as exc:
                status = exc.status
                await _deny_websocket(scope, send, exc.status, exc.public_message, request_id)
                return
            if chain is not None and ctx.upstream_path is not None:
                target = ctx.upstream_path
            elif route.transforms_path:
                target = route.forward_path(raw_path.decode("latin-1"), found.params)
            else:
                target = raw_path.decode("latin-1")
            query = ctx.query_string if chain is not None else scope.get("query_string", b"")
            if query:
                target += "?" + query.decode("latin-1")
            client = scope.get("client")
            client_ip = client[0] if client else "unknown"
            upstream_span = None
            if tracing is not None:
                address = endpoint.address
                upstream_span = tracing.start_client_span(
                    "GET", route.upstream_name, address.host, address.port
                )
            forwarded = upstream_headers(
                headers,
                client_ip=client_ip,
                scheme="https" if scope.get("scheme") == "wss" else "http",
                request_id=request_id,
                trusted=gateway.trusted_proxies.trusts(client_ip),
                trace_headers=None if upstream_span is None else upstream_span.header_lines(),
            )
            session = WebSocketSession()
            gateway.websockets.add(session)
            endpoint.in_flight += 1
            try:
                status = await session.run(
                    scope, receive, send, endpoint, target, forwarded, route.websocket, request_id
                )
            finally:
                endpoint.in_flight -= 1
                gateway.websockets.discard(session)
                if upstream_span is not None:
                    upstream_span.finish(status if status < 500 else None, status)
        except Exception:
            log.exception("websocket proxy failed", extra={"request_id": request_id})
            status = 500
        finally:
            metrics.active_connections.dec()
            metrics.observe_request("GET", status, route_label, time.perf_counter() - started)
            if span is not None:
                span.finish(status, None if route_label == UNMATCHED else route_label)

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        if not gateway.started:
            await gateway.startup()
        path, raw_path = _route_paths(scope)
        if self.serve_admin and (path.startswith(ADMIN_PREFIXES) or path == self.metrics_path):
            await self._serve_admin(scope, receive, send)
            return
        if path == self.data_metrics_path:
            await self._serve_metrics(send)
            return
        started = time.perf_counter()
        method = scope["method"]
        headers = scope["headers"]
        request_id = make_request_id(headers)
        tracing = self.tracing
        span = None if tracing is None else tracing.start_server_span(scope, method, path)
        metrics = self.metrics
        metrics.active_connections.inc()
        route_label = UNMATCHED
        status = 500
        upstream_name = ""
        # Bound once a route's plugin chain runs, so ``on_error`` hooks hear of failures.
        chain: PluginChain | None = None
        ctx: RequestContext | None = None
        try:
            found = gateway.table.match(method, path, headers, scope.get("query_string", b""))
            if isinstance(found, NoMatch):
                if found.allow and method == "OPTIONS" and self._global_chain is not None:
                    # A CORS preflight for a path whose routes do not list OPTIONS: the
                    # global middleware (cors) may answer it.
                    ctx = self._context(scope, None, {}, path, request_id)
                    answer = await self._global_chain.run_request(ctx)
                    if answer is not None:
                        status = answer.status
                        await self._global_chain.send_local(ctx, answer, send)
                        return
                if found.allow:
                    status = 405
                    await send_error(
                        send,
                        405,
                        f"method {method} is not allowed for {path}",
                        request_id,
                        headers=[(b"allow", ", ".join(found.allow).encode())],
                    )
                else:
                    status = 404
                    await send_error(send, 404, f"no route for {path}", request_id)
                return
            route = found.route
            route_label = route.path
            upstream_name = route.upstream_name
            # The combined GraphQL endpoint has no upstream of its own: one per service.
            if route.upstream is None and (route.graphql is None or not route.graphql.stitched):
                status = 503
                await send_error(
                    send, 503, f"upstream {route.upstream_name!r} is not available", request_id
                )
                return
            chain = self._chain_for(route.plugins)
            if chain is not None:
                ctx = self._context(scope, route, found.params, path, request_id)
                answer = await chain.run_request(ctx)
                if answer is not None:
                    status = answer.status
                    await chain.send_local(ctx, answer, send)
                    return
                scope = dict(scope)
                scope["headers"] = ctx.request_headers
                scope["query_string"] = ctx.query_string
                send = chain.wrap_send(send, ctx)
            if chain is not None and ctx.upstream_path is not None:
                upstream_path = ctx.upstream_path.encode("latin-1")
            elif route.transforms_path:
                upstream_path = route.forward_path(raw_path.decode("latin-1"), found.params).encode(
                    "latin-1"
                )
            else:
                upstream_path = raw_path
            if route.graphql is not None:  # policy checks first (gateway.graphql)
                outcome = await self.graphql.handle(
                    scope, receive, send, route, upstream_path, request_id
                )
            elif method == "POST" and is_grpc_web(scope["headers"]):
                from gateway.grpc.web import forward_grpc_web  # grpcio only when needed

                outcome = await forward_grpc_web(
                    gateway, scope, receive, send, route, upstream_path, request_id
                )
            else:
                outcome = await self.proxy.forward(
                    scope, receive, send, route, upstream_path, request_id
                )
            status = outcome.status
            if outcome.upstream_status is not None:
                metrics.observe_upstream(upstream_name, outcome.upstream_status)
            elif outcome.endpoint is not None:
                metrics.observe_upstream(upstream_name, "error")
            if status >= 500 and outcome.upstream_status is None and chain is not None and ctx:
                # The gateway answered an error itself (no endpoint, timeout, refused...).
                await chain.run_error(ctx, GatewayError(f"gateway answered {status}", status))
        except ResponseAborted as exc:
            status = 502
            log.warning("response aborted", extra={"request_id": request_id, "reason": str(exc)})
            if chain is not None and ctx is not None:
                await chain.run_error(ctx, exc)
            raise
        except Exception as exc:
            log.exception("unexpected error", extra={"request_id": request_id})
            status = 500
            if chain is not None and ctx is not None:
                await chain.run_error(ctx, exc)
            try:
                await send_error(send, 500, "internal gateway error", request_id)
            except Exception:
                raise ResponseAborted("internal gateway error after the response started") from None
        finally:
            metrics.active_connections.dec()
            elapsed = time.perf_counter() - started
            metrics.observe_request(method, status, route_label, elapsed)
            if self.access_log and (self.access_sample is None or random() < self.access_sample):
                query = scope.get("query_string")
                extra = {
                    "request_id": request_id,
                    "method": method,
                    # With its query string; credentials in it are masked by the log filter.
                    "path": f"{path}?{query.decode('latin-1')}" if query else path,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "route": route_label,
                    "upstream": upstream_name,
                    "client": (scope.get("client") or ("",))[0],
                }
                if span is not None:
                    extra["trace_id"] = span.trace_id
                access_log.info("request", extra=extra)
            if span is not None:
                span.finish(status, None if route_label == UNMATCHED else route_label)

    def _chain_for(self, names: tuple[str, ...]) -> PluginChain | None:
        """The plugin chain for a route's plugin names (cached); None when empty."""
        chain = self._chains.get(names, _MISSING)
        if chain is _MISSING:
            plugins = self.gateway.plugins.chain_for(names)
            chain = PluginChain(plugins) if plugins else None
            self._chains[names] = chain
        return chain  # type: ignore[return-value]

    def _context(
        self,
        scope: Scope,
        route: Route | None,
        params: dict[str, str],
        path: str,
        request_id: str,
    ) -> RequestContext:
        client = scope.get("client")
        return RequestContext(
            scope=scope,
            method=scope.get("method", "GET"),
            path=path,
            query_string=scope.get("query_string", b""),
            request_headers=list(scope["headers"]),
            client_ip=client[0] if client else "",
            request_id=request_id,
            route_name=route.name if route else "",
            route_path=route.path if route else "",
            params=params,
            upstream=route.upstream_name if route else "",
            websocket=scope["type"] == "websocket",
            route_auth=route.auth_hints if route else None,
        )

    async def _serve_metrics(self, send: Send) -> None:
        """``observability.metrics.path`` on the data listener (``expose_on_data_port``)."""
        self.gateway.refresh_breaker_metrics()
        body = self.metrics.exposition()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", self.metrics.content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _serve_admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._admin is None:
            from app.admin import create_admin_app

            self._admin = create_admin_app(self.gateway)
        await self._admin(scope, receive, send)


def _route_paths(scope: Scope) -> tuple[str, bytes]:
    """The decoded path to match and the raw path to forward, both below ``root_path``.

    Dot segments are resolved (``/a/../b`` → ``/b``) so that a path cannot match one
    route and reach another resource upstream.
    """
    path: str = scope["path"]
    raw: bytes = scope.get("raw_path") or path.encode("utf-8")
    root = scope.get("root_path", "")
    if root:
        if path.startswith(root):
            path = path[len(root) :]
        root_raw = root.encode("utf-8")
        if raw.startswith(root_raw):
            raw = raw[len(root_raw) :]
    if not path:
        path = "/"
    if not raw:
        raw = b"/"
    if "/." in path or b"%2e" in raw.lower():
        normalised = posixpath.normpath(path)
        if normalised.startswith("//"):
            normalised = "/" + normalised.lstrip("/")
        if path.endswith("/") and normalised != "/":
            normalised += "/"
        if normalised != path:
            path = normalised
            raw = quote(normalised, safe="/:@!$&'()*+,;=-._~%").encode("ascii")
    return path, raw


def create_app(source: Any = None, *, serve_admin: bool = True) -> GatewayApp:
    """Build the gateway ASGI app from settings, a dict, a file path, or None (default)."""
    from settings import load_settings

    settings = load_settings(source)
    return GatewayApp(Gateway(settings), serve_admin=serve_admin)


_apps: dict[str, GatewayApp] = {}


def __getattr__(name: str) -> Any:
    """``gateway.asgi.app`` is built lazily from ``OCTOPUS_CONFIG`` on first access.

    ``granian_app`` is the same for granian, which writes no ``Date`` header of its own,
    so the upstream's passes through; uvicorn and hypercorn write theirs (``app``).
    """
    if name not in ("app", "granian_app"):
        raise AttributeError(name)
    if name not in _apps:
        from gateway.observability.logging import configure_logging
        from settings import load_settings

        settings = load_settings(os.environ.get("OCTOPUS_CONFIG") or None)
        configure_logging(settings)
        _apps[name] = GatewayApp(
            Gateway(settings), serve_admin=True, keep_upstream_date=name == "granian_app"
        )
    return _apps[name]


async def _deny_websocket(
    scope: Scope, send: Send, status: int, message: str, request_id: str
) -> None:
    from plugins.api import Response

    await _send_websocket_answer(
        scope, send, Response.error(status, error_code(status), message, request_id), request_id
    )


async def _send_websocket_answer(scope: Scope, send: Send, answer: Any, request_id: str) -> None:
    """An HTTP answer to an upgrade request (ASGI ``websocket.http.response``), or a
    close (403 to the client) from servers without that extension."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = list(answer.headers)
        if not any(name == b"x-request-id" for name, _ in headers):
            headers.append((b"x-request-id", request_id.encode()))
        await send(
            {"type": "websocket.http.response.start", "status": answer.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": answer.body})
    else:
        await send({"type": "websocket.close", "code": 1008})
