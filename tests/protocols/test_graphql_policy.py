"""GraphQL policies (issue 6 item 5): depth, aliases, complexity and introspection limits,
persisted queries, and errors in GraphQL's own shape. The measuring functions first,
then a real gateway in front of a real graphql-core server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.graphql.policy import (
    GraphQLPolicy,
    GraphQLRequest,
    PersistedQueryCache,
    PolicyViolation,
    check_request,
    measure,
    parse_query,
)
from tests.protocols.apps import GraphQLApp
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.servers import ThreadedServer

SDL = """
type Query {
  me: User
  user(id: ID!): User
  users(first: Int): [User!]!
}
type User {
  id: ID!
  name: String
  friends(first: Int): [User!]!
}
"""
ALICE = {"id": "1", "name": "alice", "friends": [{"id": "2", "name": "bob", "friends": []}]}


def shape(query: str, variables: dict[str, Any] | None = None, **options: Any) -> Any:
    return measure(parse_query(query), variables, **options)


# --- measuring -----------------------------------------------------------------------


def test_depth_counts_nested_fields_through_fragments() -> None:
    assert shape("{ me { id } }").depth == 2
    query = """
      { me { ...F } }
      fragment F on User { friends { ...G } }
      fragment G on User { friends { id } }
    """
    assert shape(query).depth == 4


def test_aliases_count_every_place_a_fragment_is_spread() -> None:
    query = """
      { a: me { ...F } b: me { ...F } }
      fragment F on User { x: id y: name }
    """
    assert shape(query).aliases == 2 + 2 * 2


def test_complexity_counts_fields_and_optionally_multiplies_lists() -> None:
    query = "query($n: Int) { users(first: 10) { id friends(first: $n) { id } } }"
    assert shape(query).complexity == 4
    # 1 + 10 * (id + friends(1 + 5 * id))
    assert shape(query, {"n": 5}, list_multipliers=True).complexity == 1 + 10 * (1 + 1 + 5)


def test_introspection_is_detected_anywhere() -> None:
    assert shape("{ __schema { types { name } } }").introspection
    assert shape('{ me { id } __type(name: "User") { name } }').introspection
    assert not shape("{ me { __typename id } }").introspection


def test_a_fragment_cycle_is_refused_not_followed() -> None:
    query = "{ me { ...A } } fragment A on User { friends { ...B } } fragment B on User { ...A }"
    with pytest.raises(PolicyViolation) as caught:
        shape(query)
    assert caught.value.code == "GRAPHQL_VALIDATION_FAILED"
    assert "cycle" in caught.value.message


def test_fragment_bombs_are_measured_in_linear_time() -> None:
    # Each level doubles the expansion: 2**40 fields if expanded naively.
    levels = 40
    fragments = [f"fragment F{i} on User {{ ...F{i + 1} ...F{i + 1} }}" for i in range(levels)]
    fragments.append(f"fragment F{levels} on User {{ id }}")
    found = shape("{ me { ...F0 } } " + " ".join(fragments))
    assert found.complexity == 1 + 2**levels


def test_syntax_errors_are_reported_with_their_location() -> None:
    with pytest.raises(PolicyViolation) as caught:
        parse_query("{ me { id }")
    assert caught.value.code == "GRAPHQL_PARSE_FAILED"
    assert caught.value.error()["locations"] == [{"line": 1, "column": 12}]


def test_apq_hash_only_requests_use_the_checked_text() -> None:
    policy = GraphQLPolicy(max_depth=2)
    cache = PersistedQueryCache()
    query = "{ me { id } }"
    digest = hashlib.sha256(query.encode()).hexdigest()
    apq = {"persistedQuery": {"version": 1, "sha256Hash": digest}}
    with pytest.raises(PolicyViolation) as caught:
        check_request(policy, GraphQLRequest(None, extensions=apq), cache)
    assert caught.value.code == "PERSISTED_QUERY_NOT_FOUND"
    check_request(policy, GraphQLRequest(query, extensions=apq), cache)
    assert check_request(policy, GraphQLRequest(None, extensions=apq), cache).query == query
    with pytest.raises(PolicyViolation) as caught:
        check_request(policy, GraphQLRequest("{ me { name } }", extensions=apq), cache)
    assert caught.value.code == "PERSISTED_QUERY_HASH_MISMATCH"


# --- through the gateway ------------------------------------------------------------

DEEP = "{ me { friends { friends { friends { id } } } } }"  # depth 5
PASSING = "{ me { id name friends { name } } }"  # depth 3, 5 fields
ALLOWED = "{ me { id } }"
ALLOWED_HASH = hashlib.sha256(ALLOWED.encode()).hexdigest()
DEEP_HASH = hashlib.sha256(DEEP.encode()).hexdigest()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[GraphQLApp, ThreadedServer]]:
    app = GraphQLApp(SDL, {"me": ALICE, "user": lambda id: {**ALICE, "id": id}})
    with ThreadedServer(app) as server:
        yield app, server


@pytest.fixture(scope="module")
def gateway(upstream: tuple[GraphQLApp, ThreadedServer]) -> Iterator[GatewayServer]:
    _, server = upstream
    config = gateway_config(
        {"gql": server.url},
        [
            route(
                "limited",
                "/graphql",
                "gql",
                graphql={
                    "max_depth": 4,
                    "max_aliases": 2,
                    "max_complexity": 12,
                    "introspection": False,
                    "max_body_size": "4KiB",
                },
            ),
            route(
                "persisted",
                "/persisted",
                "gql",
                rewrite=[{"pattern": "^/persisted$", "replacement": "/graphql"}],
                graphql={"persisted_queries": {"allow_list": [ALLOWED_HASH], "only": True}},
            ),
            route(
                "trusted",
                "/trusted",
                "gql",
                graphql={"max_depth": 2, "persisted_queries": {"allow_list": [DEEP_HASH]}},
            ),
            route("open", "/open", "gql", graphql={}),
            route("plain", "/plain", "gql"),
        ],
        graphql={"max_depth": 3},
        observability={"logging": {"access_log": False}},
    )
    with GatewayServer(config) as server:
        yield server


@pytest.fixture
def client(
    gateway: GatewayServer, upstream: tuple[GraphQLApp, ThreadedServer]
) -> Iterator[httpx.Client]:
    upstream[0].received.clear()
    with gateway.client() as c:
        yield c


@pytest.fixture
def received(upstream: tuple[GraphQLApp, ThreadedServer]) -> list[dict[str, Any]]:
    return upstream[0].received


def refused(response: httpx.Response, code: str, status: int = 400) -> dict[str, Any]:
    """The single GraphQL error of a refusal, checked for shape and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"errors", "extensions"}
    [error] = body["errors"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["extensions"]["code"] == code
    return error


def test_a_query_within_the_limits_is_forwarded(
    client: httpx.Client, received: list[dict[str, Any]]
) -> None:
    response = client.post("/graphql", json={"query": PASSING})
    assert response.status_code == 200
    assert response.json() == {
        "data": {"me": {"id": "1", "name": "alice", "friends": [{"name": "bob"}]}}
    }
    assert [r["query"] for r in received] == [PASSING]


def test_too_deep_is_refused_before_the_upstream(
    client: httpx.Client, received: list[dict[str, Any]]
) -> None:
    error = refused(client.post("/graphql", json={"query": DEEP}), "MAX_DEPTH_EXCEEDED")
    assert error["extensions"]["limit"] == 4
    assert error["extensions"]["actual"] == 5
    assert received == []


def test_too_many_aliases_is_refused(client: httpx.Client) -> None:
    query = "{ a: me { id } b: me { id } c: me { id } }"
    refused(client.post("/graphql", json={"query": query}), "MAX_ALIASES_EXCEEDED")


def test_too_complex_is_refused(client: httpx.Client) -> None:
    query = (
        "{ me { id name friends { id name friends { id name } } } x: me { id name } y: me { id } }"
    )
    error = refused(client.post("/graphql", json={"query": query}), "MAX_COMPLEXITY_EXCEEDED")
    assert error["extensions"]["actual"] > 12


def test_introspection_off_is_refused(client: httpx.Client) -> None:
    response = client.post("/graphql", json={"query": "{ __schema { queryType { name } } }"})
    refused(response, "INTROSPECTION_DISABLED")
    # __typename is not introspection of the schema.
    response = client.post("/graphql", json={"query": "{ me { __typename } }"})
    assert response.json() == {"data": {"me": {"__typename": "User"}}}


def test_get_requests_are_checked_too(client: httpx.Client) -> None:
    refused(client.get("/graphql", params={"query": DEEP}), "MAX_DEPTH_EXCEEDED")
    response = client.get("/graphql", params={"query": ALLOWED})
    assert response.json() == {"data": {"me": {"id": "1"}}}


def test_unset_route_keys_take_the_top_level_defaults(client: httpx.Client) -> None:
    """``/open`` has ``graphql: {}``: the top-level ``graphql.max_depth: 3`` applies."""
    refused(
        client.post("/open", json={"query": "{ me { friends { friends { id } } } }"}),
        "MAX_DEPTH_EXCEEDED",
    )
    assert client.post("/open", json={"query": PASSING}).status_code == 200
    # A route without a graphql key is not a GraphQL route: nothing is checked.
    assert client.post("/plain", json={"query": DEEP}).status_code == 200


def test_malformed_requests_get_graphql_errors(client: httpx.Client) -> None:
    refused(client.post("/graphql", json={"query": "{ me { id }"}), "GRAPHQL_PARSE_FAILED")
    refused(
        client.post("/graphql", content=b"{not json", headers={"content-type": "application/json"}),
        "BAD_REQUEST",
    )
    refused(client.post("/graphql", json={"variables": {}}), "BAD_REQUEST")
    query = "{ me { ...A } } fragment A on User { ...A }"
    refused(client.post("/graphql", json={"query": query}), "GRAPHQL_VALIDATION_FAILED")


def test_application_graphql_bodies_and_batches_are_checked(
    client: httpx.Client, received: list[dict[str, Any]]
) -> None:
    response = client.post(
        "/graphql", content=DEEP.encode(), headers={"content-type": "application/graphql"}
    )
    refused(response, "MAX_DEPTH_EXCEEDED")
    batch = [{"query": ALLOWED}, {"query": DEEP}]
    refused(client.post("/graphql", json=batch), "MAX_DEPTH_EXCEEDED")
    assert received == []


def test_a_body_over_the_limit_gets_413(client: httpx.Client) -> None:
    padding = " " * 5000
    response = client.post("/graphql", json={"query": ALLOWED + padding})
    refused(response, "PAYLOAD_TOO_LARGE", 413)


def test_allow_list_only_runs_listed_queries(
    client: httpx.Client, received: list[dict[str, Any]]
) -> None:
    response = client.post("/persisted", json={"query": ALLOWED})
    assert response.json() == {"data": {"me": {"id": "1"}}}
    refused(client.post("/persisted", json={"query": PASSING}), "PERSISTED_QUERY_NOT_ALLOWED")
    hash_only = {"persistedQuery": {"version": 1, "sha256Hash": "0" * 64}}
    refused(
        client.post("/persisted", json={"extensions": hash_only}), "PERSISTED_QUERY_NOT_ALLOWED"
    )
    assert [r["query"] for r in received] == [ALLOWED]


def test_allow_listed_queries_skip_the_limits(
    client: httpx.Client, received: list[dict[str, Any]]
) -> None:
    """``/trusted`` allows depth 2, but lists DEEP (depth 5) as a trusted operation."""
    response = client.post("/trusted", json={"query": DEEP})
    assert response.status_code == 200
    assert response.json()["data"]["me"]["friends"][0]["friends"] == []
    refused(client.post("/trusted", json={"query": PASSING}), "MAX_DEPTH_EXCEEDED")
    assert [r["query"] for r in received] == [DEEP]


def test_apq_round_trip_through_the_gateway(
    client: httpx.Client, received: list[dict[str, Any]]
) -> None:
    query = "{ me { name } }"
    digest = hashlib.sha256(query.encode()).hexdigest()
    extensions = {"persistedQuery": {"version": 1, "sha256Hash": digest}}
    # 1. The hash alone: unknown to the gateway, which asks for the text (APQ's protocol).
    first = client.post("/graphql", json={"extensions": extensions})
    refused(first, "PERSISTED_QUERY_NOT_FOUND", 200)
    assert received == []
    # 2. Text and hash: checked, forwarded, remembered (by the upstream too).
    second = client.post("/graphql", json={"query": query, "extensions": extensions})
    assert second.json() == {"data": {"me": {"name": "alice"}}}
    # 3. The hash alone again, now as a GET: checked against the known text, forwarded.
    third = client.get("/graphql", params={"extensions": json.dumps(extensions)})
    assert third.json() == {"data": {"me": {"name": "alice"}}}
    assert [r["query"] for r in received] == [query, None]
    # A hash-only request whose known text breaks the limits is refused like the text.
    deep_ext = {"persistedQuery": {"version": 1, "sha256Hash": DEEP_HASH}}
    refused(
        client.post("/open", json={"query": DEEP, "extensions": deep_ext}), "MAX_DEPTH_EXCEEDED"
    )
    refused(client.post("/open", json={"extensions": deep_ext}), "PERSISTED_QUERY_NOT_FOUND", 200)


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"graphql": {"persisted_queries": {"allow_list": ["abc"]}}},
            "graphql.persisted_queries.allow_list: not SHA-256 hex digests: 'abc'",
        ),
        ({"graphql": {"combined_path": "/g/{x}"}}, "graphql.combined_path: must be a literal"),
        ({"graphql": {"max_dept": 3}}, "graphql.max_dept: unknown key"),
        (
            {
                "upstreams": {"u": {"endpoints": [{"url": "http://127.0.0.1:1"}]}},
                "routes": [
                    {
                        "name": "g",
                        "match": {"path": "/g"},
                        "upstream": "u",
                        "graphql": {"max_depth": 0},
                    }
                ],
            },
            "routes[0].graphql.max_depth: input should be greater than or equal to 1",
        ),
    ],
)
def test_graphql_settings_are_validated(section: dict[str, Any], message: str) -> None:
    from settings import ConfigError, load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings(section)
    assert message in str(caught.value)
