"""Fixtures of the WebSocket tests: a real WebSocket upstream and gateways in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.gateway import GatewayServer, gateway_config, route
from tests.websocket.upstream import WsUpstream

#: ``make_gateway(path=..., upstream_url=..., sections=..., **route_options)``: a started
#: gateway with one route (``/{rest:path}`` by default) to the ``upstream`` fixture.
MakeGateway = Callable[..., GatewayServer]


@pytest.fixture
def upstream() -> Iterator[WsUpstream]:
    server = WsUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def make_gateway(upstream: WsUpstream) -> Iterator[MakeGateway]:
    """Gateways (``create_app(config)`` on uvicorn in a thread) with one route to
    ``upstream`` (or ``upstream_url``); ``sections`` are top-level config sections. All are
    stopped at teardown."""
    started: list[GatewayServer] = []

    def make(
        *,
        path: str = "/{rest:path}",
        upstream_url: str | None = None,
        sections: dict[str, Any] | None = None,
        **options: Any,
    ) -> GatewayServer:
        config = gateway_config(
            {"ws": upstream_url or upstream.url},
            [route("ws", path, "ws", **options)],
            **(sections or {}),
        )
        server = GatewayServer(config).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
