"""The etcd backend against a real etcd (Debian ``etcd-server``) started by the tests:
list then watch, ``.gz`` values, registry keys, compaction, auth, outages, and a
running gateway whose routes follow what is written to etcd."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.discovery.etcd import EtcdBackend, prefix_end
from gateway.farp.canonical import schema_hash, schema_size
from tests.discovery.processes import EtcdServer, make_certificates, require_binary
from tests.discovery.support import Collector, Gateway, manifest, openapi, services, until
from tests.support.upstream import UpstreamServer

ADDRESS = "127.0.0.1:9"


def key(prefix: str, service: str, instance: str, suffix: str = "") -> str:
    return f"{prefix}/services/{service}/instances/{instance}/manifest{suffix}"


def put_manifest(etcd: EtcdServer, prefix: str, document: dict[str, Any], gz: bool = False) -> int:
    target = key(prefix, document["service_name"], document["instance_id"], ".gz" if gz else "")
    data = json.dumps(document).encode()
    return etcd.put(target, gzip.compress(data) if gz else data)


def backend_for(etcd: EtcdServer, prefix: str, **options: Any) -> EtcdBackend:
    options.setdefault("backoff_max", 0.5)
    return EtcdBackend([etcd.url], prefix, **options)


def paths_of(instance_manifest: dict[str, Any] | None) -> list[str]:
    assert instance_manifest is not None
    return sorted(instance_manifest["schemas"][0]["inline_schema"]["paths"])


def test_prefix_end_follows_etcds_rule() -> None:
    assert prefix_end(b"/farp/") == b"/farp0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\x00"


async def test_lists_then_follows_puts_updates_and_deletes(etcd: EtcdServer, prefix: str) -> None:
    put_manifest(etcd, prefix, manifest("shop", ADDRESS, "/users", instance_id="shop-1"))
    # Neighbours that are not manifests of this prefix are ignored.
    etcd.put(f"{prefix}/services/shop/instances/shop-1/health", b"ok")
    etcd.put(f"{prefix}/schemas/shop/openapi", b"{}")
    etcd.put(f"{prefix}-other/services/x/instances/1/manifest", b"{}")

    async with Collector(backend_for(etcd, prefix)) as watched:
        first = await watched.wait(lambda s: len(s) == 1, "with shop-1")
        (instance,) = first
        assert instance.key == f"etcd:{key(prefix, 'shop', 'shop-1')}"
        assert (instance.service_name, instance.instance_id) == ("shop", "shop-1")
        assert instance.address == ADDRESS
        assert instance.manifest is not None and instance.manifest["service_name"] == "shop"
        await watched.wait_state("synced")  # once the watch is established
        assert watched.backend.last_sync and watched.backend.last_error is None

        put_manifest(etcd, prefix, manifest("shop", ADDRESS, "/users", instance_id="shop-2"))
        await watched.wait(lambda s: services(s) == {"shop": ["shop-1", "shop-2"]}, "with 2")

        put_manifest(
            etcd, prefix, manifest("shop", ADDRESS, "/users", "/orders", instance_id="shop-1")
        )
        updated = await watched.wait(
            lambda s: paths_of(s[0].manifest) == ["/orders", "/users"], "with the update"
        )
        assert len(updated) == 2

        etcd.delete(key(prefix, "shop", "shop-1"))
        await watched.wait(lambda s: services(s) == {"shop": ["shop-2"]}, "without shop-1")
        count = len(watched.snapshots)
        # Rewriting the same value (a heartbeat) is not a change worth a snapshot; the
        # next real change proves the heartbeat was seen and skipped.
        put_manifest(etcd, prefix, updated[1].manifest or {})
        etcd.put(key(prefix, "late", "late-1"), json.dumps(manifest("late", ADDRESS, "/l")))
        await watched.wait(lambda s: "late" in services(s), "with late")
        assert len(watched.snapshots) == count + 1


async def test_gzipped_values_are_read_first_and_bad_values_keep_the_last_good_one(
    etcd: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    plain = manifest("shop", ADDRESS, "/plain")
    zipped = manifest("shop", ADDRESS, "/zipped")
    put_manifest(etcd, prefix, plain)
    put_manifest(etcd, prefix, zipped, gz=True)
    async with Collector(backend_for(etcd, prefix)) as watched:
        (instance,) = await watched.wait(lambda s: len(s) == 1)
        assert paths_of(instance.manifest) == ["/zipped"]
        # One instance, one key, whichever value holds the manifest.
        assert instance.key == f"etcd:{key(prefix, 'shop', 'shop-1')}"

        etcd.delete(key(prefix, "shop", "shop-1", ".gz"))
        await watched.wait(lambda s: paths_of(s[0].manifest) == ["/plain"], "from the plain key")

        with caplog.at_level(logging.WARNING, "octopus.discovery"):
            etcd.put(key(prefix, "shop", "shop-1"), b'{"truncated": ')
            etcd.put(key(prefix, "fresh", "fresh-1"), b"not json either")
            etcd.put(key(prefix, "ok", "ok-1"), json.dumps(manifest("ok", ADDRESS, "/ok")))
            latest = await watched.wait(lambda s: "ok" in services(s), "with ok")
        assert services(latest) == {"ok": ["ok-1"], "shop": ["shop-1"]}
        assert paths_of(latest[1].manifest) == ["/plain"]  # the last good version
        assert watched.backend.rejected == 2
        warnings = [r for r in caplog.records if "does not decode" in r.getMessage()]
        assert len(warnings) == 2


async def test_read_key_serves_registry_schemas_plain_and_gzipped(
    etcd: EtcdServer, prefix: str
) -> None:
    document = openapi("/users")
    etcd.put(f"{prefix}/schemas/shop/openapi", json.dumps(document))
    etcd.put(f"{prefix}/schemas/big/openapi.gz", gzip.compress(json.dumps(document).encode()))
    backend = backend_for(etcd, prefix)
    try:
        assert json.loads(await backend.read_key("/schemas/shop/openapi") or b"") == document
        assert json.loads(await backend.read_key("schemas/shop/openapi") or b"") == document
        assert json.loads(await backend.read_key("/schemas/big/openapi") or b"") == document
        assert await backend.read_key("/schemas/missing") is None
    finally:
        await backend.close()
    unreachable = EtcdBackend(["http://127.0.0.1:9"], prefix, timeout=0.5)
    try:
        assert await unreachable.read_key("/schemas/shop/openapi") is None
    finally:
        await unreachable.close()


async def test_a_compacted_watch_window_triggers_a_clean_relist(
    etcd: EtcdServer, prefix: str
) -> None:
    put_manifest(etcd, prefix, manifest("shop", ADDRESS, "/users", instance_id="shop-1"))
    put_manifest(etcd, prefix, manifest("shop", ADDRESS, "/users", instance_id="shop-2"))
    backend = backend_for(etcd, prefix)
    stream = backend.watch()
    try:
        first = await asyncio.wait_for(anext(stream), 10)
        assert services(first) == {"shop": ["shop-1", "shop-2"]}
        # While the consumer holds the first snapshot the backend is not watching yet:
        # what happens now is compacted away before its watch starts.
        etcd.delete(key(prefix, "shop", "shop-1"))
        put_manifest(etcd, prefix, manifest("new", ADDRESS, "/n"))
        etcd.compact(
            put_manifest(etcd, prefix, manifest("shop", ADDRESS, "/v2", instance_id="shop-2"))
        )

        second = await asyncio.wait_for(anext(stream), 10)
        assert services(second) == {"new": ["new-1"], "shop": ["shop-2"]}
        assert paths_of(second[1].manifest) == ["/v2"]
        assert backend.relists == 1
        assert backend.state == "synced" and backend.outages == 0
    finally:
        await stream.aclose()
        await backend.close()


async def test_an_idle_watch_is_reopened_and_keeps_following(
    etcd: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "octopus.discovery.etcd")
    async with Collector(backend_for(etcd, prefix, idle_timeout=0.2)) as watched:
        await watched.wait(lambda s: s == [])
        await until(lambda: any("re-opening" in r.getMessage() for r in caplog.records))
        put_manifest(etcd, prefix, manifest("shop", ADDRESS, "/users"))
        await watched.wait(lambda s: len(s) == 1, "after the re-opened watch")
        assert watched.backend.outages == 0 and watched.backend.relists == 0


async def test_outage_keeps_the_last_snapshot_logs_once_and_recovers(
    etcd: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    put_manifest(etcd, prefix, manifest("shop", ADDRESS, "/users"))
    caplog.set_level(logging.INFO, "octopus.discovery")
    async with Collector(backend_for(etcd, prefix, backoff_initial=0.05)) as watched:
        await watched.wait(lambda s: len(s) == 1)
        count = len(watched.snapshots)

        etcd.kill()
        await watched.wait_state("unavailable")
        backend = watched.backend
        assert backend.last_error and "watch" in backend.last_error
        # Retries go on while it is down; the last good snapshot stays the latest.
        failures = backend.failures
        await watched.wait(lambda s: backend.failures >= failures + 3, "after more retries")
        assert len(watched.snapshots) == count

        etcd.start()
        put_manifest(etcd, prefix, manifest("back", ADDRESS, "/b"))
        await watched.wait(lambda s: services(s) == {"back": ["back-1"], "shop": ["shop-1"]})
        await watched.wait_state("synced")
        assert backend.last_error is None
        assert backend.outages == 1
    logged = [r.getMessage() for r in caplog.records if r.name == "octopus.discovery"]
    assert logged.count("discovery backend unavailable, keeping the last good snapshot") == 1
    assert logged.count("discovery backend recovered") == 1


async def test_a_server_that_lists_but_refuses_watches_is_one_outage_not_a_flap() -> None:
    """No real etcd needed: a transport answering ranges and cancelling every watch."""
    requests: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request.url.path)
        if request.url.path == "/v3/kv/range":
            return httpx.Response(200, json={"header": {"revision": "5"}, "kvs": []})
        refused = {"created": True, "canceled": True, "cancel_reason": "permission denied"}
        return httpx.Response(200, content=json.dumps({"result": refused}).encode() + b"\n")

    backend = EtcdBackend(["http://etcd.invalid:2379"], backoff_initial=0.01, backoff_max=0.02)
    backend._client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    async with Collector(backend) as watched:
        await watched.wait(lambda s: backend.failures >= 5, "after several refused watches")
        assert backend.state == "unavailable" and backend.outages == 1
        assert backend.backoff.attempts >= 5  # not reset by the successful listings
        assert "watch canceled: permission denied" in (backend.last_error or "")
        assert watched.snapshots == [[]]  # the listing itself was good, once
    assert requests.count("/v3/kv/range") >= 5


async def test_username_and_password(tmp_path: Path) -> None:
    server = EtcdServer(require_binary("etcd", "etcd-server"), tmp_path / "etcd-auth")
    server.start()
    try:
        server.enable_auth("root", "s3cret")
        put_manifest(server, "/farp", manifest("shop", ADDRESS, "/users"))
        authenticated = EtcdBackend([server.url], username="root", password="s3cret")
        async with Collector(authenticated) as watched:
            await watched.wait(lambda s: services(s) == {"shop": ["shop-1"]})
            put_manifest(server, "/farp", manifest("two", ADDRESS, "/t"))
            await watched.wait(lambda s: "two" in services(s), "after a put (watch with auth)")
            # An expired token is replaced transparently.
            authenticated._token = "expired.1"
            schema_key = "/farp/schemas/x"
            server.put(schema_key, b"{}")
            assert await authenticated.read_key("/schemas/x") == b"{}"

        wrong = EtcdBackend([server.url], username="root", password="nope", backoff_max=0.2)
        anonymous = EtcdBackend([server.url], backoff_max=0.2)
        for backend, reason in ((wrong, "authentication failed"), (anonymous, "user name")):
            async with Collector(backend) as watched:
                await watched.wait_state("unavailable")
                assert reason in (backend.last_error or "")
                assert watched.snapshots == []
    finally:
        server.stop()


def test_gateway_routes_follow_etcd(
    etcd: EtcdServer,
    prefix: str,
    upstream: UpstreamServer,
    start_gateway: Callable[[dict[str, Any]], Gateway],
) -> None:
    address = f"127.0.0.1:{upstream.port}"
    gateway = start_gateway(
        {"backend": "etcd", "etcd": {"endpoints": [etcd.url], "prefix": prefix}}
    )
    assert gateway.get("/shop/users").status_code == 404

    put_manifest(etcd, prefix, manifest("shop", address, "/users"))
    gateway.wait_route("/shop/users")
    assert gateway.get("/shop/users").status_code == 200
    assert upstream.app.paths[-1] == "/users"

    put_manifest(etcd, prefix, manifest("shop", address, "/users", "/orders"))
    gateway.wait_route("/shop/orders")
    assert gateway.get("/shop/orders").status_code == 200

    # A second service whose manifest is gzipped and whose schema is a registry key.
    document = openapi("/invoices")
    etcd.put(f"{prefix}/schemas/billing/openapi", json.dumps(document))
    registry = {
        "type": "openapi",
        "spec_version": "3.1.0",
        "location": {"type": "registry", "registry_path": "/schemas/billing/openapi"},
        "content_type": "application/json",
        "hash": schema_hash(document),
        "size": schema_size(document),
    }
    put_manifest(etcd, prefix, manifest("billing", address, schemas=[registry]), gz=True)
    gateway.wait_route("/billing/invoices")
    assert gateway.get("/billing/invoices").status_code == 200

    etcd.delete(key(prefix, "shop", "shop-1"))
    gateway.wait_route("/shop/users", present=False)
    assert gateway.get("/shop/users").status_code == 404

    etcd.kill()
    gateway.wait_discovery_state("unavailable")
    assert gateway.get("/billing/invoices").status_code == 200  # old routes keep serving

    etcd.start()
    put_manifest(etcd, prefix, manifest("late", address, "/hello"))
    gateway.wait_route("/late/hello")
    assert gateway.get("/late/hello").status_code == 200
    assert gateway.get("/billing/invoices").status_code == 200
    gateway.wait_discovery_state("synced")


async def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "pki")
    server = EtcdServer(require_binary("etcd", "etcd-server"), tmp_path / "etcd-tls", tls=files)
    server.start()
    try:
        put_manifest(server, "/farp", manifest("shop", ADDRESS, "/users"))
        secured = EtcdBackend(
            [f"127.0.0.1:{server.port}"],  # no scheme: https, since TLS is configured
            ca=files["ca.pem"],
            cert=files["client.pem"],
            key=files["client.key"],
        )
        assert secured.endpoints == [server.url]
        async with Collector(secured) as watched:
            await watched.wait(lambda s: services(s) == {"shop": ["shop-1"]})
            put_manifest(server, "/farp", manifest("two", ADDRESS, "/t"))
            await watched.wait(lambda s: "two" in services(s), "through the TLS watch")

        no_client_cert = EtcdBackend([server.url], ca=files["ca.pem"], backoff_max=0.2)
        untrusted = EtcdBackend([server.url], backoff_max=0.2)  # system CAs only
        for backend in (no_client_cert, untrusted):
            async with Collector(backend) as watched:
                await watched.wait_state("unavailable")
                assert watched.snapshots == []
        assert "CERTIFICATE_VERIFY_FAILED" in (untrusted.last_error or "")
    finally:
        server.stop()
