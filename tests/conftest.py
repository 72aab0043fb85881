"""Fixtures every test folder shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.gateway import GatewayServer, MakeGateway


@pytest.fixture
def make_gateway() -> Iterator[MakeGateway]:
    """Start an in-process gateway (``create_app`` on uvicorn in a thread, admin under
    ``/_/``) from a config dict, for one test; stopped at teardown."""
    started: list[GatewayServer] = []

    def make(config: dict[str, Any], **options: Any) -> GatewayServer:
        server = GatewayServer(config, **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
