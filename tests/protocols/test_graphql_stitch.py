"""The combined GraphQL endpoint over FARP services (issue 6 item 5, stitching): each root
field goes to the service that publishes it, the answers merge into one response, and
root-field or type conflicts are resolved by FARP's rules and listed with the routes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.farp.publish import inline_schema, make_manifest
from tests.protocols.apps import GraphQLApp
from tests.protocols.conftest import Serve
from tests.support.gateway import GatewayServer
from tests.support.servers import ThreadedServer
from tests.support.waiting import eventually

USERS_SDL = """
type Query {
  user(id: ID!): User
  users: [User!]!
}
type Mutation {
  rename(id: ID!, name: String!): User
}
type User {
  id: ID!
  name: String
}
"""
ORDERS_SDL = """
schema { query: OrdersQuery mutation: OrdersMutation }
type OrdersQuery {
  orders(userId: ID!): [Order!]!
  order(id: ID!): Order
}
type OrdersMutation {
  cancel(id: ID!): Order
}
type Order {
  id: ID!
  total: Float
}
"""

#: Also serves ``user``, with the same User type as the users service.
ACCOUNTS_SDL = "type Query { user(id: ID!): User balance: Int } type User { id: ID! name: String }"
#: Serves ``user`` too, but its User is another type.
LEGACY_SDL = (
    "type Query { user(id: ID!): User legacyCount: Int } type User { id: ID! login: String }"
)


def _fail(**_: Any) -> Any:
    raise ValueError("no such order")


def users_app() -> GraphQLApp:
    return GraphQLApp(
        USERS_SDL,
        {
            "user": lambda id: {"id": id, "name": f"user {id}"},
            "users": [{"id": "1", "name": "user 1"}, {"id": "2", "name": "user 2"}],
            "rename": lambda id, name: {"id": id, "name": name},
        },
        "users",
    )


def orders_app() -> GraphQLApp:
    return GraphQLApp(
        ORDERS_SDL,
        {
            "orders": lambda userId: [{"id": f"o-{userId}", "total": 9.5}],
            "order": _fail,
            "cancel": lambda id: {"id": id, "total": 0.0},
        },
        "orders",
    )


def manifest(name: str, server: ThreadedServer, sdl: str, priority: int = 50) -> dict[str, Any]:
    return make_manifest(
        name,
        f"{name}-1",
        f"127.0.0.1:{server.port}",
        [inline_schema("graphql", sdl)],
        routing={"strategy": "service", "priority": priority},
        capabilities=["graphql"],
        endpoints={"health": "/health", "graphql": "/graphql"},
    )


def farp_config(*manifests: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "discovery": {"backend": "static", "static": {"manifests": list(manifests)}},
        "farp": {"watch_interval": "100ms"},
        "routing": {"retries": 0},
        "observability": {"logging": {"access_log": False}},
        **sections,
    }


def combined_ready(gateway: GatewayServer) -> bool:
    return any(r.source == "graphql:combined" for r in gateway.gateway.table.routes)


Start = Callable[..., tuple[GatewayServer, GraphQLApp, GraphQLApp]]


@pytest.fixture
def stitched(serve: Serve, make_gateway: Callable[..., GatewayServer]) -> Iterator[Start]:
    def start(**sections: Any) -> tuple[GatewayServer, GraphQLApp, GraphQLApp]:
        users, orders = users_app(), orders_app()
        config = farp_config(
            manifest("users", serve(users), USERS_SDL),
            manifest("orders", serve(orders), ORDERS_SDL),
            **sections,
        )
        gateway = make_gateway(config)
        eventually(lambda: combined_ready(gateway), timeout=10)
        return gateway, users, orders

    yield start


def post(gateway: GatewayServer, query: str) -> httpx.Response:
    with gateway.client() as client:
        return client.post("/graphql", json={"query": query})


def test_a_query_across_two_services_returns_merged_data(stitched: Start) -> None:
    gateway, users, orders = stitched()
    query = """
      query Dashboard($id: ID!) {
        user(id: $id) { ...Who }
        ... on Query { orders(userId: $id) { id total } }
        __typename
      }
      fragment Who on User { id name }
    """
    with gateway.client() as client:
        response = client.post(
            "/graphql",
            json={"query": query, "variables": {"id": "7"}, "operationName": "Dashboard"},
            headers={"authorization": "Bearer token-1"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] == {
        "user": {"id": "7", "name": "user 7"},
        "orders": [{"id": "o-7", "total": 9.5}],
        "__typename": "Query",
    }
    assert list(body["data"]) == ["user", "orders", "__typename"]  # the query's order
    assert "errors" not in body
    [to_users] = users.received
    [to_orders] = orders.received
    # Each service got only its own root fields, with the fragments and variables used.
    assert "orders" not in to_users["query"] and "fragment Who on User" in to_users["query"]
    assert "user(" not in to_orders["query"] and "fragment" not in to_orders["query"]
    assert to_users["variables"] == to_orders["variables"] == {"id": "7"}
    assert to_users["operationName"] == "Dashboard"
    # Sent to each service's own endpoints.graphql, with the client's credentials.
    assert to_users["path"] == to_orders["path"] == "/graphql"
    assert to_users["headers"]["authorization"] == "Bearer token-1"


def test_service_errors_are_concatenated_with_their_path(stitched: Start) -> None:
    gateway, _, _ = stitched()
    response = post(gateway, '{ users { id } order(id: "x") { id } }')
    body = response.json()
    assert body["data"] == {"users": [{"id": "1"}, {"id": "2"}], "order": None}
    [error] = body["errors"]
    assert error["message"] == "no such order"
    assert error["path"] == ["order"]
    assert error["extensions"]["service"] == "orders"


def test_an_unreachable_service_fails_only_its_fields(
    serve: Serve, make_gateway: Callable[..., GatewayServer]
) -> None:
    orders_server = ThreadedServer(orders_app()).start()
    config = farp_config(
        manifest("users", serve(users_app()), USERS_SDL),
        manifest("orders", orders_server, ORDERS_SDL),
    )
    gateway = make_gateway(config)
    eventually(lambda: combined_ready(gateway), timeout=10)
    orders_server.stop()
    body = post(gateway, '{ user(id: "1") { name } orders(userId: "1") { id } }').json()
    assert body["data"] == {"user": {"name": "user 1"}, "orders": None}
    [error] = body["errors"]
    assert error["path"] == ["orders"]
    assert error["extensions"] == {"code": "UPSTREAM_ERROR", "service": "orders"}


def test_invalid_operations_are_refused_against_the_combined_schema(stitched: Start) -> None:
    gateway, users, orders = stitched()
    response = post(gateway, "{ users { id } nope }")
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "nope" in error["message"]
    assert users.received == orders.received == []


def test_mutations_go_to_one_service(stitched: Start) -> None:
    gateway, users, orders = stitched()
    response = post(gateway, 'mutation { rename(id: "1", name: "ann") { name } }')
    assert response.json() == {"data": {"rename": {"name": "ann"}}}
    assert len(users.received) == 1 and orders.received == []
    response = post(
        gateway, 'mutation { rename(id: "1", name: "x") { name } cancel(id: "2") { id } }'
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["extensions"]["code"] == "MUTATION_SPANS_SERVICES"


def test_introspection_and_policy_apply_to_the_combined_endpoint(stitched: Start) -> None:
    gateway, users, _ = stitched(graphql={"max_depth": 1})
    body = post(gateway, "{ __schema { queryType { name fields { name } } } }").json()
    fields = {f["name"] for f in body["data"]["__schema"]["queryType"]["fields"]}
    assert fields == {"user", "users", "orders", "order"}
    mutation = post(gateway, "{ __schema { mutationType { fields { name } } } }").json()
    assert {f["name"] for f in mutation["data"]["__schema"]["mutationType"]["fields"]} == {
        "rename",
        "cancel",
    }
    # The top-level graphql defaults are the combined endpoint's policy.
    too_deep = post(gateway, "{ users { id } }")
    assert too_deep.status_code == 400
    assert too_deep.json()["errors"][0]["extensions"]["code"] == "MAX_DEPTH_EXCEEDED"
    assert users.received == []
    assert post(gateway, "{ __typename }").json()["data"] == {"__typename": "Query"}


def test_each_service_keeps_its_own_endpoint(stitched: Start) -> None:
    gateway, users, _ = stitched()
    with gateway.client() as client:
        response = client.post("/users/graphql", json={"query": "{ users { id } }"})
    assert response.json() == {"data": {"users": [{"id": "1"}, {"id": "2"}]}}
    assert users.received[-1]["query"] == "{ users { id } }"


def test_root_field_and_type_conflicts_are_resolved_and_listed(
    serve: Serve, make_gateway: Callable[..., GatewayServer]
) -> None:
    accounts = GraphQLApp(
        ACCOUNTS_SDL,
        {"user": lambda id: {"id": id, "name": "from accounts"}, "balance": 42},
        "accounts",
    )
    legacy = GraphQLApp(
        LEGACY_SDL, {"user": lambda id: {"id": id, "login": "old"}, "legacyCount": 3}, "legacy"
    )
    users = users_app()
    config = farp_config(
        manifest("users", serve(users), USERS_SDL, priority=50),
        manifest("accounts", serve(accounts), ACCOUNTS_SDL, priority=70),
        manifest("legacy", serve(legacy), LEGACY_SDL, priority=40),
    )
    gateway = make_gateway(config)
    eventually(lambda: combined_ready(gateway), timeout=10)

    body = post(gateway, '{ user(id: "1") { name } users { id } balance legacyCount }').json()
    assert body == {
        "data": {
            "user": {"name": "from accounts"},  # priority 70 beats 50
            "users": [{"id": "1"}, {"id": "2"}],
            "balance": 42,
            "legacyCount": 3,
        }
    }
    assert users.received[-1]["query"].count("user") == 1  # only `users`
    with gateway.client() as client:
        conflicts = client.get("/_/routes").json()["conflicts"]
    graphql = [c for c in conflicts if c.get("kind") == "graphql"]
    by_subject = {c.get("field") or c.get("type"): c for c in graphql}
    assert by_subject["Query.user"]["winner"] == "accounts"
    assert by_subject["Query.user"]["losers"] == ["users"]
    assert by_subject["Query.user"]["reason"] == "priority"
    assert by_subject["Query.user"]["path"] == "/graphql"
    # legacy's User differs: accounts' definition wins and legacy's `user` is dropped
    # (it would return a User the combined schema describes differently).
    assert by_subject["User"]["winner"] == "accounts"
    assert by_subject["User"]["losers"] == ["legacy"]
    assert len(graphql) == 2


def test_introspection_results_are_accepted_as_schemas(
    serve: Serve, make_gateway: Callable[..., GatewayServer]
) -> None:
    from graphql import build_schema, introspection_from_schema

    introspected = introspection_from_schema(build_schema(ORDERS_SDL))
    config = farp_config(
        manifest("users", serve(users_app()), USERS_SDL),
        manifest_with("orders", serve(orders_app()), introspected),
    )
    gateway = make_gateway(config)
    eventually(lambda: combined_ready(gateway), timeout=10)
    body = post(gateway, '{ users { id } orders(userId: "2") { total } }').json()
    assert body == {"data": {"users": [{"id": "1"}, {"id": "2"}], "orders": [{"total": 9.5}]}}


def manifest_with(name: str, server: ThreadedServer, document: Any) -> dict[str, Any]:
    return make_manifest(
        name,
        f"{name}-1",
        f"127.0.0.1:{server.port}",
        [inline_schema("graphql", document)],
        routing={"strategy": "service"},
        endpoints={"health": "/health", "graphql": "/graphql"},
    )


def test_a_static_route_on_the_path_keeps_it(
    serve: Serve, make_gateway: Callable[..., GatewayServer]
) -> None:
    other = serve(users_app())
    config = farp_config(
        manifest("users", serve(users_app()), USERS_SDL),
        manifest("orders", serve(orders_app()), ORDERS_SDL),
        upstreams={"mine": {"endpoints": [{"url": other.url}]}},
        routes=[{"name": "mine", "match": {"path": "/graphql"}, "upstream": "mine"}],
    )
    gateway = make_gateway(config)

    def claimed() -> list[dict[str, Any]]:
        with gateway.client() as client:
            conflicts = client.get("/_/routes").json()["conflicts"]
        return [c for c in conflicts if c.get("reason") == "path_claimed"]

    [conflict] = eventually(claimed, timeout=10)
    assert conflict["winner"] == "mine"
    assert not combined_ready(gateway)
