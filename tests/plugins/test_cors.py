"""The ``cors`` plugin against a real gateway and upstream: preflights answered at the
gateway (and only real preflights), origin policies, credentials and ``Vary``."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from settings import ConfigError
from tests.plugins.shaped_upstream import ShapedUpstream, ShapedUpstreamServer
from tests.support.gateway import GatewayServer, gateway_config, route

STRICT = {
    "allow_origins": [
        "https://app.example.com",
        "https://*.example.org",
        "*.example.net",
    ],
    "allow_methods": ["GET", "POST"],
    "allow_headers": ["Content-Type", "X-Token"],
    "expose_headers": ["X-Trace", "X-Request-ID"],
    "max_age": "5m",
}


@pytest.fixture(scope="module")
def shaped() -> Iterator[ShapedUpstreamServer]:
    with ShapedUpstreamServer() as server:
        yield server


@pytest.fixture
def upstream(shaped: ShapedUpstreamServer) -> ShapedUpstream:
    shaped.app.reset()
    return shaped.app


@pytest.fixture(scope="module")
def gateway(shaped: ShapedUpstreamServer) -> Iterator[GatewayServer]:
    config = gateway_config(
        {"up": shaped.url},
        [
            route("public", "/public/{rest:path}", "up", strip_prefix=True, plugins=["cors-any"]),
            route("strict", "/strict/{rest:path}", "up", strip_prefix=True, plugins=["strict"]),
            route("creds", "/creds/{rest:path}", "up", strip_prefix=True, plugins=["creds"]),
            route(
                "guarded",
                "/guarded/{rest:path}",
                "up",
                strip_prefix=True,
                plugins=["strict", "deny"],
            ),
        ],
        plugins=[
            {"name": "cors-any", "module": "plugins.cors", "config": {}},
            {"name": "strict", "module": "plugins.cors", "config": STRICT},
            {
                "name": "creds",
                "module": "plugins.cors",
                "config": {"allow_origins": ["*"], "allow_credentials": True},
            },
            {
                "name": "deny",
                "module": "plugins.examples.stamp",
                "config": {"deny_header": "x-deny"},
            },
        ],
    )
    with GatewayServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def global_gateway(shaped: ShapedUpstreamServer) -> Iterator[GatewayServer]:
    """``middleware: [cors]`` in front of a GET-only route."""
    config = gateway_config(
        {"up": shaped.url},
        [route("only-get", "/items/{id}", "up", methods=["GET"])],
        middleware=["cors"],
        plugins=[{"name": "cors", "config": {"allow_origins": ["https://app.example.com"]}}],
    )
    with GatewayServer(config) as server:
        yield server


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c


def preflight(
    client: httpx.Client, path: str, origin: str, method: str = "POST", headers: str | None = None
) -> httpx.Response:
    sent = {"origin": origin, "access-control-request-method": method}
    if headers is not None:
        sent["access-control-request-headers"] = headers
    return client.options(path, headers=sent)


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def vary(response: httpx.Response) -> list[str]:
    return [
        member.strip().lower()
        for value in response.headers.get_list("vary")
        for member in value.split(",")
    ]


# --- preflights ------------------------------------------------------------------------


def test_preflight_is_answered_204_by_the_gateway_without_reaching_the_upstream(
    client: httpx.Client, upstream: ShapedUpstream
) -> None:
    response = preflight(client, "/strict/echo", "https://app.example.com", "POST", "x-token")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"
    assert response.headers["access-control-allow-methods"] == "GET, POST"
    assert response.headers["access-control-allow-headers"] == "x-token"
    assert response.headers["access-control-max-age"] == "300"
    assert "access-control-allow-credentials" not in response.headers
    assert upstream.requests == []


def test_options_without_request_method_is_a_plain_request_for_the_upstream(
    client: httpx.Client, upstream: ShapedUpstream
) -> None:
    response = client.options("/strict/echo", headers={"origin": "https://app.example.com"})
    assert response.status_code == 200
    assert [r["method"] for r in upstream.requests] == ["OPTIONS"]
    # An actual (non-preflight) cross-origin request: it still gets its CORS headers.
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"


def test_options_without_origin_is_a_plain_request_for_the_upstream(
    client: httpx.Client, upstream: ShapedUpstream
) -> None:
    response = client.options("/strict/echo", headers={"access-control-request-method": "GET"})
    assert response.status_code == 200
    assert [r["method"] for r in upstream.requests] == ["OPTIONS"]
    assert cors_headers(response) == {}


def test_preflight_from_a_disallowed_origin_is_refused_403_without_cors_headers(
    client: httpx.Client, upstream: ShapedUpstream
) -> None:
    response = preflight(client, "/strict/echo", "https://evil.example.com")
    assert response.status_code == 403
    assert response.json()["error"] == "cors_rejected"
    assert "https://evil.example.com" in response.json()["message"]
    assert cors_headers(response) == {}
    assert "origin" in vary(response)
    assert upstream.requests == []


def test_preflight_asking_for_a_disallowed_method_is_refused(client: httpx.Client) -> None:
    response = preflight(client, "/strict/echo", "https://app.example.com", "DELETE")
    assert response.status_code == 403
    assert "DELETE" in response.json()["message"]
    assert cors_headers(response) == {}


def test_preflight_asking_for_a_disallowed_header_is_refused(client: httpx.Client) -> None:
    response = preflight(
        client, "/strict/echo", "https://app.example.com", "POST", "x-token, x-admin"
    )
    assert response.status_code == 403
    assert "x-admin" in response.json()["message"]


def test_preflight_headers_are_checked_case_insensitively(client: httpx.Client) -> None:
    response = preflight(
        client, "/strict/echo", "https://app.example.com", "GET", "CONTENT-TYPE,X-Token"
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-headers"] == "CONTENT-TYPE, X-Token"


def test_wildcard_allow_headers_reflects_the_requested_headers(client: httpx.Client) -> None:
    response = preflight(client, "/public/echo", "https://any.test", "PUT", "x-one, x-two")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-headers"] == "x-one, x-two"


def test_preflight_answers_vary_on_the_request_method_and_headers(client: httpx.Client) -> None:
    response = preflight(client, "/strict/echo", "https://app.example.com")
    assert vary(response) == [
        "origin",
        "access-control-request-method",
        "access-control-request-headers",
    ]


# --- actual requests ---------------------------------------------------------------------


def test_allowed_origin_gets_its_origin_and_the_exposed_headers(client: httpx.Client) -> None:
    response = client.get("/strict/echo", headers={"origin": "https://app.example.com"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"
    assert response.headers["access-control-expose-headers"] == "X-Trace, X-Request-ID"
    assert "origin" in vary(response)


def test_disallowed_origin_is_proxied_but_gets_no_cors_headers(
    client: httpx.Client, upstream: ShapedUpstream
) -> None:
    response = client.get("/strict/echo", headers={"origin": "https://evil.example.com"})
    assert response.status_code == 200
    assert len(upstream.requests) == 1
    assert cors_headers(response) == {}
    assert "origin" in vary(response)


def test_all_origins_without_credentials_answers_star_without_vary_origin(
    client: httpx.Client,
) -> None:
    response = client.get("/public/echo", headers={"origin": "https://anything.test"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "origin" not in vary(response)


def test_vary_origin_is_set_even_without_origin_when_the_answer_depends_on_it(
    client: httpx.Client,
) -> None:
    response = client.get("/strict/echo")
    assert cors_headers(response) == {}
    assert vary(response) == ["origin"]


def test_upstream_cors_headers_are_replaced_and_its_vary_is_kept(client: httpx.Client) -> None:
    response = client.get("/strict/cors-upstream", headers={"origin": "https://app.example.com"})
    assert response.headers.get_list("access-control-allow-origin") == ["https://app.example.com"]
    assert response.headers["access-control-expose-headers"] == "X-Trace, X-Request-ID"
    assert vary(response) == ["accept-language", "origin"]


def test_cors_headers_land_on_another_plugins_direct_answer(client: httpx.Client) -> None:
    response = client.get(
        "/guarded/echo", headers={"origin": "https://app.example.com", "x-deny": "1"}
    )
    assert response.status_code == 403
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"


# --- credentials -------------------------------------------------------------------------


def test_credentials_reflect_the_origin_on_preflights_never_star(client: httpx.Client) -> None:
    response = preflight(client, "/creds/echo", "https://site.test", "PATCH", "authorization")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "https://site.test"
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["access-control-allow-headers"] == "authorization"
    assert "origin" in vary(response)


def test_credentials_reflect_the_origin_on_actual_requests(client: httpx.Client) -> None:
    response = client.get("/creds/echo", headers={"origin": "https://site.test"})
    assert response.headers["access-control-allow-origin"] == "https://site.test"
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "origin" in vary(response)


def test_credentials_with_any_origin_do_not_trust_the_null_origin(client: httpx.Client) -> None:
    response = client.get("/creds/echo", headers={"origin": "null"})
    assert cors_headers(response) == {}


# --- origin patterns ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.org", True),
        ("https://deep.a.example.org", True),
        ("https://example.org", False),  # the apex is not a subdomain
        ("http://a.example.org", False),  # the pattern names https
        ("https://evilexample.org", False),
        ("https://a.example.org:8443", False),  # no port in the pattern: none allowed
        ("http://a.example.net", True),  # no scheme in the pattern: any scheme
        ("https://x.example.net", True),
        ("https://APP.example.com", True),  # origins compare case-insensitively
        ("https://app.example.com.evil.test", False),
    ],
)
def test_origin_patterns_match_subdomains_only(
    client: httpx.Client, origin: str, allowed: bool
) -> None:
    response = client.get("/strict/echo", headers={"origin": origin})
    assert ("access-control-allow-origin" in response.headers) is allowed


# --- global middleware -------------------------------------------------------------------


def test_global_cors_answers_preflights_for_routes_without_options(
    global_gateway: GatewayServer,
) -> None:
    with global_gateway.client() as client:
        response = preflight(client, "/items/7", "https://app.example.com", "GET")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"


def test_plain_options_on_a_get_only_route_is_still_405(global_gateway: GatewayServer) -> None:
    with global_gateway.client() as client:
        response = client.options("/items/7", headers={"origin": "https://app.example.com"})
    assert response.status_code == 405
    assert "GET" in response.headers["allow"]


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"allow_origins": ["https://app.example.com/"]}, "config.allow_origins"),
        ({"allow_origins": ["app.example.com"]}, "config.allow_origins"),
        ({"allow_methods": ["GET POST"]}, "config.allow_methods"),
        ({"max_age": "soon"}, "config.max_age"),
        ({"max_age": -1}, "config.max_age"),
        ({"allow_origin": ["*"]}, "config.allow_origin"),
    ],
)
def test_bad_cors_config_stops_startup_naming_the_plugin_and_key(
    config: dict[str, object], key: str
) -> None:
    from gateway.asgi import create_app

    with pytest.raises(ConfigError) as raised:
        create_app(
            gateway_config(
                {"up": "http://127.0.0.1:9"},
                [route("r", "/r", "up", plugins=["cors"])],
                plugins=[{"name": "cors", "config": config}],
            )
        )
    assert f"plugins[0] (cors): {key}" in str(raised.value)
