"""The gRPC listener: a ``grpc.aio`` server that routes every call through the gateway.

One generic handler serves every method (``grpc.GenericRpcHandler``): the call's path
``/{package.Service}/{Method}`` is matched against the gateway's routing table as a
``POST`` (CONFIG.md: "gRPC: calls on ``server.grpc_port`` are matched against the same
routes"), and the call is relayed as raw bytes to an endpoint of the route's upstream.
Every call kind (unary, server-streaming, client-streaming, bidi) is one
stream-stream relay, both directions pumped concurrently, so no generated code is
needed for any service.

Per call:

* no route → ``UNIMPLEMENTED``; a route whose upstream has no available endpoint →
  ``UNAVAILABLE``;
* the route's plugin chain runs on the metadata (as request headers): a plugin's
  answer becomes a status (401 → ``UNAUTHENTICATED``, 403 → ``PERMISSION_DENIED``, 429
  → ``RESOURCE_EXHAUSTED``, see ``gateway.grpc.status``), its message the details and
  its headers trailing metadata; headers the plugins add go upstream as metadata, and
  response hooks run on the upstream's initial metadata;
* metadata is relayed both ways (initial and trailing), minus what each hop owns
  (``gateway.grpc.metadata``);
* the client's deadline becomes the upstream call's timeout (capped by the route's
  ``timeout`` when set); a client cancellation (or its deadline) cancels the upstream
  call, an upstream failure is relayed with its code, details and trailing metadata;
* ``route.upstream.pick()`` per call (the upstream's balancer), the endpoint's breaker
  and outlier detector hear of the outcome, and the call is counted in
  ``octopus_requests_total{method="POST", status=<HTTP equivalent>, route}``.

Server reflection is not aggregated: a route for
``/grpc.reflection.v1alpha.ServerReflection/{method}`` (and/or
``/grpc.reflection.v1.ServerReflection/{method}``) to one upstream makes that
upstream's reflection service answer through the gateway, like any other method.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from gateway.extensions.chain import PluginChain
from gateway.grpc.forwarder import GrpcForwarder, forwarder_for
from gateway.grpc.metadata import (
    Metadatum,
    peer_address,
    peer_port,
    request_metadata,
    response_metadata,
    to_headers,
    to_metadata,
)
from gateway.grpc.status import grpc_code
from gateway.observability.metrics import UNMATCHED
from gateway.proxy.http import make_request_id
from gateway.routing.table import Match, NoMatch
from gateway.upstream.errors import UpstreamError
from gateway.upstream.upstream import Endpoint
from plugins.api import RequestContext, Response

log = logging.getLogger("octopus.grpc")
access_log = logging.getLogger("octopus.access")


class GrpcListenError(Exception):
    """The gRPC listener could not bind its address."""


class GatewayRpcHandler(grpc.GenericRpcHandler):
    """Routes every incoming call (see the module doc)."""

    def __init__(self, forwarder: GrpcForwarder) -> None:
        self.forwarder = forwarder
        self.gateway = forwarder.gateway

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        headers = to_headers(handler_call_details.invocation_metadata or ())
        # One read of the table per call: a swap during the call does not affect it.
        found = self.gateway.table.match("POST", method, headers, b"")

        async def relay(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(found, NoMatch):
                await self._unrouted(method, context)
            else:
                await GrpcCall(self.forwarder, found, method, context).run()

        return grpc.stream_stream_rpc_method_handler(
            relay, request_deserializer=None, response_serializer=None
        )

    async def _unrouted(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.gateway.metrics.observe_request("POST", 501, UNMATCHED, 0.0)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no route for {method}")


class GrpcCall:
    """One relayed call on the gRPC listener."""

    def __init__(
        self,
        forwarder: GrpcForwarder,
        found: Match,
        method: str,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.forwarder = forwarder
        self.gateway = forwarder.gateway
        self.found = found
        self.route = found.route
        self.method = method
        self.context = context
        #: The outcome so far, for metrics: set before every abort and at the end.
        self.code = grpc.StatusCode.UNKNOWN
        #: Whether the upstream produced the status (not the gateway failing to reach it).
        self.answered = False
        self.endpoint: Endpoint | None = None
        self.upstream_started: float | None = None
        self.request_id = ""

    async def run(self) -> None:
        started = time.perf_counter()
        with self.forwarder.tracking():
            try:
                await self._relay()
            except asyncio.CancelledError:
                # The client cancelled, or its deadline passed: grpcio cancels the task.
                if self.code == grpc.StatusCode.UNKNOWN:
                    remaining = self.context.time_remaining()
                    expired = remaining is not None and remaining <= 0
                    self.code = (
                        grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                    )
                raise
            except grpc.aio.AbortError:
                raise  # a status chosen on purpose (self.code holds it)
            except Exception:
                # Never a traceback or an internal detail to the client (DESIGN.md §2.7).
                log.exception("gRPC relay failed", extra={"request_id": self.request_id})
                await self._abort(grpc.StatusCode.INTERNAL, "internal gateway error")
            finally:
                status = self.forwarder.settle(
                    self.route,
                    self.endpoint,
                    self.code,
                    answered=self.answered,
                    started=started,
                    upstream_started=self.upstream_started,
                )
                if self.forwarder.access_log:
                    self._log_access(status, started)

    def _log_access(self, status: int, started: float) -> None:
        """The same access record an HTTP request gets, plus the gRPC status."""
        access_log.info(
            "request",
            extra={
                "request_id": self.request_id,
                "method": "POST",
                "path": self.method,
                "status": status,
                "grpc_status": self.code.name,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "route": self.route.path,
                "upstream": self.route.upstream_name,
                "client": peer_address(self.context.peer()),
            },
        )

    async def _abort(
        self, code: grpc.StatusCode, details: str, trailing: Sequence[Metadatum] = ()
    ) -> NoReturn:
        self.code = code
        await self.context.abort(code, details, trailing_metadata=tuple(trailing))
        raise AssertionError("context.abort returned")  # pragma: no cover - it raises

    async def _relay(self) -> None:
        context = self.context
        route = self.route
        headers = to_headers(context.invocation_metadata() or ())
        request_id = self.request_id = make_request_id(headers)
        peer = context.peer()
        client_ip = peer_address(peer)
        upstream = route.upstream
        if upstream is None:
            await self._abort(
                grpc.StatusCode.UNAVAILABLE, f"upstream {route.upstream_name!r} is not available"
            )
        chain = self.forwarder.chain_for(route.plugins)
        ctx: RequestContext | None = None
        if chain is not None:
            ctx = self._plugin_context(headers, client_ip, peer, request_id)
            answer = await chain.run_request(ctx)
            if answer is not None:
                await self._plugin_answer(answer)
            headers = ctx.request_headers
        try:
            endpoint = self.forwarder.pick(upstream)
        except UpstreamError as exc:
            await self._abort(grpc.StatusCode.UNAVAILABLE, exc.public_message)
        self.endpoint = endpoint
        outgoing = request_metadata(
            headers,
            client_ip=client_ip,
            request_id=request_id,
            trusted=self.gateway.trusted_proxies.trusts(client_ip),
        )
        timeout = self.forwarder.timeout_for(route, context.time_remaining())
        self.upstream_started = time.perf_counter()
        endpoint.in_flight += 1
        try:
            # strip_prefix/rewrite apply as for HTTP (e.g. renaming a package upstream).
            target = (
                route.forward_path(self.method, self.found.params)
                if route.transforms_path
                else self.method
            )
            call = self.forwarder.open_call(route, endpoint, target, outgoing, timeout)
            await self._pump(call, chain, ctx)
        finally:
            endpoint.in_flight -= 1

    def _plugin_context(
        self, headers: list[tuple[bytes, bytes]], client_ip: str, peer: str, request_id: str
    ) -> RequestContext:
        """A RequestContext as for an HTTP request (``GatewayApp._context``), with a scope
        shaped like an ASGI ``http`` one for plugins that read it."""
        route = self.route
        scope = {
            "type": "http",
            "http_version": "2",
            "method": "POST",
            "scheme": "https" if self.gateway.settings.tls.enabled else "http",
            "path": self.method,
            "raw_path": self.method.encode("latin-1"),
            "root_path": "",
            "query_string": b"",
            "headers": list(headers),
            "client": (client_ip, peer_port(peer)) if client_ip else None,
            "extensions": {"grpc": {}},
        }
        return RequestContext(
            scope=scope,
            method="POST",
            path=self.method,
            query_string=b"",
            request_headers=list(headers),
            client_ip=client_ip,
            request_id=request_id,
            route_name=route.name,
            route_path=route.path,
            params=self.found.params,
            upstream=route.upstream_name,
            route_auth=route.auth_hints,
        )

    async def _plugin_answer(self, answer: Response) -> NoReturn:
        """A plugin answered in HTTP terms: relay it as a gRPC status, its headers
        (``www-authenticate``, ``retry-after``...) as trailing metadata."""
        trailing = to_metadata(
            (name, value)
            for name, value in answer.headers
            if name not in (b"content-type", b"content-length")
        )
        await self._abort(grpc_code(answer.status), _answer_message(answer), trailing)

    async def _pump(
        self, call: grpc.aio.StreamStreamCall, chain: PluginChain | None, ctx: RequestContext | None
    ) -> None:
        """Relay messages both ways until the upstream call ends, then its status."""
        context = self.context
        sender = asyncio.get_running_loop().create_task(self._send_requests(call))
        try:
            try:
                initial = response_metadata(await call.initial_metadata())
                if chain is not None and ctx is not None and chain.response:
                    initial = await _response_hooks(chain, ctx, initial)
                if initial:
                    await context.send_initial_metadata(initial)
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        break
                    await context.write(message)
                code = await call.code()
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                # UNAVAILABLE with no response headers: the gateway could not reach it.
                self.answered = code != grpc.StatusCode.UNAVAILABLE or bool(exc.initial_metadata())
                await self._abort(
                    code, exc.details() or "", response_metadata(exc.trailing_metadata())
                )
            self.answered = True
            trailing = response_metadata(await call.trailing_metadata())
            if code != grpc.StatusCode.OK:
                await self._abort(code, await call.details() or "", trailing)
            self.code = code
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
        finally:
            if not call.done():
                call.cancel()  # the client went away: so does the upstream call
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    async def _send_requests(self, call: grpc.aio.StreamStreamCall) -> None:
        """Client → upstream, concurrently with the responses (bidi needs both)."""
        context = self.context
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                await call.write(message)
            await call.done_writing()
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            pass  # the upstream call ended first; its status is what the client gets
        except Exception:
            log.debug("request relay stopped", exc_info=True)


async def _response_hooks(
    chain: PluginChain, ctx: RequestContext, initial: list[Metadatum]
) -> list[Metadatum]:
    """Run the plugins' ``on_response`` on the initial metadata (as a 200's headers)."""
    response = Response(200, to_headers(initial))
    for plugin in chain.response:
        try:
            await plugin.on_response(ctx, response)
        except Exception:
            log.exception("plugin failed", extra={"plugin": plugin.metadata.name})
    return to_metadata(response.headers)


def _answer_message(answer: Response) -> str:
    """The ``message`` of the gateway's JSON error body, else the status number."""
    if answer.body:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(answer.body).get("message")
            if isinstance(message, str):
                return message
    return f"refused by the gateway ({answer.status})"


