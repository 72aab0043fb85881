"""What the gRPC listener and gRPC-Web share: upstream channels, endpoint choice, plugin
chains, outcome accounting and the drain at shutdown.

Why grpcio's own client rather than the gateway's HTTP/2 pool: a gRPC call is more than
an HTTP/2 exchange (deadlines as ``grpc-timeout``, trailers, status codes, cancellation
as RST_STREAM, flow control per message). grpcio implements all of it and keeps one
multiplexed connection per channel, so the gateway relays raw message bytes
(no serializer) and never needs the services' generated code.

One :class:`GrpcForwarder` per ``Gateway`` (:func:`forwarder_for`): it owns a channel per
upstream endpoint. It closes them when the gateway shuts down, after in-flight calls
have had up to ``server.graceful_timeout`` to finish; the hook for that is a task
started with ``Gateway.spawn`` whose cancellation (``Gateway.shutdown`` cancels spawned
tasks and awaits them) is the shutdown signal, so the runtime needs no gRPC-specific
code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from gateway.extensions.chain import PluginChain
from gateway.grpc.status import http_status
from gateway.routing.table import Route
from gateway.upstream.errors import NoEndpoint
from gateway.upstream.upstream import Endpoint, Upstream

log = logging.getLogger("octopus.grpc")

#: Channel options: no per-message limit below the gateway's own (``max_body_size``),
#: and keepalive pings so a dead upstream connection is noticed between calls.
_KEEPALIVE = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)
ChannelKey = tuple[bool, str, int, str | None]


class ChannelCache:
    """One ``grpc.aio`` channel per upstream endpoint (address and TLS settings).

    ``h2c://`` (and ``http://``) endpoints get an insecure channel: gRPC is always
    HTTP/2, so a cleartext endpoint means HTTP/2 with prior knowledge. ``h2://`` (and
    ``https://``) get a TLS channel that verifies the upstream against the upstream's
    ``tls.ca`` (the system roots when unset).
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._channels: dict[ChannelKey, grpc.aio.Channel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def channel(self, endpoint: Endpoint, ca: str | None = None) -> grpc.aio.Channel:
        address = endpoint.address
        key: ChannelKey = (address.tls, address.host, address.port, ca if address.tls else None)
        channel = self._channels.get(key)
        if channel is None:
            options = [
                ("grpc.max_receive_message_length", self.max_message),
                ("grpc.max_send_message_length", -1),
                ("grpc.primary_user_agent", "octopus"),
                *_KEEPALIVE,
            ]
            if address.tls:
                roots = Path(ca).read_bytes() if ca else None
                credentials = grpc.ssl_channel_credentials(root_certificates=roots)
                channel = grpc.aio.secure_channel(address.address, credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(address.address, options=options)
            self._channels[key] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()


class GrpcForwarder:
    """Per-gateway gRPC forwarding state (see the module doc)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.channels = ChannelCache(int(gateway.settings.server.max_body_size))
        self.access_log = bool(gateway.settings.observability.logging.access_log)
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._chains: dict[tuple[str, ...], PluginChain | None] = {}
        self._cas: dict[str, str | None] = {}
        self._closer: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Arrange for channels to close at gateway shutdown (needs a running loop)."""
        if self._closer is None or self._closer.done():
            self._closer = self.gateway.spawn(self._close_at_shutdown(), name="grpc-channels")

    async def _close_at_shutdown(self) -> None:
        try:
            await asyncio.Event().wait()  # until Gateway.shutdown cancels this task
        except asyncio.CancelledError:
            await self.close(float(self.gateway.settings.server.graceful_timeout))
            raise

    async def close(self, grace: float = 0.0) -> None:
        """Wait up to ``grace`` seconds for in-flight calls, then close every channel."""
        if self.active and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        await self.channels.close()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Count a call as in flight for the shutdown drain."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    # -- per call --------------------------------------------------------------------

    def chain_for(self, names: tuple[str, ...]) -> PluginChain | None:
        """The route's plugin chain (global middleware first), cached; None when empty."""
        if names not in self._chains:
            plugins = self.gateway.plugins.chain_for(names)
            self._chains[names] = PluginChain(plugins) if plugins else None
        return self._chains[names]

    def upstream_ca(self, route: Route) -> str | None:
        """The CA bundle of a static upstream's ``tls.ca`` (FARP upstreams have none);
        looked up once per upstream, settings do not change while the gateway runs."""
        name = route.upstream_name
        if name not in self._cas:
            self._cas[name] = self._resolve_ca(name)
        return self._cas[name]

    def _resolve_ca(self, name: str) -> str | None:
        try:
            tls = self.gateway.settings.upstream_config(name).tls
        except KeyError:
            return None
        if tls is None:
            return None
        if not tls.verify:
            log.warning(
                "tls.verify: false is not supported for gRPC upstreams; verifying anyway",
                extra={"upstream": name},
            )
        return tls.ca

    @staticmethod
    def pick(upstream: Upstream) -> Endpoint:
        """An endpoint whose breaker admits a call (taking a half-open probe slot).

        Raises:
            NoEndpoint: none is available (all unhealthy, ejected or open).
        """
        skipped: list[Endpoint] = []
        for _ in range(len(upstream.endpoints)):
            endpoint = upstream.pick(skipped)
            breaker = endpoint.breaker
            if breaker is None or breaker.allow():
                return endpoint
            skipped.append(endpoint)
        raise NoEndpoint(f"upstream {upstream.name!r} has no available endpoint")

    def open_call(
        self,
        route: Route,
        endpoint: Endpoint,
        method: str,
        metadata: list[tuple[str, str | bytes]],
        timeout: float | None,
        requests: Any = None,
    ) -> grpc.aio.StreamStreamCall:
        """Start the upstream call: raw bytes both ways, so every call kind (unary,
        client/server streaming, bidi) is one stream-stream call on the wire."""
        ca = self.upstream_ca(route) if endpoint.address.tls else None
        channel = self.channels.channel(endpoint, ca)
        callable_ = channel.stream_stream(
            method, request_serializer=None, response_deserializer=None
        )
        return callable_(requests, timeout=timeout, metadata=metadata)

    def timeout_for(self, route: Route, remaining: float | None) -> float | None:
        """The upstream call's timeout: the client's deadline, capped by the route's
        ``timeout`` when one is set (the upstream default is meant for HTTP exchanges,
        and would cut long-lived streams)."""
        if route.timeout is not None:
            return route.timeout if remaining is None else min(remaining, route.timeout)
        return remaining

    @staticmethod
    def record_endpoint(
        route: Route,
        endpoint: Endpoint | None,
        code: grpc.StatusCode,
        *,
        answered: bool,
        upstream_started: float | None,
    ) -> None:
        """Tell the endpoint's breaker and outlier detector how the call went.

        Only ``UNAVAILABLE`` counts against an endpoint: every other status is the
        service's answer. A call the client abandoned before any verdict gives a
        half-open probe slot back instead.
        """
        if endpoint is None or route.upstream is None:
            return
        if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED) and not answered:
            if endpoint.breaker is not None:
                endpoint.breaker.release_probe()
            return
        route.upstream.record(endpoint, code != grpc.StatusCode.UNAVAILABLE)
        if answered and upstream_started is not None:
            endpoint.latency.observe((time.perf_counter() - upstream_started) * 1000.0)

    def settle(
        self,
        route: Route,
        endpoint: Endpoint | None,
        code: grpc.StatusCode,
        *,
        answered: bool,
        started: float,
        upstream_started: float | None = None,
    ) -> int:
        """Account for a finished call on the gRPC listener: endpoint state and metrics.

        Returns the HTTP status the call counts as in ``octopus_requests_total``.
        """
        self.record_endpoint(
            route, endpoint, code, answered=answered, upstream_started=upstream_started
        )
        status = http_status(code)
        metrics = self.gateway.metrics
        if endpoint is not None:
            metrics.observe_upstream(route.upstream_name, status if answered else "error")
        metrics.observe_request("POST", status, route.path, time.perf_counter() - started)
        return status


_FORWARDERS: weakref.WeakKeyDictionary[Any, GrpcForwarder] = weakref.WeakKeyDictionary()


def forwarder_for(gateway: Any) -> GrpcForwarder:
    """The gateway's forwarder, created on first use (needs a running event loop)."""
    forwarder = _FORWARDERS.get(gateway)
    if forwarder is None:
        forwarder = _FORWARDERS[gateway] = GrpcForwarder(gateway)
    forwarder.ensure_started()
    return forwarder
