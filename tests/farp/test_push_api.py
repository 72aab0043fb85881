"""The FARP push API (FARP.md §6) against a real gateway and real upstreams.

One gateway (token and admin basic auth both configured, ``heartbeat_timeout: 300ms``)
serves the module; every test registers instances under its own names so the tests
do not see each other's state. Waits are polls with a deadline; the only sleeps are
the heartbeat cadence itself.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import bcrypt
import httpx
import pytest

from gateway.asgi import create_app
from gateway.farp.publish import inline_schema, make_manifest
from gateway.types import Receive, Scope, Send
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamServer
from tests.support.waiting import eventually

TOKEN = "tok"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
USER = "admin"
PASSWORD = "s3cret"
HEARTBEAT_TIMEOUT = 0.3


def openapi(*paths: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "pushed", "version": "1"},
        "paths": {p: {"get": {"responses": {"200": {"description": "ok"}}}} for p in paths},
    }


def manifest(service: str, instance_id: str, port: int, *paths: str) -> dict[str, Any]:
    """A valid manifest mounting ``paths`` under ``/{instance_id}``."""
    return make_manifest(
        service,
        instance_id,
        f"127.0.0.1:{port}",
        [inline_schema("openapi", openapi(*(paths or ("/hello",))))],
        routing={"strategy": "instance"},
    )


def registration(
    service: str,
    instance_id: str,
    port: int,
    document: dict[str, Any] | None,
    **instance: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": instance_id,
        "service_name": service,
        "version": "v1.0.0",
        "address": "127.0.0.1",
        "port": port,
        "status": "healthy",
        "tags": ["test"],
        "metadata": {},
    }
    body.update(instance)
    return {"instance": body, "manifest": document}


class ManifestHost:
    """An instance that serves its own manifest (at ``/_farp/manifest`` or wherever
    ``manifest_path`` says) and answers every other path with 200 and the path."""

    def __init__(self, manifest_path: str = "/_farp/manifest") -> None:
        self.manifest_path = manifest_path
        self.document: dict[str, Any] = {}
        self.manifest_fetches = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == self.manifest_path:
            with self._lock:
                self.manifest_fetches += 1
            body = json.dumps(self.document).encode()
        else:
            body = json.dumps({"path": scope["path"]}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def config(**farp: Any) -> dict[str, Any]:
    return {
        "discovery": {
            "backend": "static",
            "static": {"manifests": [manifest("static-svc", "static-1", 9, "/static")]},
        },
        "farp": {"heartbeat_timeout": "300ms", **farp},
    }


def serve_gateway(settings: dict[str, Any]) -> ThreadedServer:
    server = ThreadedServer(create_app(settings, serve_admin=True)).start()
    eventually(
        lambda: httpx.get(f"{server.url}/_/ready").status_code == 200,
        message="gateway never became ready",
    )
    return server


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("pushed") as server:
        yield server


@pytest.fixture(scope="module")
def gateway() -> Iterator[ThreadedServer]:
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    settings = config(registration_token=TOKEN)
    settings["admin"] = {"auth": {"username": USER, "password_hash": password_hash}}
    server = serve_gateway(settings)
    yield server
    server.stop()


@pytest.fixture
def client(gateway: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=BEARER, timeout=10) as http:
        yield http


@pytest.fixture
def host() -> Iterator[tuple[ManifestHost, ThreadedServer]]:
    app = ManifestHost()
    with ThreadedServer(app) as server:
        yield app, server


def register(client: httpx.Client, body: dict[str, Any], **options: Any) -> httpx.Response:
    return client.post("/_farp/v1/register", json=body, **options)


def routes(client: httpx.Client) -> list[dict[str, Any]]:
    return client.get("/_/routes", auth=(USER, PASSWORD)).json()["routes"]


# --- register ----------------------------------------------------------------------------


def test_a_registered_route_works_as_soon_as_register_answers(
    client: httpx.Client, upstream: UpstreamServer
) -> None:
    document = manifest("greeter", "greeter-1", upstream.port, "/hello")
    response = register(client, registration("greeter", "greeter-1", upstream.port, document))
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "registered"
    assert response.json()["routes_checksum"] == document["checksum"]
    upstream.app.reset()
    routed = client.get("/greeter-1/hello")
    assert routed.status_code == 200
    assert upstream.app.paths == ["/hello"]


def test_register_without_a_manifest_fetches_it_from_the_instance(
    client: httpx.Client, host: tuple[ManifestHost, ThreadedServer]
) -> None:
    app, server = host
    app.document = manifest("fetched", "fetched-1", server.port, "/from-instance")
    response = register(client, registration("fetched", "fetched-1", server.port, None))
    assert response.status_code == 201, response.text
    assert app.manifest_fetches == 1
    routed = client.get("/fetched-1/from-instance")
    assert routed.status_code == 200
    assert routed.json() == {"path": "/from-instance"}


def test_register_fetches_the_manifest_where_the_metadata_says(client: httpx.Client) -> None:
    app = ManifestHost(manifest_path="/meta/farp.json")
    with ThreadedServer(app) as server:
        app.document = manifest("located", "located-1", server.port, "/located")
        body = registration(
            "located",
            "located-1",
            server.port,
            None,
            metadata={"farp.manifest": "/meta/farp.json"},
        )
        response = register(client, body)
        assert response.status_code == 201, response.text
        assert app.manifest_fetches == 1
        assert client.get("/located-1/located").status_code == 200


@pytest.mark.parametrize(
    ("breakage", "field"),
    [
        (lambda m: m.update(checksum="0" * 64), "checksum"),
        (lambda m: m.update(endpoints={}), "endpoints.health"),
        (lambda m: m.pop("service_name"), "service_name"),
        (lambda m: m.update(version="2.0.0"), "version"),
        (lambda m: m.update(instance_id="someone-else"), "instance_id"),
        (lambda m: m["routing"].update(strategy="sideways"), "routing.strategy"),
    ],
)
def test_an_invalid_manifest_is_refused_and_changes_nothing(
    client: httpx.Client, upstream: UpstreamServer, breakage: Any, field: str
) -> None:
    document = manifest("broken", "broken-1", upstream.port, "/broken")
    breakage(document)
    before = routes(client)
    response = register(client, registration("broken", "broken-1", upstream.port, document))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_manifest"
    assert field in response.json()["message"]
    after = routes(client)
    # Instances of earlier tests may be evicted meanwhile (300 ms timeout): routes can
    # only have gone, never come.
    assert [r for r in after if r not in before] == []
    assert not [r for r in after if r["source"] == "farp:broken"]
    assert client.get("/broken-1/broken").status_code == 404
    assert client.put("/_farp/v1/heartbeat/broken-1", json={}).status_code == 404


def test_an_unreachable_manifest_is_a_bad_gateway(client: httpx.Client) -> None:
    with ThreadedServer(ManifestHost(manifest_path="/elsewhere")) as server:
        pass  # stopped: nothing listens on its port any more
    response = register(client, registration("gone", "gone-1", server.port, None))
    assert response.status_code == 502
    assert response.json()["error"] == "manifest_unreachable"


def test_a_malformed_registration_names_the_field(client: httpx.Client) -> None:
    body = registration("malformed", "malformed-1", 80, None)
    del body["instance"]["port"]
    response = register(client, body)
    assert response.status_code == 400
    assert "instance.port" in response.json()["message"]
    assert client.post("/_farp/v1/register", content=b"{nope").status_code == 400


# --- heartbeats and eviction -------------------------------------------------------------


def test_heartbeats_keep_an_instance_past_the_timeout(
    client: httpx.Client, upstream: UpstreamServer
) -> None:
    document = manifest("beating", "beating-1", upstream.port, "/alive")
    assert (
        register(client, registration("beating", "beating-1", upstream.port, document)).status_code
        == 201
    )
    until = time.monotonic() + HEARTBEAT_TIMEOUT * 4
    while time.monotonic() < until:
        beat = client.put("/_farp/v1/heartbeat/beating-1", json={"status": "healthy"})
        assert beat.status_code == 200
        assert beat.json() == {"status": "ok"}
        assert client.get("/beating-1/alive").status_code == 200
        time.sleep(HEARTBEAT_TIMEOUT / 6)  # the heartbeat cadence
    assert client.get("/beating-1/alive").status_code == 200


def test_an_instance_without_heartbeats_is_evicted_and_its_route_goes(
    client: httpx.Client, upstream: UpstreamServer
) -> None:
    document = manifest("silent", "silent-1", upstream.port, "/quiet")
    assert (
        register(client, registration("silent", "silent-1", upstream.port, document)).status_code
        == 201
    )
    assert client.get("/silent-1/quiet").status_code == 200
    eventually(
        lambda: client.get("/silent-1/quiet").status_code == 404,
        timeout=5,
        message="the silent instance was never evicted",
    )
    beat = client.put("/_farp/v1/heartbeat/silent-1", json={"status": "healthy"})
    assert beat.status_code == 404
    assert beat.json()["action"] == "re-register"


def test_a_heartbeat_for_an_unknown_instance_asks_to_re_register(client: httpx.Client) -> None:
    response = client.put("/_farp/v1/heartbeat/nobody", json={"status": "healthy"})
    assert response.status_code == 404
    assert response.json()["action"] == "re-register"


def test_a_draining_heartbeat_takes_the_instance_out_of_rotation(
    client: httpx.Client, upstream: UpstreamServer
) -> None:
    document = manifest("drainer", "drainer-1", upstream.port, "/work")
    assert (
        register(client, registration("drainer", "drainer-1", upstream.port, document)).status_code
        == 201
    )
    assert client.get("/drainer-1/work").status_code == 200
    beat = client.put("/_farp/v1/heartbeat/drainer-1", json={"status": "draining"})
    assert beat.status_code == 200
    assert client.get("/drainer-1/work").status_code == 503
    (view,) = client.get("/_farp/v1/services/drainer").json()["instances"]
    assert view["status"] == "draining"
    assert view["serving"] is False
    assert (
        client.put("/_farp/v1/heartbeat/drainer-1", json={"status": "healthy"}).status_code == 200
    )
    assert client.get("/drainer-1/work").status_code == 200


def test_a_changed_checksum_in_a_heartbeat_makes_the_gateway_refetch(
    client: httpx.Client, host: tuple[ManifestHost, ThreadedServer]
) -> None:
    app, server = host
    app.document = manifest("evolving", "evolving-1", server.port, "/v1")
    assert (
        register(client, registration("evolving", "evolving-1", server.port, None)).status_code
        == 201
    )
    assert client.get("/evolving-1/v1").status_code == 200
    same = client.put(
        "/_farp/v1/heartbeat/evolving-1", json={"routes_checksum": app.document["checksum"]}
    )
    assert same.status_code == 200
    assert app.manifest_fetches == 1  # an unchanged checksum fetches nothing
    app.document = manifest("evolving", "evolving-1", server.port, "/v2")
    changed = client.put(
        "/_farp/v1/heartbeat/evolving-1",
        json={"status": "healthy", "routes_checksum": app.document["checksum"]},
    )
    assert changed.status_code == 200
    eventually(
        lambda: client.get("/evolving-1/v2").status_code == 200,
        message="the new manifest's route never appeared",
    )
    assert client.get("/evolving-1/v1").status_code == 404


# --- deregister and views ----------------------------------------------------------------


def test_deregister_removes_the_route_at_once(
    client: httpx.Client, upstream: UpstreamServer
) -> None:
    document = manifest("leaving", "leaving-1", upstream.port, "/bye")
    assert (
        register(client, registration("leaving", "leaving-1", upstream.port, document)).status_code
        == 201
    )
    assert client.get("/leaving-1/bye").status_code == 200
    response = client.delete("/_farp/v1/deregister/leaving-1")
    assert response.status_code == 200
    assert client.get("/leaving-1/bye").status_code == 404
    assert client.delete("/_farp/v1/deregister/leaving-1").status_code == 404


def test_services_lists_pushed_and_discovered_instances(
    client: httpx.Client, upstream: UpstreamServer
) -> None:
    document = manifest("listed", "listed-1", upstream.port, "/here")
    assert (
        register(client, registration("listed", "listed-1", upstream.port, document)).status_code
        == 201
    )
    services = {
        s["name"]: s["instances"] for s in client.get("/_farp/v1/services").json()["services"]
    }
    (pushed,) = services["listed"]
    assert pushed["id"] == "listed-1"
    assert pushed["source"] == "push"
    assert pushed["address"] == f"127.0.0.1:{upstream.port}"
    assert pushed["routes_checksum"] == document["checksum"]
    assert pushed["last_heartbeat"] <= time.time()
    (static,) = services["static-svc"]
    assert static["source"] == "discovery"
    assert static["last_heartbeat"] is None
    one = client.get("/_farp/v1/services/listed")
    assert one.status_code == 200
    assert one.json()["instances"] == [pushed]
    assert client.get("/_farp/v1/services/no-such-service").status_code == 404


# --- authentication and rate limits ------------------------------------------------------


def test_the_push_api_refuses_a_missing_or_wrong_token(gateway: ThreadedServer) -> None:
    body = registration("sneaky", "sneaky-1", 80, None)
    url = f"{gateway.url}/_farp/v1/register"
    assert httpx.post(url, json=body).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "unauthorized"
    assert httpx.post(url, json=body, auth=(USER, "wrong")).status_code == 401
    assert httpx.get(f"{gateway.url}/_farp/v1/services").status_code == 401
    # The registration token opens the push API only, not the rest of the admin plane.
    assert httpx.get(f"{gateway.url}/_/routes", headers=BEARER).status_code == 401


def test_the_push_api_accepts_admin_credentials_and_the_token_header(
    gateway: ThreadedServer, upstream: UpstreamServer
) -> None:
    url = f"{gateway.url}/_farp/v1/register"
    document = manifest("trusted", "trusted-1", upstream.port, "/t1")
    basic = httpx.post(
        url,
        json=registration("trusted", "trusted-1", upstream.port, document),
        auth=(USER, PASSWORD),
    )
    assert basic.status_code == 201, basic.text
    document = manifest("trusted", "trusted-2", upstream.port, "/t2")
    header = httpx.post(
        url,
        json=registration("trusted", "trusted-2", upstream.port, document),
        headers={"X-FARP-Token": TOKEN},
    )
    assert header.status_code == 201, header.text


def test_a_token_alone_guards_the_push_api_when_there_is_no_admin_auth(
    upstream: UpstreamServer,
) -> None:
    server = serve_gateway(config(registration_token=TOKEN))
    try:
        document = manifest("guarded", "guarded-1", upstream.port, "/g")
        body = registration("guarded", "guarded-1", upstream.port, document)
        url = f"{server.url}/_farp/v1/register"
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers=BEARER).status_code == 201
        # Without admin auth the rest of the admin plane stays as open as it was.
        assert httpx.get(f"{server.url}/_/routes").status_code == 200
    finally:
        server.stop()


def test_without_token_or_admin_auth_the_push_api_is_open(upstream: UpstreamServer) -> None:
    server = serve_gateway(config())
    try:
        document = manifest("open", "open-1", upstream.port, "/o")
        response = httpx.post(
            f"{server.url}/_farp/v1/register",
            json=registration("open", "open-1", upstream.port, document),
        )
        assert response.status_code == 201
        assert httpx.get(f"{server.url}/open-1/o").status_code == 200
    finally:
        server.stop()


def test_registrations_are_rate_limited_per_service(
    gateway: ThreadedServer, upstream: UpstreamServer
) -> None:
    def attempt(index: int) -> httpx.Response:
        document = manifest("flood", f"flood-{index}", upstream.port, "/f")
        body = registration("flood", f"flood-{index}", upstream.port, document)
        return httpx.post(f"{gateway.url}/_farp/v1/register", json=body, headers=BEARER)

    with concurrent.futures.ThreadPoolExecutor(max_workers=25) as pool:
        answers = list(pool.map(attempt, range(25)))
    statuses = sorted(a.status_code for a in answers)
    assert 201 in statuses
    limited = [a for a in answers if a.status_code == 429]
    assert limited, statuses
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert set(statuses) <= {201, 429}
    # Another service has its own budget.
    document = manifest("calm", "calm-1", upstream.port, "/c")
    calm = httpx.post(
        f"{gateway.url}/_farp/v1/register",
        json=registration("calm", "calm-1", upstream.port, document),
        headers=BEARER,
    )
    assert calm.status_code == 201
