"""The DNS backend against a real dnsmasq started by the tests (SRV, TXT and A records
from its configuration file, changed by rewriting the file and restarting it, since
dnsmasq does not re-read ``srv-host``/``txt-record`` on SIGHUP).

Until the FARP watcher resolves metadata-only instances, DNS is tested up to its
snapshots and, separately, through ``resolve_manifest`` to a valid manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.discovery.dns import DnsBackend, parse_nameserver, parse_txt
from gateway.discovery.metadata import resolve_manifest
from gateway.farp.manifest import parse_manifest
from gateway.types import Receive, Scope, Send
from tests.discovery.processes import DnsmasqServer
from tests.discovery.support import Collector, manifest
from tests.support.servers import ThreadedServer

DOMAIN = "example.test"
SHOP = f"_shop._tcp.{DOMAIN}"
FARP_TXT = f'txt-record={SHOP},"farp.enabled=true","farp.manifest=/_farp/manifest"'


def srv(target: str, port: int, priority: int = 0, weight: int = 10, name: str = SHOP) -> str:
    return f"srv-host={name},{target}.{DOMAIN},{port},{priority},{weight}"


def host(name: str, address: str) -> str:
    return f"host-record={name}.{DOMAIN},{address}"


def backend_for(server: DnsmasqServer, *services: str, **options: Any) -> DnsBackend:
    options.setdefault("interval", 0.2)
    options.setdefault("min_interval", 0.05)
    options.setdefault("timeout", 0.5)
    options.setdefault("backoff_max", 0.5)
    return DnsBackend(list(services or ["shop"]), DOMAIN, [server.nameserver], **options)


def addresses(snapshot: list[Any]) -> list[str]:
    return [instance.address for instance in snapshot]


def test_nameserver_and_txt_parsing() -> None:
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("10.0.0.2") == ("10.0.0.2", 53)
    assert parse_nameserver("[::1]:5300") == ("::1", 5300)
    assert parse_nameserver("::1") == ("::1", 53)
    assert parse_txt([b"farp.enabled=true", b"farp.capabilities=[rest websocket]"]) == {
        "farp.enabled": "true",
        "farp.capabilities": "[rest websocket]",
    }
    assert parse_txt([b"farp.enabled=true farp.manifest=/m", b"flag", b"a=b=c"]) == {
        "farp.enabled": "true",
        "farp.manifest": "/m",
        "flag": "",
        "a": "b=c",
    }


async def test_srv_and_txt_records_become_instances(dnsmasq: DnsmasqServer) -> None:
    dnsmasq.configure(
        [
            srv("shop-1", 8080, priority=0, weight=10),
            srv("shop-2", 8081, priority=0, weight=5),
            srv("backup", 8082, priority=10, weight=1),
            f'{FARP_TXT},"farp.capabilities=[rest websocket]"',
            host("shop-1", "127.0.0.1"),
            host("shop-2", "127.0.0.2"),
            host("backup", "::1"),
        ]
    )
    dnsmasq.start()
    async with Collector(backend_for(dnsmasq, "shop", "absent")) as watched:
        snapshot = await watched.wait(lambda s: len(s) == 3)
        assert addresses(snapshot) == ["127.0.0.1:8080", "127.0.0.2:8081", "[::1]:8082"]
        first = snapshot[0]
        assert first.manifest is None
        assert (first.service_name, first.instance_id) == ("shop", f"shop-1.{DOMAIN}:8080")
        assert first.key == f"dns:{SHOP}./shop-1.{DOMAIN}:8080"
        assert first.metadata == {
            "farp.enabled": "true",
            "farp.manifest": "/_farp/manifest",
            "farp.capabilities": "[rest websocket]",
            "dns.srv.target": f"shop-1.{DOMAIN}",
            "dns.srv.priority": "0",
            "dns.srv.weight": "10",
        }
        assert watched.backend.state == "synced" and watched.backend.last_error is None
        assert snapshot[2].metadata["dns.srv.priority"] == "10"


async def test_changes_removals_and_an_outage(dnsmasq: DnsmasqServer) -> None:
    dnsmasq.configure([srv("shop-1", 8080), FARP_TXT, host("shop-1", "127.0.0.1")])
    dnsmasq.start()
    async with Collector(backend_for(dnsmasq)) as watched:
        await watched.wait(lambda s: addresses(s) == ["127.0.0.1:8080"])

        dnsmasq.configure(
            [
                srv("shop-2", 9090),
                f'txt-record={SHOP},"farp.enabled=false"',
                host("shop-2", "127.0.0.2"),
            ]
        )
        changed = await watched.wait(lambda s: addresses(s) == ["127.0.0.2:9090"], "changed")
        assert changed[0].metadata["farp.enabled"] == "false"

        # The name is gone: NXDOMAIN is an empty service, not an outage. (A poll that falls
        # into the restart itself may see one, so the state is checked after.)
        dnsmasq.configure([])
        await watched.wait(lambda s: s == [], "empty")
        await watched.wait_state("synced")

        dnsmasq.configure([srv("shop-1", 8080), FARP_TXT, host("shop-1", "127.0.0.1")])
        await watched.wait(lambda s: len(s) == 1, "back")
        await watched.wait_state("synced")
        outages, count = watched.backend.outages, len(watched.snapshots)

        dnsmasq.kill()
        await watched.wait_state("unavailable")
        assert "dns query" in (watched.backend.last_error or "")
        assert watched.backend.outages == outages + 1
        failures = watched.backend.failures
        await watched.wait(lambda s: watched.backend.failures >= failures + 2, "more retries")
        assert len(watched.snapshots) == count  # the last good snapshot stays

        dnsmasq.configure([srv("shop-1", 8080), srv("shop-3", 8083), FARP_TXT,
                           host("shop-1", "127.0.0.1"), host("shop-3", "127.0.0.3")])  # fmt: skip
        dnsmasq.start()
        await watched.wait(lambda s: len(s) == 2, "after the outage")
        await watched.wait_state("synced")
        assert watched.backend.outages == outages + 1


async def test_the_ttl_paces_the_polls(dnsmasq: DnsmasqServer) -> None:
    """A watch interval of 30 s, answers with a 1 s TTL: changes show within seconds."""
    dnsmasq.configure([srv("shop-1", 8080), host("shop-1", "127.0.0.1")], ttl=1)
    dnsmasq.start()
    backend = backend_for(dnsmasq, interval=30.0, min_interval=0.05)
    async with Collector(backend) as watched:
        await watched.wait(lambda s: len(s) == 1)
        dnsmasq.configure([srv("shop-2", 8081), host("shop-2", "127.0.0.2")])
        await watched.wait(lambda s: addresses(s) == ["127.0.0.2:8081"], "within the TTL")


class ManifestServer:
    """The instance itself: serves its manifest at ``/_farp/manifest``."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        found = scope["path"] == "/_farp/manifest"
        body = json.dumps(self.document).encode() if found else b"no"
        await send({"type": "http.response.start", "status": 200 if found else 404, "headers": []})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def instance_server() -> Iterator[tuple[ManifestServer, int]]:
    app = ManifestServer()
    server = ThreadedServer(app, lifespan="off").start()
    yield app, server.port
    server.stop()


async def test_dns_instances_resolve_to_valid_manifests(
    dnsmasq: DnsmasqServer, instance_server: tuple[ManifestServer, int]
) -> None:
    app, port = instance_server
    app.document = manifest("shop", f"127.0.0.1:{port}", "/users", instance_id="shop-a")
    dnsmasq.configure([srv("shop-a", port), FARP_TXT, host("shop-a", "127.0.0.1")])
    dnsmasq.start()
    async with Collector(backend_for(dnsmasq)) as watched:
        (instance,) = await watched.wait(lambda s: len(s) == 1)
    async with httpx.AsyncClient() as client:
        document = await resolve_manifest(instance, client)
    assert document == app.document
    parsed = parse_manifest(document, address=instance.address)
    assert parsed.service_name == "shop" and parsed.instance_id == "shop-a"
    assert parsed.instance is not None and parsed.instance.address == f"127.0.0.1:{port}"
