"""The Redis backend against a real ``redis-server`` started by the tests: SCAN listing,
``farp:events`` pub/sub, TTL expiry caught by the periodic re-list (or by keyspace
notifications when the server has them), registry keys, outages, and a running gateway
whose routes follow what is written to Redis."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from gateway.discovery.redis import EVENTS, RedisBackend, instance_key
from tests.discovery.processes import RedisServer
from tests.discovery.support import Collector, Gateway, manifest, openapi, services
from tests.support.upstream import UpstreamServer

ADDRESS = "127.0.0.1:9"


def register(
    server: RedisServer,
    document: dict[str, Any],
    *,
    event: str | None = "added",
    ttl_ms: int = 60_000,
) -> None:
    """What a publisher does: the manifest with a TTL, then (usually) an event."""
    service, instance = document["service_name"], document["instance_id"]
    with server.client() as client:
        client.set(instance_key(service, instance), json.dumps(document), px=ttl_ms)
        if event:
            client.publish(EVENTS, event_json(event, service, instance))


def event_json(event: str, service: str, instance: str) -> str:
    return json.dumps({"event": event, "service_name": service, "instance_id": instance})


def deregister(server: RedisServer, service: str, instance: str) -> None:
    with server.client() as client:
        client.delete(instance_key(service, instance))
        client.publish(EVENTS, event_json("removed", service, instance))


def backend_for(server: RedisServer, interval: float = 30.0, **options: Any) -> RedisBackend:
    """A long ``interval`` by default: what shows up quickly came through pub/sub."""
    options.setdefault("backoff_max", 0.5)
    return RedisBackend(server.url, interval=interval, **options)


def paths_of(document: dict[str, Any] | None) -> list[str]:
    assert document is not None
    return sorted(document["schemas"][0]["inline_schema"]["paths"])


async def test_lists_then_follows_events(redis_server: RedisServer) -> None:
    register(redis_server, manifest("shop", ADDRESS, "/users", instance_id="shop-1"), event=None)
    with redis_server.client() as client:  # not instance keys: ignored
        client.set("farp:schemas/shop/openapi", "{}")
        client.set("farp:services:shop:other", "{}")

    async with Collector(backend_for(redis_server)) as watched:
        (instance,) = await watched.wait(lambda s: len(s) == 1)
        assert instance.key == "redis:farp:services:shop:instances:shop-1"
        assert (instance.service_name, instance.instance_id) == ("shop", "shop-1")
        assert instance.address == ADDRESS
        assert watched.backend.state == "synced"

        register(redis_server, manifest("shop", ADDRESS, "/users", instance_id="shop-2"))
        await watched.wait(lambda s: services(s) == {"shop": ["shop-1", "shop-2"]}, "with 2")

        register(
            redis_server,
            manifest("shop", ADDRESS, "/users", "/orders", instance_id="shop-1"),
            event="updated",
        )
        await watched.wait(lambda s: paths_of(s[0].manifest) == ["/orders", "/users"], "updated")

        deregister(redis_server, "shop", "shop-1")
        await watched.wait(lambda s: services(s) == {"shop": ["shop-2"]}, "without shop-1")

        # An event that cannot be read makes the backend re-list instead of guessing.
        register(redis_server, manifest("quiet", ADDRESS, "/q"), event=None)
        with redis_server.client() as client:
            client.publish(EVENTS, "not json")
        await watched.wait(lambda s: "quiet" in services(s), "after the unreadable event")


async def test_expiry_without_an_event_is_caught_by_the_periodic_relist(
    redis_server: RedisServer,
) -> None:
    register(redis_server, manifest("stay", ADDRESS, "/s"))
    register(redis_server, manifest("brief", ADDRESS, "/b"), ttl_ms=400)
    async with Collector(backend_for(redis_server, interval=0.2)) as watched:
        await watched.wait(lambda s: services(s) == {"brief": ["brief-1"], "stay": ["stay-1"]})
        await watched.wait(lambda s: services(s) == {"stay": ["stay-1"]}, "after the expiry")
        # So is a publisher that forgets to announce.
        register(redis_server, manifest("silent", ADDRESS, "/x"), event=None)
        await watched.wait(lambda s: "silent" in services(s), "after the re-list")


async def test_keyspace_notifications_are_used_when_the_server_has_them(
    redis_server: RedisServer,
) -> None:
    with redis_server.client() as client:
        client.config_set("notify-keyspace-events", "K$gx")
    register(redis_server, manifest("brief", ADDRESS, "/b"), ttl_ms=60_000)
    async with Collector(backend_for(redis_server)) as watched:  # re-list every 30 s only
        await watched.wait(lambda s: "brief" in services(s))
        with redis_server.client() as client:
            client.pexpire(instance_key("brief", "brief-1"), 200)
        await watched.wait(lambda s: s == [], "after the expiry notification")
        register(redis_server, manifest("quiet", ADDRESS, "/q"), event=None)
        await watched.wait(lambda s: "quiet" in services(s), "after the set notification")


async def test_bad_values_keep_the_last_good_manifest(redis_server: RedisServer) -> None:
    register(redis_server, manifest("shop", ADDRESS, "/users"))
    async with Collector(backend_for(redis_server)) as watched:
        await watched.wait(lambda s: len(s) == 1)
        with redis_server.client() as client:
            client.set(instance_key("shop", "shop-1"), b"\x1f\x8b broken gzip")
            client.publish(EVENTS, event_json("updated", "shop", "shop-1"))
        zipped = gzip.compress(json.dumps(manifest("zip", ADDRESS, "/z")).encode())
        with redis_server.client() as client:
            client.set(instance_key("zip", "zip-1"), zipped)
            client.publish(EVENTS, event_json("added", "zip", "zip-1"))
        latest = await watched.wait(lambda s: "zip" in services(s), "with the gzipped one")
        assert paths_of(latest[0].manifest) == ["/users"]  # the last good shop manifest
        assert paths_of(latest[1].manifest) == ["/z"]
        assert watched.backend.rejected == 1


async def test_read_key_serves_registry_schemas(redis_server: RedisServer) -> None:
    document = openapi("/users")
    with redis_server.client() as client:
        client.set("farp:schemas/shop/openapi", json.dumps(document))
        client.set("farp:schemas/big/openapi", gzip.compress(json.dumps(document).encode()))
    backend = backend_for(redis_server)
    try:
        assert RedisBackend.registry_key("/schemas/shop/openapi") == "farp:schemas/shop/openapi"
        assert json.loads(await backend.read_key("/schemas/shop/openapi") or b"") == document
        assert json.loads(await backend.read_key("farp:schemas/big/openapi") or b"") == document
        assert await backend.read_key("/schemas/missing") is None
    finally:
        await backend.close()
    unreachable = RedisBackend("redis://127.0.0.1:9/0", timeout=0.5)
    try:
        assert await unreachable.read_key("/schemas/shop/openapi") is None
    finally:
        await unreachable.close()


async def test_outage_keeps_the_last_snapshot_and_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    register(redis_server, manifest("shop", ADDRESS, "/users"))
    caplog.set_level(logging.INFO, "octopus.discovery")
    async with Collector(backend_for(redis_server, backoff_initial=0.05)) as watched:
        await watched.wait(lambda s: len(s) == 1)
        count = len(watched.snapshots)
        backend = watched.backend

        redis_server.kill()
        await watched.wait_state("unavailable")
        failures = backend.failures
        await watched.wait(lambda s: backend.failures >= failures + 3, "after more retries")
        assert len(watched.snapshots) == count
        assert "redis redis://127.0.0.1" in (backend.last_error or "")

        redis_server.start()  # without persistence: empty until the publishers heartbeat
        register(redis_server, manifest("shop", ADDRESS, "/users"), event=None)
        register(redis_server, manifest("back", ADDRESS, "/b"), event=None)
        await watched.wait(lambda s: services(s) == {"back": ["back-1"], "shop": ["shop-1"]})
        assert backend.state == "synced" and backend.outages == 1 and backend.relists >= 1
    logged = [r.getMessage() for r in caplog.records if r.name == "octopus.discovery"]
    assert logged.count("discovery backend unavailable, keeping the last good snapshot") == 1
    assert logged.count("discovery backend recovered") == 1


def test_passwords_stay_out_of_last_error() -> None:
    from gateway.discovery.redis import _redacted

    assert _redacted("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert _redacted("redis://:pw@host/0") == "redis://:***@host/0"
    assert _redacted("redis://host:6379/0") == "redis://host:6379/0"


def test_gateway_routes_follow_redis(
    redis_server: RedisServer,
    upstream: UpstreamServer,
    start_gateway: Callable[[dict[str, Any]], Gateway],
) -> None:
    address = f"127.0.0.1:{upstream.port}"
    gateway = start_gateway({"backend": "redis", "redis": {"url": redis_server.url}})
    assert gateway.get("/shop/users").status_code == 404

    register(redis_server, manifest("shop", address, "/users"))
    gateway.wait_route("/shop/users")
    assert gateway.get("/shop/users").status_code == 200
    assert upstream.app.paths[-1] == "/users"

    register(redis_server, manifest("shop", address, "/users", "/orders"), event="updated")
    gateway.wait_route("/shop/orders")
    assert gateway.get("/shop/orders").status_code == 200

    register(redis_server, manifest("billing", address, "/invoices"))
    gateway.wait_route("/billing/invoices")
    deregister(redis_server, "shop", "shop-1")
    gateway.wait_route("/shop/users", present=False)
    assert gateway.get("/shop/users").status_code == 404

    redis_server.kill()
    gateway.wait_discovery_state("unavailable")
    assert gateway.get("/billing/invoices").status_code == 200  # old routes keep serving

    # Without persistence the restarted server is empty: billing's routes come back with
    # its next heartbeat (seen by the periodic re-list), late's with its event.
    redis_server.start()
    register(redis_server, manifest("billing", address, "/invoices"), event=None)
    register(redis_server, manifest("late", address, "/hello"))
    gateway.wait_route("/late/hello")
    gateway.wait_route("/billing/invoices")
    assert gateway.get("/late/hello").status_code == 200
    assert gateway.get("/billing/invoices").status_code == 200
    gateway.wait_discovery_state("synced")
