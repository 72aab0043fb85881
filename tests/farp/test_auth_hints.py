"""FARP ``auth`` hints: carried to routes, and honoured by auth plugins only when trusted."""

from __future__ import annotations

import httpx

from gateway.asgi import create_app
from gateway.farp.publish import inline_schema, make_manifest
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamApp
from tests.support.waiting import eventually

OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "t", "version": "1"},
    "paths": {
        "/health": {"get": {}},
        "/public/info": {"get": {}},
        "/orders": {"get": {}},
    },
}
SECRET = "a-test-secret-of-at-least-32-bytes!!"


def _gateway(upstream_url: str, *, trusted: bool) -> ThreadedServer:
    manifest = make_manifest(
        "shop",
        "shop-1",
        upstream_url.removeprefix("http://"),
        [inline_schema("openapi", OPENAPI)],
        routing={"strategy": "service"},
        auth={"public_routes": ["/public/*", "/health"], "required_scopes": ["orders:read"]},
    )
    config = {
        "discovery": {"backend": "static", "static": {"manifests": [manifest]}},
        "farp": {"trust_auth_hints": trusted},
        "plugins": [{"name": "jwt-auth", "config": {"secret": SECRET, "trust_farp_hints": True}}],
        "middleware": ["jwt-auth"],
    }
    return ThreadedServer(create_app(config))


def _token(scopes: str) -> str:
    import time

    import jwt

    claims = {"sub": "u", "scope": scopes, "exp": int(time.time()) + 60}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_public_hint_skips_auth_and_scope_hint_is_required_when_trusted() -> None:
    with ThreadedServer(UpstreamApp()) as upstream, _gateway(upstream.url, trusted=True) as gw:
        client = httpx.Client(base_url=gw.url)
        eventually(lambda: client.get("/_/ready").status_code == 200)
        assert client.get("/shop/public/info").status_code == 200
        assert client.get("/shop/orders").status_code == 401
        weak = {"authorization": f"Bearer {_token('other')}"}
        assert client.get("/shop/orders", headers=weak).status_code == 403
        strong = {"authorization": f"Bearer {_token('orders:read')}"}
        assert client.get("/shop/orders", headers=strong).status_code == 200


def test_hints_are_ignored_unless_the_gateway_trusts_them() -> None:
    with ThreadedServer(UpstreamApp()) as upstream, _gateway(upstream.url, trusted=False) as gw:
        client = httpx.Client(base_url=gw.url)
        eventually(lambda: client.get("/_/ready").status_code == 200)
        assert client.get("/shop/public/info").status_code == 401
        weak = {"authorization": f"Bearer {_token('other')}"}
        assert client.get("/shop/orders", headers=weak).status_code == 200
