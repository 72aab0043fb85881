"""Fixtures for the observability tests: real upstreams, gateways in a thread (to reach
their tracer and metrics) and, for multi-worker metrics, the gateway as a process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.gateway import GatewayServer, MakeGateway
from tests.support.upstream import UpstreamApp, UpstreamServer


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[UpstreamServer]:
    with UpstreamServer("primary") as server:
        yield server


@pytest.fixture
def upstream(upstream_server: UpstreamServer) -> UpstreamApp:
    """The module's upstream app, with its records cleared for this test."""
    upstream_server.app.reset()
    return upstream_server.app


@pytest.fixture
def make_gateway() -> Iterator[MakeGateway]:
    """Start a gateway (``create_app`` on uvicorn in a thread) for one test."""
    started: list[GatewayServer] = []

    def make(config: dict[str, Any], **options: Any) -> GatewayServer:
        server = GatewayServer(config, **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
