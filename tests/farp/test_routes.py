"""From manifests to routes (FARP.md §3), end to end: manifests reach a running gateway
through the ``static`` discovery backend, requests go through it to real upstreams, and
the tests look at what the upstream received."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.farp.canonical import schema_hash
from gateway.farp.publish import http_schema, inline_schema, make_manifest
from tests.farp.support import (
    RunningGateway,
    SchemaServer,
    Upstream,
    eventually,
    file_config,
    openapi,
    static_config,
    write_json,
)
from tests.support.servers import ThreadedServer

Start = Callable[[dict[str, Any]], RunningGateway]

USERS_API = openapi(("/users", ["get", "post"]), ("/users/{id}", ["get", "delete"]))


def users_manifest(upstream: Upstream, **options: Any) -> dict[str, Any]:
    options.setdefault("service_version", "v2.1.0")
    document = options.pop("document", USERS_API)
    return make_manifest(
        options.pop("service_name", "accounts"),
        options.pop("instance_id", "accounts-7f3"),
        upstream.address,
        [inline_schema("openapi", document)],
        **options,
    )


def serve(start: Start, *manifests: dict[str, Any]) -> RunningGateway:
    return start(static_config(*manifests)).wait_ready()


def last_path(upstream: Upstream) -> str:
    assert upstream.requests, "the upstream received nothing"
    return upstream.requests[-1]["path"]


# --- mount strategies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routing", "public"),
    [
        ({"strategy": "root"}, "/users/42"),
        ({"strategy": "instance"}, "/accounts-7f3/users/42"),
        (None, "/accounts-7f3/users/42"),  # instance is the default
        ({"strategy": "service"}, "/accounts/users/42"),
        ({"strategy": "versioned"}, "/accounts/v2.1.0/users/42"),
        ({"strategy": "custom", "base_path": "//api//people/"}, "/api/people/users/42"),
        ({"strategy": "custom", "base_path": "gateway/v2"}, "/gateway/v2/users/42"),
    ],
    ids=["root", "instance", "default", "service", "versioned", "custom-slashes", "custom-bare"],
)
def test_each_mount_strategy_serves_the_openapi_path_at_its_public_path(
    start_gateway: Start, alpha: Upstream, routing: dict[str, Any] | None, public: str
) -> None:
    gateway = serve(start_gateway, users_manifest(alpha, routing=routing))

    response = gateway.get(public)

    assert response.status_code == 200, response.text
    assert last_path(alpha) == "/users/42"
    assert gateway.get("/users-not-there/42").status_code == 404


def test_the_subdomain_strategy_matches_the_subdomain_of_any_gateway_host(
    start_gateway: Start, alpha: Upstream
) -> None:
    gateway = serve(
        start_gateway, users_manifest(alpha, routing={"strategy": "subdomain", "subdomain": "api"})
    )

    for host in ("api.example.com", "api.gw.internal:8443", "API.Example.COM"):
        response = gateway.get("/users/42", headers={"host": host})
        assert response.status_code == 200, (host, response.text)
        assert last_path(alpha) == "/users/42"
    for host in ("www.example.com", "api", "myapi.example.com"):
        assert gateway.get("/users/42", headers={"host": host}).status_code == 404, host
    route = next(r for r in gateway.routes()["routes"] if r["path"] == "/users/{id}")
    assert route["host"] == "api.*"


def test_openapi_templates_match_exactly_one_segment_and_are_not_literal(
    start_gateway: Start, alpha: Upstream
) -> None:
    gateway = serve(start_gateway, users_manifest(alpha, routing={"strategy": "service"}))

    assert gateway.get("/accounts/users/42").status_code == 200
    assert last_path(alpha) == "/users/42"
    assert gateway.get("/accounts/users/some-name").status_code == 200
    assert last_path(alpha) == "/users/some-name"
    count = len(alpha.requests)
    assert gateway.get("/accounts/users/42/extra").status_code == 404
    assert gateway.get("/accounts/users/").status_code == 404
    assert len(alpha.requests) == count


def test_parameter_values_reach_the_upstream_percent_encoded(
    start_gateway: Start, alpha: Upstream
) -> None:
    gateway = serve(start_gateway, users_manifest(alpha, routing={"strategy": "service"}))

    assert gateway.get("/accounts/users/caf%C3%A9%20au%20lait").status_code == 200
    assert alpha.requests[-1]["raw_path"] == "/users/caf%C3%A9%20au%20lait"


def test_parameter_names_openapi_allows_but_templates_do_not_still_route(
    start_gateway: Start, alpha: Upstream
) -> None:
    document = openapi("/orgs/{org-id}/members/{member.id}")
    gateway = serve(
        start_gateway, users_manifest(alpha, document=document, routing={"strategy": "root"})
    )

    assert gateway.get("/orgs/o1/members/m2").status_code == 200
    assert last_path(alpha) == "/orgs/o1/members/m2"


def test_methods_come_from_the_operations_of_each_path(
    start_gateway: Start, alpha: Upstream
) -> None:
    gateway = serve(start_gateway, users_manifest(alpha, routing={"strategy": "service"}))

    assert gateway.request("POST", "/accounts/users", json={"name": "x"}).status_code == 200
    assert gateway.request("DELETE", "/accounts/users/1").status_code == 200
    assert gateway.request("HEAD", "/accounts/users/1").status_code == 200
    refused = gateway.request("PUT", "/accounts/users/1")
    assert refused.status_code == 405
    assert set(refused.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "DELETE"}
    assert [r["method"] for r in alpha.requests] == ["POST", "DELETE", "HEAD"]


# --- rewrite and strip_prefix ----------------------------------------------------------


def test_rewrite_rules_apply_in_order_to_the_public_paths(
    start_gateway: Start, alpha: Upstream
) -> None:
    routing = {
        "strategy": "service",
        "rewrite": [
            {"pattern": "^/accounts/users", "replacement": "/people"},
            {"pattern": "^/people/(.+)$", "replacement": "/people/by-id/$1"},
        ],
    }
    gateway = serve(start_gateway, users_manifest(alpha, routing=routing))

    assert gateway.get("/people/by-id/42").status_code == 200
    assert last_path(alpha) == "/users/42"
    assert gateway.get("/people").status_code == 200
    assert last_path(alpha) == "/users"
    assert gateway.get("/accounts/users/42").status_code == 404
    assert gateway.route_paths() == {"/people", "/people/by-id/{id}"}


def test_strip_prefix_true_forwards_the_services_own_path(
    start_gateway: Start, alpha: Upstream
) -> None:
    routing = {"strategy": "versioned", "strip_prefix": True}
    gateway = serve(start_gateway, users_manifest(alpha, routing=routing))

    assert gateway.get("/accounts/v2.1.0/users/9", params={"q": "1"}).status_code == 200
    assert last_path(alpha) == "/users/9"
    assert alpha.requests[-1]["query"] == "q=1"


def test_strip_prefix_false_forwards_the_public_path(start_gateway: Start, alpha: Upstream) -> None:
    routing = {"strategy": "versioned", "strip_prefix": False}
    gateway = serve(start_gateway, users_manifest(alpha, routing=routing))

    assert gateway.get("/accounts/v2.1.0/users/9").status_code == 200
    assert last_path(alpha) == "/accounts/v2.1.0/users/9"


def test_strip_prefix_false_with_a_rewrite_forwards_the_rewritten_public_path(
    start_gateway: Start, alpha: Upstream
) -> None:
    routing = {
        "strategy": "service",
        "strip_prefix": False,
        "rewrite": [{"pattern": "^/accounts/", "replacement": "/acct/"}],
    }
    gateway = serve(start_gateway, users_manifest(alpha, routing=routing))

    assert gateway.get("/acct/users/9").status_code == 200
    assert last_path(alpha) == "/acct/users/9"


# --- where routes come from ------------------------------------------------------------


def test_route_table_is_preferred_over_the_schema(start_gateway: Start, alpha: Upstream) -> None:
    manifest = users_manifest(
        alpha,
        routing={"strategy": "service"},
        route_table=[
            {"path": "/v2/profiles/{id}", "methods": ["GET", "PATCH"], "protocol": "http"},
            {"path": "/v2/health-report", "methods": ["get"]},
        ],
    )
    gateway = serve(start_gateway, manifest)

    assert gateway.request("PATCH", "/accounts/v2/profiles/5").status_code == 200
    assert last_path(alpha) == "/v2/profiles/5"
    assert gateway.get("/accounts/v2/health-report").status_code == 200
    assert gateway.get("/accounts/users/42").status_code == 404
    assert gateway.route_paths() == {"/accounts/v2/profiles/{id}", "/accounts/v2/health-report"}


ASYNCAPI = {
    "asyncapi": "3.0.0",
    "info": {"title": "live", "version": "1.0.0"},
    "servers": {
        "sockets": {"host": "svc.internal", "protocol": "ws"},
        "stream": {"host": "svc.internal", "protocol": "sse"},
    },
    "channels": {
        "chat": {"address": "/ws/chat/{room}", "servers": [{"$ref": "#/servers/sockets"}]},
        "ticker": {"address": "/events/ticker", "servers": [{"$ref": "#/servers/stream"}]},
    },
}


def test_asyncapi_ws_and_sse_channels_become_websocket_and_sse_routes(
    start_gateway: Start, alpha: Upstream
) -> None:
    manifest = make_manifest(
        "live",
        "live-1",
        alpha.address,
        [inline_schema("asyncapi", ASYNCAPI)],
        routing={"strategy": "service"},
        capabilities=["websocket", "sse"],
    )
    gateway = serve(start_gateway, manifest)

    kinds = {route.path: route.kind for route in gateway.gateway.table.routes}
    assert kinds == {"/live/ws/chat/{room}": "websocket", "/live/events/ticker": "sse"}
    assert gateway.metric("octopus_farp_routes_total", service="live", type="websocket") == 1
    assert gateway.metric("octopus_farp_routes_total", service="live", type="sse") == 1
    response = gateway.get("/live/events/ticker")
    assert response.status_code == 200
    assert last_path(alpha) == "/events/ticker"


def test_asyncapi_2_channels_take_the_protocol_of_their_servers(
    start_gateway: Start, alpha: Upstream
) -> None:
    document = {
        "asyncapi": "2.6.0",
        "info": {"title": "live", "version": "1.0.0"},
        "servers": {"socket": {"url": "ws://svc", "protocol": "ws"}},
        "channels": {"notifications": {"subscribe": {"message": {"payload": {}}}}},
    }
    manifest = make_manifest(
        "notify",
        "notify-1",
        alpha.address,
        [inline_schema("asyncapi", document)],
        routing={"strategy": "root"},
    )
    gateway = serve(start_gateway, manifest)

    assert {(r.path, r.kind) for r in gateway.gateway.table.routes} == {
        ("/notifications", "websocket")
    }


def test_a_graphql_schema_makes_the_graphql_endpoint_routable(
    start_gateway: Start, alpha: Upstream
) -> None:
    sdl = "type Query { user(id: ID!): User }\ntype User { id: ID! name: String }"
    manifest = make_manifest(
        "people",
        "people-1",
        alpha.address,
        [inline_schema("graphql", sdl)],
        routing={"strategy": "service"},
        endpoints={"health": "/health", "graphql": "/api/graphql"},
    )
    gateway = serve(start_gateway, manifest)

    response = gateway.request("POST", "/people/api/graphql", json={"query": "{ user(id: 1) }"})
    assert response.status_code == 200
    assert last_path(alpha) == "/api/graphql"
    assert gateway.get("/people/api/graphql", params={"query": "{__typename}"}).status_code == 200
    assert gateway.request("PUT", "/people/api/graphql").status_code == 405
    assert [r.kind for r in gateway.gateway.table.routes] == ["graphql"]


def test_graphql_defaults_to_slash_graphql(start_gateway: Start, alpha: Upstream) -> None:
    manifest = make_manifest(
        "gql",
        "gql-1",
        alpha.address,
        [inline_schema("graphql", "type Query { ok: Boolean }")],
        routing={"strategy": "root"},
    )
    gateway = serve(start_gateway, manifest)

    assert gateway.request("POST", "/graphql", json={"query": "{ ok }"}).status_code == 200
    assert last_path(alpha) == "/graphql"


CATALOG_YAML = """\
openapi: 3.0.3
info:
  title: Catalog
  version: "1.0"
  x-released: 2024-05-01
