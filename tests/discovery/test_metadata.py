"""``resolve_manifest``: from ``farp.*`` discovery metadata to a manifest (FARP.md §5),
against a real HTTP server playing the instance."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from gateway.discovery.base import DiscoveredInstance
from gateway.discovery.metadata import parse_capabilities, resolve_manifest
from gateway.farp.manifest import parse_manifest
from gateway.farp.schemas import SchemaFetcher
from gateway.types import Receive, Scope, Send
from tests.discovery.support import manifest, openapi
from tests.support.servers import ThreadedServer

ASYNCAPI = {
    "asyncapi": "3.0.0",
    "info": {"title": "events", "version": "1.0.0"},
    "channels": {"ticks": {"address": "/ticks"}},
}


class Instance:
    """An ASGI app serving documents by path; ``hits`` counts requests per path."""

    def __init__(self) -> None:
        self.documents: dict[str, tuple[int, bytes]] = {}
        self.hits: dict[str, int] = {}

    def serve(self, path: str, document: Any, status: int = 200, *, as_yaml: bool = False) -> None:
        body = yaml.safe_dump(document).encode() if as_yaml else json.dumps(document).encode()
        self.documents[path] = (status, body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.hits[scope["path"]] = self.hits.get(scope["path"], 0) + 1
        status, body = self.documents.get(scope["path"], (404, b"not found"))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Instance, str]]:
    app = Instance()
    server = ThreadedServer(app, lifespan="off").start()
    yield app, f"127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def site(served: tuple[Instance, str]) -> tuple[Instance, str]:
    app, address = served
    app.documents.clear()
    app.hits.clear()
    return app, address


def discovered(address: str | None, **metadata: str) -> DiscoveredInstance:
    return DiscoveredInstance(
        key=f"dns:_shop._tcp.example.test./{address}",
        manifest=None,
        address=address,
        service_name="shop",
        instance_id=f"shop.example.test:{(address or ':0').rsplit(':', 1)[1]}",
        metadata=metadata,
    )


async def resolve(instance: DiscoveredInstance) -> dict[str, Any] | None:
    async with httpx.AsyncClient() as client:
        return await resolve_manifest(instance, client, timeout=2.0)


async def test_instances_without_farp_enabled_get_no_manifest(site: tuple[Instance, str]) -> None:
    app, address = site
    app.serve("/_farp/manifest", manifest("shop", address, "/users"))
    assert await resolve(discovered(address)) is None
    assert await resolve(discovered(address, **{"farp.enabled": "false"})) is None
    assert await resolve(discovered(address, **{"farp.manifest": "/_farp/manifest"})) is None
    assert app.hits == {}  # not even asked


async def test_the_manifest_url_relative_or_absolute(site: tuple[Instance, str]) -> None:
    app, address = site
    document = manifest("shop", address, "/users")
    app.serve("/meta/manifest.json", document)
    relative = discovered(
        address, **{"farp.enabled": "True", "farp.manifest": "meta/manifest.json"}
    )
    assert await resolve(relative) == document
    absolute = discovered(
        "10.255.255.1:1",  # unroutable: the absolute URL must not depend on it
        **{"farp.enabled": "true", "farp.manifest": f"http://{address}/meta/manifest.json"},
    )
    assert await resolve(absolute) == document
    # Neither a manifest URL nor schema URLs: the FARP default path.
    app.serve("/_farp/manifest", document)
    assert await resolve(discovered(address, **{"farp.enabled": "true"})) == document


async def test_a_failing_manifest_falls_back_to_the_schema_urls(site: tuple[Instance, str]) -> None:
    app, address = site
    app.serve("/_farp/manifest", {"error": "boom"}, status=500)
    app.serve("/openapi.json", openapi("/users", "/users/{id}"))
    app.serve("/asyncapi.yaml", ASYNCAPI, as_yaml=True)
    instance = discovered(
        address,
        **{
            "farp.enabled": "true",
            "farp.manifest": "/_farp/manifest",
            "farp.openapi": "/openapi.json",
            "farp.asyncapi": f"http://{address}/asyncapi.yaml",
            "farp.capabilities": "[rest websocket]",
        },
    )
    document = await resolve(instance)
    assert document is not None
    parsed = parse_manifest(document, address=instance.address)  # valid, checksum included
    assert (parsed.service_name, parsed.instance_id) == ("shop", instance.instance_id)
    assert parsed.instance is not None and parsed.instance.address == address
    assert parsed.capabilities == ("rest", "websocket")
    assert document["routing"] == {"strategy": "service"}
    assert document["endpoints"]["openapi"] == "/openapi.json"
    assert document["endpoints"]["asyncapi"] == "/asyncapi.yaml"
    urls = {s.type: s.url for s in parsed.schemas}
    assert urls == {
        "openapi": f"http://{address}/openapi.json",
        "asyncapi": f"http://{address}/asyncapi.yaml",
    }
    fetcher = SchemaFetcher()  # the descriptors verify, as the watcher will check them
    try:
        for descriptor in parsed.schemas:
            fetched = await fetcher.fetch(descriptor)
            assert fetched == (
                ASYNCAPI if descriptor.type == "asyncapi" else openapi("/users", "/users/{id}")
            )
    finally:
        await fetcher.close()


async def test_openapi_path_graphql_and_grpc_keys(site: tuple[Instance, str]) -> None:
    app, address = site
    app.serve("/docs/openapi.yaml", openapi("/items"), as_yaml=True)
    document = await resolve(
        discovered(
            address,
            **{
                "farp.enabled": "true",
                "farp.openapi.path": "/docs/openapi.yaml",
                "farp.graphql": f"http://{address}/api/graphql",
                "farp.grpc.reflection": "true",
            },
        )
    )
    assert document is not None
    parsed = parse_manifest(document)
    assert [s.type for s in parsed.schemas] == ["openapi"]
    assert parsed.capabilities == ("rest", "graphql")
    assert parsed.endpoints["graphql"] == "/api/graphql"
    assert parsed.endpoints["grpc_reflection"] is True
    assert app.hits == {"/docs/openapi.yaml": 1}  # the manifest default is not tried

    graphql_only = await resolve(
        discovered(address, **{"farp.enabled": "true", "farp.graphql": "/graphql"})
    )
    assert graphql_only is not None
    assert parse_manifest(graphql_only).capabilities == ("graphql",)
    assert graphql_only["schemas"] == [] and graphql_only["endpoints"]["graphql"] == "/graphql"


async def test_nothing_usable_gives_none_and_is_logged_once(
    site: tuple[Instance, str], caplog: pytest.LogCaptureFixture
) -> None:
    app, address = site
    app.serve("/openapi.json", openapi("/users"))
    broken = discovered(
        address,
        **{
            "farp.enabled": "true",
            "farp.manifest": "/missing",
            "farp.openapi": "/openapi.json",
            "farp.asyncapi": "/also-missing",  # all or nothing: openapi alone is not enough
        },
    )
    with caplog.at_level(logging.WARNING, "octopus.discovery"):
        assert await resolve(broken) is None
        assert await resolve(broken) is None
    warnings = [r for r in caplog.records if r.getMessage() == "no manifest for a FARP instance"]
    assert len(warnings) == 1
    assert "/missing answered 404" in warnings[0].reason  # type: ignore[attr-defined]

    app.serve("/listed", [1, 2])  # JSON, but not a manifest object
    assert (
        await resolve(discovered(address, **{"farp.enabled": "true", "farp.manifest": "/listed"}))
        is None
    )
    no_address = discovered(None, **{"farp.enabled": "true", "farp.manifest": "/_farp/manifest"})
    assert await resolve(no_address) is None
    unreachable = discovered("127.0.0.1:9", **{"farp.enabled": "true"})
    assert await resolve(unreachable) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("[rest websocket]", ["rest", "websocket"]),
        ("rest,sse", ["rest", "sse"]),
        (' ["grpc", "rest"] ', ["grpc", "rest"]),
        ("['rest' 'graphql']", ["rest", "graphql"]),
        ("", []),
        (None, []),
    ],
)
def test_capabilities_are_parsed_leniently(raw: str | None, expected: list[str]) -> None:
    assert parse_capabilities(raw) == expected
