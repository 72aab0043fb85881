"""``basic-auth`` through a real gateway and a real echo upstream, with real bcrypt hashes
(cost 4: the algorithm is the same, the tests stay fast).

Each plugin entry guards ``/<entry>/...`` (see ``auth_support.auth_gateway``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import bcrypt
import httpx
import pytest

from gateway.asgi import create_app
from gateway.extensions.chain import PluginChain
from plugins.basic_auth import BasicAuthConfig, BasicAuthPlugin
from settings import ConfigError
from tests.plugins.auth_support import (
    auth_gateway,
    seen_header_values,
    seen_headers,
    websocket_context,
)
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.upstream import UpstreamServer

MODULE = "plugins.basic_auth"


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


USERS = [
    {"username": "alice", "password_hash": bcrypt_hash("wonderland")},
    {"username": "bob", "password_hash": bcrypt_hash("pa:ss:word"), "scopes": ["admin"]},
]


def basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("backend") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer) -> Iterator[GatewayServer]:
    plugins: dict[str, dict[str, Any]] = {
        "basic": {"users": USERS, "realm": "staff", "public_routes": ["/basic/status"]},
        "visible": {"users": USERS, "hide_credentials": False},
        "admins": {"users": USERS, "required_scopes": ["admin"]},
    }
    server = auth_gateway(upstream.url, plugins, MODULE)
    yield server
    server.stop()


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client


def plugin_of(gateway: GatewayServer, name: str) -> BasicAuthPlugin:
    plugin = gateway.gateway.plugins.by_name[name]
    assert isinstance(plugin, BasicAuthPlugin)
    return plugin


def test_valid_credentials_pass_and_the_username_is_forwarded(client: httpx.Client) -> None:
    response = client.get("/basic/orders", headers=basic("alice", "wonderland"))
    assert response.status_code == 200
    assert seen_headers(response)["x-consumer"] == "alice"


def test_credentials_are_removed_before_the_upstream(client: httpx.Client) -> None:
    response = client.get("/basic/orders", headers=basic("alice", "wonderland"))
    assert "authorization" not in seen_headers(response)


def test_hide_credentials_false_keeps_the_authorization_header(client: httpx.Client) -> None:
    response = client.get("/visible/orders", headers=basic("alice", "wonderland"))
    assert response.status_code == 200
    assert seen_headers(response)["authorization"].startswith("Basic ")


def test_a_password_containing_colons_is_accepted(client: httpx.Client) -> None:
    response = client.get("/basic/orders", headers=basic("bob", "pa:ss:word"))
    assert response.status_code == 200


def test_a_request_without_credentials_is_401_with_a_basic_challenge(
    client: httpx.Client,
) -> None:
    response = client.get("/basic/orders")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="staff", charset="UTF-8"'
    body = response.json()
    assert set(body) == {"error", "message", "request_id"}
    assert body["error"] == "unauthorized"


def test_a_wrong_password_is_401(client: httpx.Client) -> None:
    response = client.get("/basic/orders", headers=basic("alice", "looking-glass"))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic ")


@pytest.mark.parametrize(
    "authorization",
    ["Basic !!!not-base64!!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer x"],
    ids=["bad-base64", "no-colon", "other-scheme"],
)
def test_malformed_credentials_are_401(client: httpx.Client, authorization: str) -> None:
    response = client.get("/basic/orders", headers={"Authorization": authorization})
    assert response.status_code == 401


def test_an_unknown_user_costs_a_bcrypt_check_like_a_known_one(
    client: httpx.Client, gateway: GatewayServer
) -> None:
    plugin = plugin_of(gateway, "basic")
    before = plugin.bcrypt_checks
    response = client.get("/basic/orders", headers=basic("mallory", "wonderland"))
    assert response.status_code == 401
    assert plugin.bcrypt_checks == before + 1


def test_a_successful_verification_is_cached(client: httpx.Client, gateway: GatewayServer) -> None:
    plugin = plugin_of(gateway, "visible")
    before = plugin.bcrypt_checks
    for _ in range(3):
        response = client.get("/visible/orders", headers=basic("bob", "pa:ss:word"))
        assert response.status_code == 200
    assert plugin.bcrypt_checks == before + 1


def test_a_failed_verification_is_not_cached(client: httpx.Client, gateway: GatewayServer) -> None:
    plugin = plugin_of(gateway, "visible")
    before = plugin.bcrypt_checks
    for _ in range(2):
        response = client.get("/visible/orders", headers=basic("alice", "guess"))
        assert response.status_code == 401
    assert plugin.bcrypt_checks == before + 2


def test_a_cached_password_does_not_open_another_user(client: httpx.Client) -> None:
    assert client.get("/basic/orders", headers=basic("alice", "wonderland")).status_code == 200
    assert client.get("/basic/orders", headers=basic("bob", "wonderland")).status_code == 401


def test_a_user_without_a_required_scope_is_403(client: httpx.Client) -> None:
    response = client.get("/admins/orders", headers=basic("alice", "wonderland"))
    assert response.status_code == 403


def test_a_user_with_the_required_scope_passes(client: httpx.Client) -> None:
    response = client.get("/admins/orders", headers=basic("bob", "pa:ss:word"))
    assert response.status_code == 200


def test_a_client_supplied_consumer_header_is_replaced(client: httpx.Client) -> None:
    headers = {**basic("alice", "wonderland"), "X-Consumer": "root"}
    response = client.get("/basic/orders", headers=headers)
    assert seen_header_values(response, "x-consumer") == ["alice"]


def test_public_routes_skip_auth_but_still_drop_a_spoofed_consumer(client: httpx.Client) -> None:
    response = client.get("/basic/status", headers={"X-Consumer": "root"})
    assert response.status_code == 200
    assert seen_header_values(response, "x-consumer") == []


def _config_with(plugin_config: dict[str, Any]) -> dict[str, Any]:
    return gateway_config(
        {"backend": "http://127.0.0.1:9"},
        [route("r", "/r", "backend", plugins=["basic-auth"])],
        plugins=[{"name": "basic-auth", "config": plugin_config}],
    )


@pytest.mark.parametrize(
    ("users", "message"),
    [
        ([{"username": "a", "password_hash": "plaintext"}], "must be a bcrypt hash"),
        ([{"username": "a:b", "password_hash": USERS[0]["password_hash"]}], "without ':'"),
        ([USERS[0], USERS[0]], "listed twice"),
        ([], "at least one user"),
    ],
)
def test_bad_users_are_refused(users: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        create_app(_config_with({"users": users}))
    assert "plaintext" not in str(raised.value)


def _ws_chain() -> PluginChain:
    plugin = BasicAuthPlugin()
    plugin.configure(BasicAuthConfig.model_validate({"users": USERS}))
    return PluginChain([plugin])


async def test_a_websocket_upgrade_without_credentials_is_refused_401() -> None:
    answer = await _ws_chain().run_request(websocket_context({}))
    assert answer is not None
    assert answer.status == 401
    assert answer.header("www-authenticate") == 'Basic realm="octopus", charset="UTF-8"'


async def test_a_websocket_upgrade_with_valid_credentials_continues_as_the_user() -> None:
    ctx = websocket_context(basic("alice", "wonderland"))
    assert await _ws_chain().run_request(ctx) is None
    assert ctx.header_values("x-consumer") == ["alice"]
    assert ctx.header("authorization") is None
