"""Fixtures for the protocol tests: real upstream servers and gateways on 127.0.0.1,
each stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.protocols.apps import SseApp
from tests.support.gateway import GatewayServer
from tests.support.servers import ThreadedServer

#: ``serve(app)``: the app on a started ThreadedServer.
Serve = Callable[[Any], ThreadedServer]
#: ``make_gateway(config)``: a started in-process gateway.
MakeGateway = Callable[[dict[str, Any]], GatewayServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    started: list[ThreadedServer] = []

    def start(app: Any) -> ThreadedServer:
        server = ThreadedServer(app).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def sse_server() -> Iterator[tuple[SseApp, ThreadedServer]]:
    app = SseApp()
    with ThreadedServer(app) as server:
        yield app, server
