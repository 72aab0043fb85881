"""Fixtures for HTTP/2 upstreams: hypercorn over h2c and h2 (TLS), and gateways in front.

The upstream servers are shared by the module (they cost a thread and a loop each);
every test starts from a clean record of what they saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http2.servers import H2App, HypercornServer, make_certificates


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("h2-tls"))


@pytest.fixture(scope="module")
def h2c_server() -> Iterator[HypercornServer]:
    with HypercornServer(H2App("h2c")) as server:
        yield server


@pytest.fixture(scope="module")
def h2_server(certificates: Path) -> Iterator[HypercornServer]:
    with HypercornServer(
        H2App("h2"),
        certfile=certificates / "server.pem",
        keyfile=certificates / "server.key",
    ) as server:
        yield server


@pytest.fixture
def h2c(h2c_server: HypercornServer) -> HypercornServer:
    """The module's h2c upstream with its record cleared."""
    h2c_server.app.reset()
    return h2c_server


@pytest.fixture
def h2tls(h2_server: HypercornServer) -> HypercornServer:
    """The module's TLS (h2) upstream with its record cleared."""
    h2_server.app.reset()
    return h2_server
