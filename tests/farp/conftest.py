"""Fixtures for the FARP battery: three real upstreams shared by a module, and gateways
started per test (each from its own discovery configuration) and stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.farp.support import RunningGateway, Upstream


@pytest.fixture(scope="module")
def upstream_servers() -> Iterator[dict[str, Upstream]]:
    servers = {name: Upstream(name).start() for name in ("alpha", "beta", "gamma")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def alpha(upstream_servers: dict[str, Upstream]) -> Upstream:
    upstream_servers["alpha"].clear()
    return upstream_servers["alpha"]


@pytest.fixture
def beta(upstream_servers: dict[str, Upstream]) -> Upstream:
    upstream_servers["beta"].clear()
    return upstream_servers["beta"]


@pytest.fixture
def gamma(upstream_servers: dict[str, Upstream]) -> Upstream:
    upstream_servers["gamma"].clear()
    return upstream_servers["gamma"]


@pytest.fixture
def start_gateway() -> Iterator[Callable[[dict[str, Any]], RunningGateway]]:
    """``start_gateway(config)``: a running gateway, stopped when the test ends."""
    started: list[RunningGateway] = []

    def start(config: dict[str, Any]) -> RunningGateway:
        gateway = RunningGateway(config).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    """An empty directory for the ``file`` discovery backend."""
    directory = tmp_path / "services"
    directory.mkdir()
    return directory
