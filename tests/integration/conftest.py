"""Fixtures for the integration battery: real upstreams and real gateways on 127.0.0.1.

Servers cost ~0.2 s to stop, so each test module shares one upstream (and usually one
gateway, a module fixture of its own) and every test starts from a clean upstream
record; tests that need their own configuration use ``make_gateway``/``make_upstream``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.upstream import MakeUpstream, UpstreamApp, UpstreamServer


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
def make_upstream() -> Iterator[MakeUpstream]:
    """Start an extra upstream for one test; stopped at teardown."""
    started: list[UpstreamServer] = []

    def make(name: str = "extra", **options: Any) -> UpstreamServer:
        server = UpstreamServer(name, **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
