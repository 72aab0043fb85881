"""Fixtures for the gRPC battery: the echo service compiled once per session, upstream
servers and gateways started per test in the test's event loop, stopped at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.grpc.support import EchoUpstream, RunningGateway, compile_echo

StartUpstream = Callable[..., Awaitable[EchoUpstream]]
StartGateway = Callable[[dict[str, Any]], Awaitable[RunningGateway]]


@pytest.fixture(scope="session")
def echo(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """(echo_pb2, echo_pb2_grpc), compiled from echo.proto with grpc_tools."""
    return compile_echo(tmp_path_factory.mktemp("proto"))


@pytest.fixture
def pb(echo: tuple[ModuleType, ModuleType]) -> ModuleType:
    return echo[0]


@pytest.fixture
async def start_upstream(echo: tuple[ModuleType, ModuleType]) -> AsyncIterator[StartUpstream]:
    """``await start_upstream(name, credentials=None)``: a running Echo upstream."""
    started: list[EchoUpstream] = []

    async def start(
        name: str = "a", credentials: grpc.ServerCredentials | None = None
    ) -> EchoUpstream:
        upstream = await EchoUpstream(*echo, name).start(credentials)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def upstream(start_upstream: StartUpstream) -> EchoUpstream:
    return await start_upstream("a")


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """``await start_gateway(config)``: a gateway with its gRPC listener on a free port."""
    started: list[RunningGateway] = []

    async def start(config: dict[str, Any]) -> RunningGateway:
        gateway = RunningGateway(config)
        started.append(gateway)
        return await gateway.start()

    yield start
    for gateway in reversed(started):
        await gateway.stop()


@pytest.fixture
def stub_for(echo: tuple[ModuleType, ModuleType]) -> Callable[[grpc.aio.Channel], Any]:
    """``stub_for(channel)``: an EchoStub on a channel."""
    return echo[1].EchoStub
