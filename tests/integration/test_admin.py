"""The admin plane under ``/_/`` on the data port, and the Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import bcrypt
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import GatewayServer, MakeGateway, gateway_config, route
from tests.support.upstream import UpstreamApp, UpstreamServer
from tests.support.waiting import eventually

TOKEN = "farp-registration-s3cret"
PASSWORD = b"admin-pw"


def config(upstream_url: str, farp_enabled: bool = False, **sections: Any) -> dict[str, Any]:
    return gateway_config(
        {"users": upstream_url},
        [
            route("users", "/users/{id}", "users", methods=["GET"]),
            route("orders", "/orders/{rest:path}", "users", host="shop.example", priority=3),
        ],
        farp={"enabled": farp_enabled, "registration_token": TOKEN},
        **sections,
    )


@pytest.fixture(scope="module")
def gw(upstream_server: UpstreamServer) -> Iterator[GatewayServer]:
    with GatewayServer(config(upstream_server.url)) as server:
        yield server


@pytest.fixture(scope="module")
def password_hash() -> str:
    return bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def guarded_gw(upstream_server: UpstreamServer, password_hash: str) -> Iterator[GatewayServer]:
    auth = {"type": "basic", "username": "admin", "password_hash": password_hash}
    with GatewayServer(config(upstream_server.url, admin={"auth": auth})) as server:
        yield server


@pytest.fixture
def client(gw: GatewayServer) -> Iterator[httpx.Client]:
    with gw.client() as client:
        yield client


def samples(client: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``/metrics`` by (name, labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def test_health_answers_ok(client: httpx.Client) -> None:
    response = client.get("/_/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_ready_answers_ok_once_started(client: httpx.Client) -> None:
    response = client.get("/_/ready")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_ready_turns_ok_once_discovery_has_synced(
    make_gateway: MakeGateway, upstream_server: UpstreamServer
) -> None:
    gw = make_gateway(config(upstream_server.url, farp_enabled=True))
    with gw.client() as client:
        eventually(lambda: client.get("/_/ready").status_code == 200, timeout=5)


def test_routes_lists_every_route_in_the_documented_shape(client: httpx.Client) -> None:
    document = client.get("/_/routes").json()
    assert set(document) == {"routes", "conflicts"}
    assert document["conflicts"] == []
    by_name = {r["name"]: r for r in document["routes"]}
    assert list(by_name) == ["users", "orders"]
    for entry in document["routes"]:
        assert set(entry) == {"name", "source", "methods", "host", "path", "upstream", "priority"}
    users = by_name["users"]
    assert users["source"] == "static"
    assert users["path"] == "/users/{id}"
    assert users["upstream"] == "users"
    assert "GET" in users["methods"]
    assert users["host"] is None
    assert by_name["orders"]["host"] == "shop.example"
    assert by_name["orders"]["priority"] == 3


def test_services_lists_upstreams_and_endpoints_in_the_documented_shape(
    client: httpx.Client, upstream_server: UpstreamServer
) -> None:
    document = client.get("/_/services").json()
    assert set(document) == {"upstreams", "discovery"}
    assert isinstance(document["discovery"], list)
    (users,) = document["upstreams"]
    assert set(users) == {"name", "load_balance", "endpoints"}
    assert users["name"] == "users"
    assert users["load_balance"] == "round-robin"
    (endpoint,) = users["endpoints"]
    assert set(endpoint) == {
        "url",
        "address",
        "weight",
        "healthy",
        "breaker",
        "in_flight",
        "ewma_ms",
        "ejected",
    }
    assert endpoint["url"] == upstream_server.url
    assert endpoint["address"] == f"127.0.0.1:{upstream_server.port}"
    assert endpoint["healthy"] is True
    assert endpoint["breaker"] in ("closed", "open", "half-open")
    assert endpoint["ejected"] is False


def test_config_shows_the_running_configuration_with_secrets_redacted(
    client: httpx.Client,
) -> None:
    response = client.get("/_/config")
    assert response.status_code == 200
    document = response.json()
    assert document["farp"]["registration_token"] == "***"
    assert TOKEN not in response.text
    assert [r["name"] for r in document["routes"]] == ["users", "orders"]


def test_config_redacts_the_admin_password_hash(
    guarded_gw: GatewayServer, password_hash: str
) -> None:
    with guarded_gw.client(auth=("admin", PASSWORD.decode())) as client:
        response = client.get("/_/config")
    assert response.status_code == 200
    assert response.json()["admin"]["auth"]["password_hash"] == "***"
    assert password_hash not in response.text


def test_requests_are_counted_by_route_template_never_raw_path(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    key = ("octopus_requests_total", labels(method="GET", route="/users/{id}", status="200"))
    before = samples(client).get(key, 0.0)
    for user in ("1", "2", "3"):
        assert client.get(f"/users/{user}").status_code == 200
    after = samples(client)
    assert after[key] == before + 3
    routes_seen = {dict(lbls).get("route") for _, lbls in after}
    assert not routes_seen & {"/users/1", "/users/2", "/users/3"}


def test_unmatched_requests_share_one_route_label(client: httpx.Client) -> None:
    for path in ("/nope/1", "/nope/2"):
        assert client.get(path).status_code == 404
    found = samples(client)
    unmatched = [
        dict(lbls)
        for name, lbls in found
        if name == "octopus_requests_total" and dict(lbls)["status"] == "404"
    ]
    assert [entry["route"] for entry in unmatched] == ["unmatched"]


def test_request_durations_are_a_histogram_by_route_template(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/users/42")
    found = samples(client)
    buckets = {
        dict(lbls)["le"]: value
        for (name, lbls), value in found.items()
        if name == "octopus_request_duration_seconds_bucket"
        and dict(lbls)["route"] == "/users/{id}"
    }
    assert len(buckets) > 5 and "+Inf" in buckets
    count = found[
        ("octopus_request_duration_seconds_count", labels(method="GET", route="/users/{id}"))
    ]
    assert buckets["+Inf"] == count >= 1


def test_upstream_requests_are_counted_by_upstream_and_status(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    key = ("octopus_upstream_requests_total", labels(upstream="users", status="200"))
    before = samples(client).get(key, 0.0)
    client.get("/users/7")
    assert samples(client)[key] == before + 1


def test_active_connections_is_exported_and_back_to_zero_when_idle(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/users/1")
    assert samples(client)[("octopus_active_connections", frozenset())] == 0


def test_admin_endpoints_require_credentials_when_auth_is_configured(
    guarded_gw: GatewayServer,
) -> None:
    with guarded_gw.client() as client:
        response = client.get("/_/routes")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].lower().startswith("basic")


def test_admin_endpoints_refuse_a_wrong_password(guarded_gw: GatewayServer) -> None:
    with guarded_gw.client(auth=("admin", "wrong")) as client:
        assert client.get("/_/routes").status_code == 401


def test_admin_endpoints_answer_with_the_right_credentials(guarded_gw: GatewayServer) -> None:
    with guarded_gw.client(auth=("admin", PASSWORD.decode())) as client:
        response = client.get("/_/routes")
        again = client.get("/_/services")
    assert response.status_code == 200
    assert [r["name"] for r in response.json()["routes"]] == ["users", "orders"]
    assert again.status_code == 200


@pytest.mark.parametrize("path", ["/_/health", "/_/ready"])
def test_probes_stay_open_when_auth_is_configured(guarded_gw: GatewayServer, path: str) -> None:
    with guarded_gw.client() as client:
        assert client.get(path).status_code == 200


def test_admin_auth_does_not_apply_to_proxied_traffic(
    guarded_gw: GatewayServer, upstream: UpstreamApp
) -> None:
    with guarded_gw.client() as client:
        assert client.get("/users/9").status_code == 200
    assert upstream.paths == ["/users/9"]
