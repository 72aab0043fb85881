"""FARP-published gRPC services: route generation from the accepted schema forms, and a
published service reached through the gRPC listener."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from gateway.farp.manifest import parse_manifest
from gateway.farp.publish import inline_schema, make_manifest
from gateway.farp.routes import build_services, grpc_service_names
from tests.grpc.conftest import StartGateway, StartUpstream
from tests.grpc.support import DEADLINE, eventually
from tests.grpc.test_grpc_proxy import StubFor

DESCRIPTOR_SET = {
    "file": [
        {
            "name": "echo.proto",
            "package": "echo",
            "messageType": [{"name": "Message"}],
            "service": [{"name": "Echo", "method": [{"name": "Unary"}]}],
        },
        {"name": "health.proto", "package": "grpc.health.v1", "service": [{"name": "Health"}]},
    ]
}


def test_service_names_come_from_each_accepted_schema_form() -> None:
    assert grpc_service_names({"services": ["echo.Echo", {"name": "b.B"}]}) == ["echo.Echo", "b.B"]
    assert grpc_service_names(DESCRIPTOR_SET) == ["echo.Echo", "grpc.health.v1.Health"]
    single = {"package": "echo", "service": [{"name": "Echo"}]}
    assert grpc_service_names(single) == ["echo.Echo"]
    assert grpc_service_names({"services": ["bad name", "/x"]}) == []
    assert grpc_service_names("not a document") == []


def services_for(*manifests: dict[str, Any]) -> dict[str, Any]:
    parsed = [parse_manifest(m) for m in manifests]
    documents = {
        m.key: {s.type: s.inline_schema for s in m.schemas if s.inline_schema is not None}
        for m in parsed
    }
    services, _ = build_services(parsed, documents, {m.key: 0.0 for m in parsed})
    return {service.upstream_name: service for service in services}


def test_grpc_routes_get_their_own_h2c_upstream_beside_the_http_routes() -> None:
    openapi = {"openapi": "3.1.0", "paths": {"/users": {"get": {}}}}
    schemas = [inline_schema("openapi", openapi), inline_schema("grpc", {"services": ["u.Users"]})]
    services = services_for(
        make_manifest("users", "i1", "10.0.0.1:80", schemas, routing={"strategy": "service"}),
        make_manifest("users", "i2", "10.0.0.2:80", schemas, routing={"strategy": "service"}),
    )
    assert set(services) == {"users", "users:grpc"}
    grpc_service = services["users:grpc"]
    assert grpc_service.protocol == "grpc"
    assert sorted(url for url, _ in grpc_service.endpoints) == [
        "h2c://10.0.0.1:80",
        "h2c://10.0.0.2:80",
    ]
    [route] = grpc_service.routes
    assert (route.public_path, route.kind, route.methods) == ("/u.Users/{method}", "grpc", {"POST"})
    assert [r.public_path for r in services["users"].routes] == ["/users/users"]


def test_a_grpc_capability_takes_its_paths_from_the_route_table() -> None:
    manifest = make_manifest(
        "echo",
        "i1",
        "10.0.0.1:50051",
        capabilities=["grpc"],
        route_table=[{"path": "/echo.Echo/{method}", "protocol": "grpc"}],
    )
    services = services_for(manifest)
    assert list(services) == ["echo:grpc"]  # a gRPC-only service gets no HTTP upstream
    assert [r.public_path for r in services["echo:grpc"].routes] == ["/echo.Echo/{method}"]


async def test_a_farp_published_grpc_service_is_routed_to_every_instance(
    start_gateway: StartGateway, start_upstream: StartUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    first, second = await start_upstream("a"), await start_upstream("b")
    schema = inline_schema("grpc", DESCRIPTOR_SET)
    manifests = [
        make_manifest("echo-svc", name, upstream.address, [schema], capabilities=["grpc"])
        for name, upstream in (("i1", first), ("i2", second))
    ]
    config = {
        "server": {"host": "127.0.0.1"},
        "farp": {"enabled": True, "watch_interval": "100ms"},
        "discovery": {"backend": "static", "static": {"manifests": manifests}},
        "observability": {"logging": {"access_log": False}},
    }
    gateway = await start_gateway(config)

    def grpc_route() -> Any:
        table = gateway.gateway.table
        return next((r for r in table.routes if r.path == "/echo.Echo/{method}"), None)

    route = await eventually(grpc_route)
    assert (route.kind, route.upstream_name) == ("grpc", "echo-svc:grpc")
    upstream = gateway.gateway.table.upstreams["echo-svc:grpc"]
    assert upstream.health_check.type == "tcp"  # an HTTP/1.1 probe cannot reach gRPC
    stub = stub_for(gateway.channel())
    servers = []
    for _ in range(4):
        call = stub.Unary(pb.Message(text="farp", number=1), timeout=DEADLINE)
        assert (await call).number == 2
        servers.append(dict(await call.initial_metadata())["x-server"])
    assert sorted(servers) == ["a", "a", "b", "b"]
