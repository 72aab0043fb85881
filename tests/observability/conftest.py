"""Fixtures for the observability tests: real upstreams, gateways in a thread (to reach
their tracer and metrics) and, for multi-worker metrics, the gateway as a process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
