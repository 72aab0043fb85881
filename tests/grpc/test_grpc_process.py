"""The gRPC listener of the real ``octopus`` process: announced, serving, and stopping
cleanly, with one worker and with several sharing the port."""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.e2e.helpers import LISTENING, START_TIMEOUT, GatewayProcess, host_port, start_gateway
from tests.grpc.support import DEADLINE, EchoUpstream
from tests.grpc.test_grpc_proxy import StubFor


def process_config(upstream: EchoUpstream) -> dict[str, Any]:
    return {
        "server": {
            "host": "127.0.0.1",
            "http_port": 0,
            "admin_port": 0,
            "grpc_port": 0,
            "graceful_timeout": "5s",
        },
        "discovery": {"backend": "static"},
        "upstreams": {"echo": {"endpoints": [{"url": f"h2c://{upstream.address}"}]}},
        "routes": [{"name": "echo", "match": {"path": "/echo.Echo/{method}"}, "upstream": "echo"}],
    }


def grpc_address(handle: GatewayProcess) -> tuple[str, int]:
    def announced(line: str) -> Any:
        found = LISTENING.match(line)
        return found if found and found["name"] == "grpc" else None

    found = handle.output_reader.wait_for(announced, START_TIMEOUT)
    assert found is not None, handle.output()
    url = found[1]["url"]
    assert url.startswith("grpc://127.0.0.1:"), url
    return host_port(url)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_octopus_process_serves_grpc_on_its_announced_port(
    upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor, workers: str
) -> None:
    handle = await asyncio.to_thread(start_gateway, process_config(upstream), "--workers", workers)
    try:
        host, port = await asyncio.to_thread(grpc_address, handle)
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            stub = stub_for(channel)
            for number in range(4):  # several calls: with 2 workers, either may take them
                reply = await stub.Unary(pb.Message(text="e2e", number=number), timeout=DEADLINE)
                assert reply.number == number + 1
        assert upstream.metadata[-1]["x-forwarded-for"] == "127.0.0.1"
        assert await asyncio.to_thread(handle.stop) == 0, handle.output()
    finally:
        await asyncio.to_thread(handle.close)