def _address(host: str, port: int) -> str:
    host = host or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_listener(gateway: Any, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC listener of ``gateway`` on ``host:port`` (``0``: any free port).

    TLS (``tls.enabled``) uses ``tls.cert``/``tls.key``, and ``tls.client_ca`` when set
    requires client certificates. ``SO_REUSEPORT`` is on (grpcio's default), which is how
    several worker processes share one gRPC port. Returns the started server and the
    bound port; stop it with ``await server.stop(grace)``.

    Raises:
        GrpcListenError: the address could not be bound.
    """
    settings = gateway.settings
    limit = int(settings.server.max_body_size)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
        ]
    )
    server.add_generic_rpc_handlers((GatewayRpcHandler(forwarder_for(gateway)),))
    address = _address(host, port)
    tls = settings.tls
    try:
        if tls.enabled:
            client_ca = getattr(tls, "client_ca", None)
            credentials = grpc.ssl_server_credentials(
                [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
                root_certificates=Path(client_ca).read_bytes() if client_ca else None,
                require_client_auth=bool(client_ca),
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise GrpcListenError(f"cannot listen on {address} (gRPC): {exc}") from None
    if not bound:
        raise GrpcListenError(f"cannot listen on {address} (gRPC)")
    await server.start()
    log.info("gRPC listener started", extra={"address": _address(host, bound)})
    return server, bound