paths:
  /products/{sku}:
    get:
      operationId: getProduct
      responses:
        200:
          description: One product
  /products:
    post:
      operationId: addProduct
      responses:
        '201':
          description: Created
"""
# The same document as JSON, which is what the publisher hashed (keys and dates as strings).
CATALOG = {
    "openapi": "3.0.3",
    "info": {"title": "Catalog", "version": "1.0", "x-released": "2024-05-01"},
    "paths": {
        "/products/{sku}": {
            "get": {
                "operationId": "getProduct",
                "responses": {"200": {"description": "One product"}},
            }
        },
        "/products": {
            "post": {"operationId": "addProduct", "responses": {"201": {"description": "Created"}}}
        },
    },
}


def test_a_yaml_openapi_document_is_fetched_over_http_with_the_location_headers(
    start_gateway: Start, alpha: Upstream
) -> None:
    documents = {"/specs/catalog.yaml": ("application/yaml", CATALOG_YAML.encode())}
    schemas = SchemaServer(documents, token="s3cret")
    with ThreadedServer(schemas) as server:
        url = f"{server.url}/specs/catalog.yaml"
        descriptor = http_schema("openapi", CATALOG, url, headers={"X-Schema-Token": "s3cret"})
        descriptor["content_type"] = "application/yaml"
        manifest = make_manifest(
            "catalog", "catalog-1", alpha.address, [descriptor], routing={"strategy": "service"}
        )
        gateway = serve(start_gateway, manifest)

        assert gateway.get("/catalog/products/SKU-1").status_code == 200
        assert last_path(alpha) == "/products/SKU-1"
        assert gateway.request("POST", "/catalog/products").status_code == 200
        assert schemas.seen and schemas.seen[0].get("x-schema-token") == "s3cret"
        assert descriptor["hash"] == schema_hash(CATALOG)


# --- instances, weights and status -----------------------------------------------------


def spread(gateway: RunningGateway, path: str, count: int, *upstreams: Upstream) -> list[int]:
    for upstream in upstreams:
        upstream.clear()
    for _ in range(count):
        response = gateway.get(path)
        assert response.status_code == 200, response.text
    return [len(upstream.requests) for upstream in upstreams]


def test_instance_weights_spread_traffic_between_the_instances_of_a_service(
    start_gateway: Start, alpha: Upstream, beta: Upstream
) -> None:
    heavy = users_manifest(alpha, instance_id="a-1", weight=80, routing={"strategy": "service"})
    light = users_manifest(beta, instance_id="a-2", weight=20, routing={"strategy": "service"})
    gateway = serve(start_gateway, heavy, light)

    to_alpha, to_beta = spread(gateway, "/accounts/users/1", 500, alpha, beta)

    assert to_alpha + to_beta == 500
    assert abs(to_alpha - 400) <= 25, (to_alpha, to_beta)
    [upstream] = gateway.services()["upstreams"]
    assert sorted(e["weight"] for e in upstream["endpoints"]) == [20, 80]


def test_instances_without_a_weight_share_traffic_evenly(
    start_gateway: Start, alpha: Upstream, beta: Upstream
) -> None:
    one = users_manifest(alpha, instance_id="a-1", routing={"strategy": "service"})
    two = users_manifest(beta, instance_id="a-2", weight=0, routing={"strategy": "service"})
    gateway = serve(start_gateway, one, two)

    assert spread(gateway, "/accounts/users/1", 100, alpha, beta) == [50, 50]


@pytest.mark.parametrize("status", ["draining", "stopping", "unhealthy"])
def test_instances_that_are_not_serving_get_no_traffic(
    start_gateway: Start, alpha: Upstream, beta: Upstream, gamma: Upstream, status: str
) -> None:
    routing = {"strategy": "service"}
    gateway = serve(
        start_gateway,
        users_manifest(alpha, instance_id="a-1", status="healthy", routing=routing),
        users_manifest(beta, instance_id="a-2", status=status, routing=routing),
        users_manifest(gamma, instance_id="a-3", status="degraded", routing=routing),
    )

    to_alpha, to_beta, to_gamma = spread(gateway, "/accounts/users/1", 40, alpha, beta, gamma)

    assert to_beta == 0
    assert to_alpha == to_gamma == 20


def test_a_service_whose_every_instance_drains_answers_503_without_calling_it(
    start_gateway: Start, alpha: Upstream
) -> None:
    gateway = serve(
        start_gateway,
        users_manifest(alpha, status="draining", routing={"strategy": "service"}),
    )

    assert gateway.get("/accounts/users/1").status_code == 503
    assert alpha.requests == []


# --- conflicts -------------------------------------------------------------------------


ITEMS = (("/items", ["get", "post"]), "/items/{id}")


def claimant(
    upstream: Upstream, name: str, *, version: str, paths: Any = ITEMS, **routing: Any
) -> dict[str, Any]:
    """A root-mounted service claiming ``paths`` (GET+POST /items and GET /items/{id})."""
    document = openapi(*paths)
    return make_manifest(
        name,
        f"{name}-1",
        upstream.address,
        [inline_schema("openapi", document)],
        service_version=version,
        routing={"strategy": "root", **routing},
    )


def conflicts_by_key(gateway: RunningGateway) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["method"], c["path"]): c for c in gateway.routes()["conflicts"]}


def test_a_conflict_goes_to_the_higher_priority_and_is_listed(
    start_gateway: Start, alpha: Upstream, beta: Upstream
) -> None:
    low = claimant(alpha, "aaa-low", version="v9.0.0", priority=10, paths=["/items"])
    high = claimant(beta, "zzz-high", version="v1.0.0", priority=90)
    gateway = serve(start_gateway, low, high)

    assert gateway.get("/items").status_code == 200
    assert beta.paths == ["/items"] and alpha.paths == []
    conflicts = conflicts_by_key(gateway)
    assert set(conflicts) == {("GET", "/items")}
    assert conflicts["GET", "/items"] == {
        "method": "GET",
        "path": "/items",
        "host": None,
        "winner": "zzz-high",
        "losers": ["aaa-low"],
        "reason": "priority",
    }


def test_at_equal_priority_the_higher_semver_wins_not_the_longer_string(
    start_gateway: Start, alpha: Upstream, beta: Upstream
) -> None:
    older = claimant(alpha, "aaa-old", version="v1.9.0")
    newer = claimant(beta, "zzz-new", version="v1.10.0")
    gateway = serve(start_gateway, older, newer)

    assert gateway.get("/items/3").status_code == 200
    assert gateway.request("POST", "/items").status_code == 200
    assert beta.paths == ["/items/3", "/items"] and alpha.paths == []
    conflicts = conflicts_by_key(gateway)
    assert set(conflicts) == {("GET", "/items"), ("POST", "/items"), ("GET", "/items/{}")}
    assert {c["winner"] for c in conflicts.values()} == {"zzz-new"}
    assert {c["reason"] for c in conflicts.values()} == {"service_version"}


def test_a_loser_keeps_the_methods_nobody_else_claims(
    start_gateway: Start, alpha: Upstream, beta: Upstream
) -> None:
    winner = claimant(alpha, "winner", version="v1.0.0", priority=80, paths=["/items"])
    loser = claimant(beta, "loser", version="v1.0.0", priority=20)
    gateway = serve(start_gateway, winner, loser)

    assert gateway.get("/items").status_code == 200
    assert gateway.request("POST", "/items").status_code == 200
    assert gateway.get("/items/1").status_code == 200
    assert alpha.paths == ["/items"]
    assert beta.paths == ["/items", "/items/1"]
    assert set(conflicts_by_key(gateway)) == {("GET", "/items")}


def test_at_equal_priority_and_version_the_first_registered_wins(
    start_gateway: Start, alpha: Upstream, beta: Upstream, manifest_dir: Any
) -> None:
    gateway = start_gateway(file_config(manifest_dir)).wait_ready()
    # Registered first, and alphabetically last so that name order cannot explain a win.
    write_json(manifest_dir, "first.json", claimant(alpha, "zeta", version="v1.0.0"))
    gateway.wait_route("/items")
    write_json(manifest_dir, "second.json", claimant(beta, "alpha", version="v1.0.0"))
    eventually(lambda: conflicts_by_key(gateway), message="no conflict was listed")

    assert gateway.get("/items").status_code == 200
    assert alpha.paths == ["/items"] and beta.paths == []
    conflict = conflicts_by_key(gateway)["GET", "/items"]
    assert (conflict["winner"], conflict["losers"], conflict["reason"]) == (
        "zeta",
        ["alpha"],
        "first_registered",
    )


def test_routes_at_different_hosts_do_not_conflict(
    start_gateway: Start, alpha: Upstream, beta: Upstream
) -> None:
    plain = claimant(alpha, "plain", version="v1.0.0")
    hosted = claimant(beta, "hosted", version="v1.0.0", strategy="subdomain", subdomain="shop")
    gateway = serve(start_gateway, plain, hosted)

    assert gateway.routes()["conflicts"] == []
    assert gateway.get("/items", headers={"host": "shop.example.com"}).status_code == 200
    assert gateway.get("/items", headers={"host": "example.com"}).status_code == 200
    assert (alpha.paths, beta.paths) == (["/items"], ["/items"])


def test_a_path_the_router_cannot_compile_is_skipped_not_fatal(
    start_gateway: Start, alpha: Upstream, beta: Upstream
) -> None:
    broken = openapi("/files/{name}/{name}", "/ok")  # a repeated parameter name
    bad = users_manifest(
        alpha, service_name="odd", document=broken, routing={"strategy": "service"}
    )
    good = users_manifest(beta, service_name="fine", routing={"strategy": "service"})
    gateway = serve(start_gateway, bad, good)

    assert gateway.get("/fine/users/1").status_code == 200
    assert gateway.get("/odd/ok").status_code == 200
    assert "/odd/files/{name}/{name}" not in gateway.route_paths()


def test_an_unreachable_upstream_answers_502_and_others_keep_working(
    start_gateway: Start, alpha: Upstream
) -> None:
    dead = make_manifest(
        "dead",
        "dead-1",
        "127.0.0.1:9",
        [inline_schema("openapi", openapi("/ping"))],
        routing={"strategy": "service"},
    )
    gateway = serve(start_gateway, dead, users_manifest(alpha, routing={"strategy": "service"}))

    assert gateway.get("/dead/ping").status_code in (502, 503)
    assert gateway.get("/accounts/users/1").status_code == 200
