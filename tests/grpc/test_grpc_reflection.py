"""gRPC server reflection through the gateway: a route for the reflection service sends
reflection calls to an upstream that serves it (grpcio-reflection), so tools such as
grpcurl list the proxied services without local .proto files."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from tests.grpc.conftest import StartGateway
from tests.grpc.support import DEADLINE, EchoUpstream, gateway_config

REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


async def test_reflection_lists_the_proxied_services(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: Any
) -> None:
    names = (pb.DESCRIPTOR.services_by_name["Echo"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, upstream.server)
    url = f"h2c://{upstream.address}"
    routes = [
        {"name": "echo", "match": {"path": "/echo.Echo/{method}"}, "upstream": "echo"},
        {"name": "reflection", "match": {"path": f"/{REFLECTION}/{{method}}"}, "upstream": "echo"},
    ]
    gateway = await start_gateway(gateway_config({"echo": [url]}, routes))
    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel())

    async def ask() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    answers = [answer async for answer in stub.ServerReflectionInfo(ask(), timeout=DEADLINE)]
    listed = {service.name for service in answers[0].list_services_response.service}
    assert "echo.Echo" in listed


async def test_without_a_route_reflection_is_unimplemented(
    start_gateway: StartGateway, upstream: EchoUpstream
) -> None:
    gateway = await start_gateway(gateway_config({"echo": [f"h2c://{upstream.address}"]}))
    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel())

    async def ask() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    call = stub.ServerReflectionInfo(ask(), timeout=DEADLINE)
    try:
        [answer async for answer in call]
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    else:
        raise AssertionError("reflection without a route must be UNIMPLEMENTED")
