"""The gateway mounted inside a Starlette application (``Mount("/api", app=create_app(...))``)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from gateway.asgi import create_app
from tests.support.gateway import gateway_config, route
from tests.support.raw import exchange, request_bytes
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamApp, UpstreamServer


async def home(request: object) -> PlainTextResponse:
    return PlainTextResponse("host app")


@pytest.fixture(scope="module")
def host_app(upstream_server: UpstreamServer) -> Iterator[ThreadedServer]:
    config = gateway_config(
        {"main": upstream_server.url},
        [
            route("users", "/users/{id}", "main"),
            route("strip", "/strip/{rest:path}", "main", strip_prefix=True),
        ],
    )
    app = Starlette(routes=[Route("/", home), Mount("/api", app=create_app(config))])
    with ThreadedServer(app) as server:
        yield server


@pytest.fixture
def client(host_app: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=host_app.url, timeout=10) as client:
        yield client


def test_a_mounted_gateway_forwards_the_path_below_the_mount(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/api/users/1?x=1")
    assert response.status_code == 200
    assert upstream.requests[-1]["path"] == "/users/1"
    assert upstream.requests[-1]["raw_path"] == "/users/1"
    assert upstream.requests[-1]["query"] == "x=1"


def test_a_mounted_gateway_applies_strip_prefix_below_the_mount(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    assert client.get("/api/strip/a/b").status_code == 200
    assert upstream.paths == ["/a/b"]


def test_a_mounted_gateway_matches_percent_encoded_paths_below_the_mount(
    host_app: ThreadedServer, upstream: UpstreamApp
) -> None:
    response = exchange(host_app.port, request_bytes("GET", "/api/strip/x%2Fy"))
    assert response.status == 200
    assert upstream.requests[-1]["raw_path"] == "/x%2Fy"


def test_a_mounted_gateway_answers_unknown_paths_with_its_json_404(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/api/nowhere")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert upstream.requests == []


def test_a_mounted_gateway_serves_its_admin_plane_below_the_mount(client: httpx.Client) -> None:
    assert client.get("/api/_/health").json()["status"] == "ok"
    routes = client.get("/api/_/routes").json()["routes"]
    assert [r["name"] for r in routes] == ["users", "strip"]


def test_the_host_app_keeps_its_own_routes(client: httpx.Client, upstream: UpstreamApp) -> None:
    assert client.get("/").text == "host app"
    assert upstream.requests == []
