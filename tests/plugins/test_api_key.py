"""``api-key`` through a real gateway and a real echo upstream.

Each plugin entry guards ``/<entry>/...`` (see ``auth_support.auth_gateway``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.asgi import create_app
from gateway.extensions.chain import PluginChain
from plugins.api_key import ApiKeyConfig, ApiKeyPlugin
from settings import ConfigError
from tests.plugins.auth_support import (
    auth_gateway,
    seen_header_values,
    seen_headers,
    websocket_context,
)
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.upstream import UpstreamServer

MODULE = "plugins.api_key"
READER = "k-reader-0f3c9a"
WRITER = "k-writer-77b1e2"
PLAIN = "k-plain-5d0a41"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = [
    {"hash": sha256(READER), "name": "reader-app", "scopes": ["orders:read"]},
    {
        "hash": sha256(WRITER).upper(),  # digests are case-insensitive hex
        "name": "writer-app",
        "scopes": ["orders:read", "orders:write"],
        "metadata": {"tier": "gold"},
    },
    {"key": PLAIN, "name": "plain-app"},
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("backend") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer) -> Iterator[GatewayServer]:
    plugins: dict[str, dict[str, Any]] = {
        "keys": {"keys": KEYS, "public_routes": ["/keys/health"]},
        "query": {"keys": KEYS, "query_param": "apikey"},
        "visible": {"keys": KEYS, "hide_credentials": False, "header": "X-Token"},
        "writers": {"keys": KEYS, "required_scopes": ["orders:write"]},
        "anonymous": {"keys": KEYS, "forward_header": ""},
    }
    server = auth_gateway(upstream.url, plugins, MODULE)
    yield server
    server.stop()


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client


def test_a_hashed_key_in_the_header_is_accepted_and_its_name_forwarded(
    client: httpx.Client,
) -> None:
    response = client.get("/keys/orders", headers={"X-API-Key": READER})
    assert response.status_code == 200
    assert seen_headers(response)["x-consumer"] == "reader-app"


def test_an_upper_case_hex_digest_matches(client: httpx.Client) -> None:
    response = client.get("/keys/orders", headers={"X-API-Key": WRITER})
    assert seen_headers(response)["x-consumer"] == "writer-app"


def test_a_plaintext_key_entry_is_accepted(client: httpx.Client) -> None:
    response = client.get("/keys/orders", headers={"X-API-Key": PLAIN})
    assert seen_headers(response)["x-consumer"] == "plain-app"


def test_the_key_header_is_removed_before_the_upstream(client: httpx.Client) -> None:
    response = client.get("/keys/orders", headers={"X-API-Key": READER})
    assert "x-api-key" not in seen_headers(response)


def test_hide_credentials_false_keeps_the_key_header(client: httpx.Client) -> None:
    response = client.get("/visible/orders", headers={"X-Token": READER})
    assert response.status_code == 200
    assert seen_headers(response)["x-token"] == READER


def test_a_key_in_the_query_parameter_is_accepted_and_removed_upstream(
    client: httpx.Client,
) -> None:
    response = client.get("/query/orders?a=1&apikey=" + READER + "&b=%2Fx%20y")
    assert response.status_code == 200
    assert seen_headers(response)["x-consumer"] == "reader-app"
    assert response.json()["query"] == "a=1&b=%2Fx%20y"


def test_a_key_in_the_header_also_works_when_query_keys_are_enabled(
    client: httpx.Client,
) -> None:
    response = client.get("/query/orders", headers={"X-API-Key": WRITER})
    assert seen_headers(response)["x-consumer"] == "writer-app"


def test_the_query_parameter_is_ignored_unless_configured(client: httpx.Client) -> None:
    response = client.get(f"/keys/orders?apikey={READER}")
    assert response.status_code == 401


def test_different_keys_in_header_and_query_are_401(client: httpx.Client) -> None:
    response = client.get(f"/query/orders?apikey={READER}", headers={"X-API-Key": WRITER})
    assert response.status_code == 401


def test_a_request_without_a_key_is_401_with_an_apikey_challenge(client: httpx.Client) -> None:
    response = client.get("/keys/orders")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'ApiKey realm="octopus"'
    body = response.json()
    assert set(body) == {"error", "message", "request_id"}
    assert body["error"] == "unauthorized"


def test_an_unknown_key_is_401(client: httpx.Client) -> None:
    response = client.get("/keys/orders", headers={"X-API-Key": "k-guessed"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("ApiKey")


def test_the_digest_itself_is_not_a_key(client: httpx.Client) -> None:
    response = client.get("/keys/orders", headers={"X-API-Key": sha256(READER)})
    assert response.status_code == 401


def test_a_key_without_a_required_scope_is_403(client: httpx.Client) -> None:
    response = client.get("/writers/orders", headers={"X-API-Key": READER})
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


def test_a_key_with_the_required_scopes_passes(client: httpx.Client) -> None:
    response = client.get("/writers/orders", headers={"X-API-Key": WRITER})
    assert response.status_code == 200


def test_a_client_supplied_consumer_header_is_replaced(client: httpx.Client) -> None:
    response = client.get("/keys/orders", headers={"X-API-Key": READER, "X-Consumer": "admin"})
    assert seen_header_values(response, "x-consumer") == ["reader-app"]


def test_a_client_supplied_consumer_header_is_stripped_on_public_routes(
    client: httpx.Client,
) -> None:
    response = client.get("/keys/health", headers={"X-Consumer": "admin"})
    assert response.status_code == 200
    assert seen_header_values(response, "x-consumer") == []


def test_an_empty_forward_header_forwards_no_consumer(client: httpx.Client) -> None:
    response = client.get("/anonymous/orders", headers={"X-API-Key": READER})
    assert response.status_code == 200
    assert "x-consumer" not in seen_headers(response)


def _config_with(plugin_config: dict[str, Any]) -> dict[str, Any]:
    return gateway_config(
        {"backend": "http://127.0.0.1:9"},
        [route("r", "/r", "backend", plugins=["api-key"])],
        plugins=[{"name": "api-key", "config": plugin_config}],
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([{"hash": "not-hex", "name": "a"}], "SHA-256 digest"),
        ([{"hash": sha256("a"), "key": "a", "name": "a"}], "exactly one of hash"),
        ([{"name": "a"}], "exactly one of hash"),
        ([{"hash": sha256("a"), "name": "a"}, {"key": "a", "name": "b"}], "configured twice"),
    ],
)
def test_bad_key_entries_are_refused(keys: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_app(_config_with({"keys": keys}))


def test_the_built_in_is_found_by_name_alone() -> None:
    app = create_app(_config_with({"keys": KEYS}))
    assert isinstance(app.gateway.plugins.by_name["api-key"], ApiKeyPlugin)


def _ws_chain() -> PluginChain:
    plugin = ApiKeyPlugin()
    plugin.configure(ApiKeyConfig.model_validate({"keys": KEYS}))
    return PluginChain([plugin])


async def test_a_websocket_upgrade_without_a_key_is_refused_401() -> None:
    answer = await _ws_chain().run_request(websocket_context({}))
    assert answer is not None
    assert answer.status == 401


async def test_a_websocket_upgrade_with_a_valid_key_continues_as_its_consumer() -> None:
    ctx = websocket_context({"X-API-Key": WRITER, "X-Consumer": "admin"})
    assert await _ws_chain().run_request(ctx) is None
    assert ctx.header_values("x-consumer") == ["writer-app"]
    assert ctx.header("x-api-key") is None
    assert ctx.state["auth"]["metadata"] == {"tier": "gold"}
