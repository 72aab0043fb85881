"""Fixtures every test folder shares."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.helpers import GatewayProcess, start_gateway
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


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayProcess]]:
    """``start_gateway`` (the real ``octopus run`` process); every process it started is
    stopped (or killed) at teardown."""
    started: list[GatewayProcess] = []

    def start(config: Any, *extra_args: str, **options: Any) -> GatewayProcess:
        handle = start_gateway(config, *extra_args, **options)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                handle.stop(timeout=20)
        handle.close()
