"""The ``transform`` plugin against a real gateway and upstream: header edits in both
directions, in their documented order, and the upstream path template."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from settings import ConfigError
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.upstream import UpstreamApp, UpstreamServer

HEADERS = {
    "request": {
        "add": {"X-Api-Version": "2", "X-Gateway": "octopus"},
        "append": {"X-Tag": "gateway"},
        "remove": ["X-Internal-Secret", "Cookie"],
        "rename": {"X-Old-Name": "X-New-Name"},
    },
    "response": {
        "add": {"X-Served-By": "octopus"},
        "remove": ["X-Alpha"],
        "rename": {"X-Zulu": "X-Renamed"},
        "append": {"X-Multi": "third"},
    },
}


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[UpstreamServer]:
    with UpstreamServer("transform") as server:
        yield server


@pytest.fixture
def upstream(upstream_server: UpstreamServer) -> UpstreamApp:
    upstream_server.app.reset()
    return upstream_server.app


@pytest.fixture(scope="module")
def gateway(upstream_server: UpstreamServer) -> Iterator[GatewayServer]:
    config = gateway_config(
        {"up": upstream_server.url},
        [
            route("headers", "/h/{rest:path}", "up", strip_prefix=True, plugins=["headers"]),
            route("v2", "/api/{rest:path}", "up", strip_prefix=True, plugins=["to-v2"]),
            route("orders", "/users/{id}/orders", "up", plugins=["orders"]),
            route("broken", "/broken/{rest:path}", "up", plugins=["broken"]),
        ],
        plugins=[
            {"name": "headers", "module": "plugins.transform", "config": HEADERS},
            {"name": "to-v2", "module": "plugins.transform", "config": {"path": "/v2/{rest}"}},
            {
                "name": "orders",
                "module": "plugins.transform",
                "config": {"path": "/v2/orders/{id}/list"},
            },
            {"name": "broken", "module": "plugins.transform", "config": {"path": "/x/{nope}"}},
        ],
    )
    with GatewayServer(config) as server:
        yield server


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c


def received(upstream: UpstreamApp, name: str) -> list[str]:
    """Values of header ``name`` the upstream received, in order."""
    (request,) = upstream.requests
    return [value for header, value in request["headers"] if header == name]


# --- request headers ---------------------------------------------------------------------


def test_add_sets_a_request_header_replacing_the_clients_value(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/h/echo", headers={"x-api-version": "1"})
    assert received(upstream, "x-api-version") == ["2"]
    assert received(upstream, "x-gateway") == ["octopus"]


def test_append_adds_a_value_and_keeps_the_clients(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/h/echo", headers={"x-tag": "client"})
    assert received(upstream, "x-tag") == ["client", "gateway"]


def test_remove_drops_request_headers(client: httpx.Client, upstream: UpstreamApp) -> None:
    client.get("/h/echo", headers={"x-internal-secret": "s3cret", "cookie": "a=1"})
    assert received(upstream, "x-internal-secret") == []
    assert received(upstream, "cookie") == []


def test_rename_moves_the_value_to_the_new_name(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/h/echo", headers={"x-old-name": "value"})
    assert received(upstream, "x-old-name") == []
    assert received(upstream, "x-new-name") == ["value"]


def test_rename_replaces_a_header_already_under_the_new_name(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/h/echo", headers={"x-old-name": "renamed", "x-new-name": "client"})
    assert received(upstream, "x-new-name") == ["renamed"]


def test_rename_without_the_old_header_changes_nothing(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/h/echo", headers={"x-new-name": "client"})
    assert received(upstream, "x-new-name") == ["client"]


# --- response headers --------------------------------------------------------------------


def test_response_headers_are_added_removed_renamed_and_appended(client: httpx.Client) -> None:
    response = client.get("/h/ordered")
    assert response.headers["x-served-by"] == "octopus"
    assert "x-alpha" not in response.headers
    assert "x-zulu" not in response.headers
    assert response.headers["x-renamed"] == "1"
    assert response.headers.get_list("x-multi") == ["first", "second", "third"]


def test_response_edits_apply_to_error_answers_too(client: httpx.Client) -> None:
    response = client.get("/h/status/404")
    assert response.status_code == 404
    assert response.headers["x-served-by"] == "octopus"


# --- path template -----------------------------------------------------------------------


def test_path_template_is_filled_with_a_rest_parameter_keeping_slashes_and_query(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/api/a/b/c?x=1&y=2")
    (request,) = upstream.requests
    assert request["raw_path"] == "/v2/a/b/c"
    assert request["query"] == "x=1&y=2"


def test_empty_rest_parameter_does_not_leave_a_trailing_slash(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/api")
    assert upstream.requests[0]["raw_path"] == "/v2"


def test_segment_parameters_are_percent_encoded(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/users/a%20b%3Fc/orders")
    assert upstream.requests[0]["raw_path"] == "/v2/orders/a%20b%3Fc/list"


def test_path_template_replaces_the_routes_strip_prefix(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    # The "v2" route has strip_prefix: without the template it would send /x.
    client.get("/api/x")
    assert upstream.paths == ["/v2/x"]


def test_template_naming_an_unknown_parameter_is_a_500_not_a_wrong_forward(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/broken/a")
    assert response.status_code == 500
    assert response.json()["error"] == "misconfigured"
    assert upstream.requests == []


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"request": {"remove": ["Content-Length"]}}, "config.request.remove"),
        ({"response": {"add": {"Transfer-Encoding": "x"}}}, "config.response.add"),
        ({"request": {"add": {"bad name": "x"}}}, "config.request.add"),
        ({"request": {"add": {"X-A": "a\r\nX-B: b"}}}, "config.request.add"),
        ({"request": {"prepend": {}}}, "config.request.prepend"),
        ({"path": "v2/{rest}"}, "config.path"),
        ({"path": "/v2/{rest"}, "config.path"),
    ],
)
def test_bad_transform_config_stops_startup_naming_the_plugin_and_key(
    config: dict[str, Any], key: str
) -> None:
    from gateway.asgi import create_app

    with pytest.raises(ConfigError) as raised:
        create_app(
            gateway_config(
                {"up": "http://127.0.0.1:9"},
                [route("r", "/r", "up", plugins=["transform"])],
                plugins=[{"name": "transform", "config": config}],
            )
        )
    assert f"plugins[0] (transform): {key}" in str(raised.value)
