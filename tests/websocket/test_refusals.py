"""Upgrades the gateway does not turn into sessions: refused by the upstream, an upstream
that cannot be reached, no route, an auth plugin, a draining gateway. Each arrives as an
HTTP response (the ASGI ``websocket.http.response`` extension), as it would for a GET."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.servers import free_port
from tests.websocket.conftest import MakeGateway
from tests.websocket.support import until, ws_url
from tests.websocket.upstream import WsUpstream

TIMEOUT = 5.0

API_KEY = {
    "plugins": [{"name": "api-key", "config": {"keys": [{"name": "web-app", "key": "s3cret"}]}}]
}


async def refused(url: str, **options: object) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, open_timeout=TIMEOUT, **options):  # type: ignore[arg-type]
            pass
    return caught.value


async def test_an_upstream_refusal_reaches_the_client_as_the_same_http_response(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway()
    response = (await refused(ws_url(gw.url), additional_headers={"X-Refuse": "1"})).response
    assert response.status_code == 403
    assert response.body == b"refused by the upstream"
    assert response.headers["x-upstream-says"] == "no"
    assert upstream.refused == 1 and upstream.sessions == []


async def test_an_unreachable_upstream_is_a_502(make_gateway: MakeGateway) -> None:
    gw = make_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    response = (await refused(ws_url(gw.url))).response
    assert response.status_code == 502
    assert json.loads(response.body)["error"] == "bad_gateway"


async def test_an_upgrade_without_a_route_is_a_404_with_the_json_error(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway(path="/chat")
    response = (await refused(ws_url(gw.url, "/elsewhere"))).response
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    body = json.loads(response.body)
    assert body["error"] == "not_found"
    assert body["message"] == "no route for /elsewhere"
    assert body["request_id"] == response.headers["x-request-id"]
    assert upstream.sessions == []


async def test_an_auth_plugin_rejects_an_upgrade_without_its_key_with_401(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway(sections=API_KEY, plugins=["api-key"])
    response = (await refused(ws_url(gw.url))).response
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("ApiKey")
    response = (await refused(ws_url(gw.url), additional_headers={"X-API-Key": "wrong"})).response
    assert response.status_code == 401
    assert upstream.sessions == []


async def test_an_auth_plugin_lets_an_upgrade_with_its_key_through(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway(sections=API_KEY, plugins=["api-key"])
    async with connect(ws_url(gw.url), additional_headers={"X-API-Key": "s3cret"}) as ws:
        await ws.send("authorised")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "authorised"
    # As for HTTP: the key stays at the gateway, the consumer's name goes upstream.
    session = upstream.sessions[0]
    assert session.header("x-api-key") is None
    assert session.header("x-consumer") == "web-app"


async def test_an_upgrade_while_the_gateway_drains_is_a_503(
    make_gateway: MakeGateway, upstream: WsUpstream
) -> None:
    gw = make_gateway()
    gw.server.call(setattr, gw.gateway, "draining", True)
    await until(lambda: gw.gateway.draining)
    assert (await refused(ws_url(gw.url))).response.status_code == 503
    assert upstream.sessions == []
