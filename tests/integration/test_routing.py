"""Routing: which route a request takes and the path it is forwarded with.

Every route here adds the prefix ``/@<route name>`` to the forwarded path, so the path
the upstream records says which route matched.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.routing.builder import build_table
from settings import load_settings
from tests.support.gateway import GatewayServer, MakeGateway, gateway_config, route
from tests.support.raw import exchange
from tests.support.upstream import MakeUpstream, UpstreamApp, UpstreamServer
from tests.support.waiting import eventually


def tagged(name: str, path: str, **extra: Any) -> dict[str, Any]:
    """A route whose forwarded path starts with ``/@name``."""
    return route(name, path, "main", add_prefix=f"/@{name}", **extra)


ROUTES = [
    # Defined least specific first: specificity, not order, must decide.
    tagged("items-rest", "/items/{rest:path}"),
    tagged("items-param", "/items/{id}"),
    tagged("items-static", "/items/special"),
    tagged("host-any", "/hosted"),
    tagged("host-wild", "/hosted", host="*.example.com"),
    tagged("host-exact", "/hosted", host="api.example.com"),
    tagged("version-default", "/versioned"),
    tagged("version-2", "/versioned", headers={"X-Api-Version": "2"}),
    tagged("search-old", "/search"),
    tagged("search-new", "/search", query={"engine": "new"}),
    tagged("tie-low", "/tie", priority=1),
    tagged("tie-high", "/tie", priority=5),
    tagged("same-first", "/same"),
    tagged("same-second", "/same"),
    tagged("only-get", "/only", methods=["GET"]),
    tagged("only-post", "/only", methods=["POST"]),
    tagged("public", "/public/{rest:path}"),
    tagged("admin", "/admin/{rest:path}"),
    tagged("files", "/files/{rest:path}"),
    route("strip", "/strip/{rest:path}", "main", strip_prefix=True),
    route("strip-v1", "/v1/{rest:path}", "main", strip_prefix="/v1"),
    route("legacy", "/legacy/{rest:path}", "main", add_prefix="/api"),
    route(
        "old",
        "/old/{rest:path}",
        "main",
        rewrite=[{"pattern": "^/old/([^/]+)/(.*)$", "replacement": "/new/$2/$1"}],
    ),
]


@pytest.fixture(scope="module")
def gw(upstream_server: UpstreamServer) -> Iterator[GatewayServer]:
    config = gateway_config({"main": upstream_server.url}, ROUTES)
    with GatewayServer(config) as server:
        yield server


@pytest.fixture
def client(gw: GatewayServer) -> Iterator[httpx.Client]:
    with gw.client() as client:
        yield client


def forwarded_path(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["path"]


def matched_route(response: httpx.Response) -> str:
    return forwarded_path(response).split("/")[1].removeprefix("@")


def test_a_static_segment_beats_a_parameter(client: httpx.Client, upstream: UpstreamApp) -> None:
    assert matched_route(client.get("/items/special")) == "items-static"


def test_a_parameter_beats_a_rest_wildcard(client: httpx.Client, upstream: UpstreamApp) -> None:
    assert matched_route(client.get("/items/42")) == "items-param"


def test_a_rest_wildcard_takes_deeper_paths(client: httpx.Client, upstream: UpstreamApp) -> None:
    response = client.get("/items/42/parts/7")
    assert matched_route(response) == "items-rest"
    assert forwarded_path(response) == "/@items-rest/items/42/parts/7"


def test_an_exact_host_beats_a_wildcard_host(client: httpx.Client, upstream: UpstreamApp) -> None:
    response = client.get("/hosted", headers={"Host": "api.example.com"})
    assert matched_route(response) == "host-exact"


def test_the_host_port_is_ignored_when_matching(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/hosted", headers={"Host": "API.example.com:8443"})
    assert matched_route(response) == "host-exact"


def test_a_wildcard_host_matches_any_subdomain(client: httpx.Client, upstream: UpstreamApp) -> None:
    response = client.get("/hosted", headers={"Host": "eu.shop.example.com"})
    assert matched_route(response) == "host-wild"


def test_a_wildcard_host_does_not_match_the_bare_domain(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    assert matched_route(client.get("/hosted", headers={"Host": "example.com"})) == "host-any"
    assert matched_route(client.get("/hosted", headers={"Host": "badexample.com"})) == "host-any"


def test_a_header_matcher_selects_its_route(client: httpx.Client, upstream: UpstreamApp) -> None:
    assert matched_route(client.get("/versioned", headers={"X-Api-Version": "2"})) == "version-2"
    assert matched_route(client.get("/versioned", headers={"X-Api-Version": "3"})) == (
        "version-default"
    )


def test_a_query_matcher_selects_its_route(client: httpx.Client, upstream: UpstreamApp) -> None:
    assert matched_route(client.get("/search?q=x&engine=new")) == "search-new"
    assert matched_route(client.get("/search?engine=old")) == "search-old"


def test_higher_priority_wins_a_tie(client: httpx.Client, upstream: UpstreamApp) -> None:
    assert matched_route(client.get("/tie")) == "tie-high"


def test_the_first_defined_route_wins_a_full_tie(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    assert matched_route(client.get("/same")) == "same-first"


def test_an_unknown_path_gets_a_json_404(client: httpx.Client, upstream: UpstreamApp) -> None:
    response = client.get("/nowhere/at/all")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "message", "request_id"}
    assert body["error"] == "not_found"
    assert body["request_id"] == response.headers["x-request-id"]
    assert upstream.requests == []


def test_a_known_path_with_another_method_gets_405_with_allow(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.delete("/only")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert allowed == {"GET", "HEAD", "POST"}
    assert upstream.requests == []


def test_each_method_reaches_its_own_route(client: httpx.Client, upstream: UpstreamApp) -> None:
    assert matched_route(client.get("/only")) == "only-get"
    assert matched_route(client.post("/only", content=b"x")) == "only-post"


def test_strip_prefix_true_removes_the_literal_part_of_the_template(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    assert forwarded_path(client.get("/strip/a/b")) == "/a/b"


def test_strip_prefix_true_forwards_the_bare_prefix_as_root(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    assert forwarded_path(client.get("/strip/")) == "/"


def test_strip_prefix_string_removes_exactly_that_prefix(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    assert forwarded_path(client.get("/v1/users/7")) == "/users/7"


def test_add_prefix_is_put_in_front_of_the_path(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    assert forwarded_path(client.get("/legacy/report")) == "/api/legacy/report"


def test_rewrite_substitutes_regex_groups(client: httpx.Client, upstream: UpstreamApp) -> None:
    assert forwarded_path(client.get("/old/alpha/beta/gamma")) == "/new/beta/gamma/alpha"


def test_the_query_string_is_forwarded_unchanged(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/strip/a?b=1&c=%20x&c=y&flag")
    assert upstream.requests[-1]["path"] == "/a"
    assert upstream.requests[-1]["query"] == "b=1&c=%20x&c=y&flag"


def test_percent_encoded_paths_are_forwarded_byte_for_byte(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    response = exchange(gw.port, b"GET /files/a%20b%2Fc%3Fd%25e HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert response.status == 200
    assert upstream.requests[-1]["raw_path"] == "/@files/files/a%20b%2Fc%3Fd%25e"


def test_percent_encoded_paths_survive_strip_prefix(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    response = exchange(gw.port, b"GET /strip/x%2Fy%20z HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert response.status == 200
    assert upstream.requests[-1]["raw_path"] == "/x%2Fy%20z"


@pytest.mark.parametrize("target", [b"/public/../admin/panel", b"/public/%2e%2e/admin/panel"])
def test_dot_segments_cannot_escape_a_route(
    gw: GatewayServer, upstream: UpstreamApp, target: bytes
) -> None:
    response = exchange(gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert response.status == 200
    assert upstream.paths == ["/@admin/admin/panel"]


@pytest.mark.parametrize("target", [b"/public/../secret", b"/public/..%2F..%2Fsecret"])
def test_dot_segments_leading_nowhere_get_404_without_contacting_the_upstream(
    gw: GatewayServer, upstream: UpstreamApp, target: bytes
) -> None:
    response = exchange(gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert response.status == 404
    assert upstream.requests == []


def test_dot_segments_inside_a_route_are_resolved_before_forwarding(
    gw: GatewayServer, upstream: UpstreamApp
) -> None:
    response = exchange(gw.port, b"GET /public/a/./b/../c HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert response.status == 200
    assert upstream.requests[-1]["raw_path"] == "/@public/public/a/c"


def test_a_swapped_table_serves_the_next_request_while_in_flight_ones_finish_on_the_old(
    upstream_server: UpstreamServer,
    upstream: UpstreamApp,
    make_upstream: MakeUpstream,
    make_gateway: MakeGateway,
) -> None:
    replacement = make_upstream("replacement")

    def config(url: str) -> dict[str, Any]:
        return gateway_config(
            {"work": url}, [route("work", "/work/{rest:path}", "work", strip_prefix=True)]
        )

    gw = make_gateway(config(upstream_server.url))
    with concurrent.futures.ThreadPoolExecutor(1) as pool, gw.client() as client:
        in_flight = pool.submit(client.get, "/work/slow?delay=1")
        eventually(lambda: upstream.paths == ["/slow"], message="slow request never arrived")

        table = build_table(load_settings(config(replacement.url)), gw.gateway.endpoints, version=2)
        gw.gateway.swap(table)

        with gw.client() as second:
            after = second.get("/work/next")
        assert after.status_code == 200
        assert after.json()["server"] == "replacement"

        finished = in_flight.result(timeout=10)
        assert finished.status_code == 200
        assert finished.json()["server"] == "primary"
    assert upstream.paths == ["/slow"]
    assert replacement.app.paths == ["/next"]
