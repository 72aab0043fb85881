"""DNS discovery through a running gateway, against a real dnsmasq: instances found by
SRV records, FARP manifests found through their TXT ``farp.*`` metadata, and plain
(non-FARP) services used by static routes."""

from __future__ import annotations

import json
from typing import Any

from gateway.types import Receive, Scope, Send
from tests.discovery.processes import DnsmasqServer
from tests.discovery.support import Gateway, manifest
from tests.discovery.test_dns import DOMAIN, host, srv
from tests.support.servers import ThreadedServer
from tests.support.waiting import eventually


class ManifestServingApp:
    """A FARP service: its manifest at ``/_farp/manifest``, its API echoing the path."""

    def __init__(self) -> None:
        self.manifest: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/_farp/manifest":
            body = json.dumps(self.manifest).encode()
        else:
            body = json.dumps({"path": scope["path"]}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _dns_gateway(server: DnsmasqServer, *services: str, **extra: Any) -> Gateway:
    discovery = {
        "backend": "dns",
        "dns": {"nameservers": [server.nameserver], "domain": DOMAIN, "services": list(services)},
    }
    return Gateway(discovery, **extra)


def test_a_farp_manifest_named_in_txt_metadata_becomes_routes(dnsmasq: DnsmasqServer) -> None:
    app = ManifestServingApp()
    with ThreadedServer(app) as service:
        app.manifest = manifest("shop", f"127.0.0.1:{service.port}", "/items/{id}")
        dnsmasq.configure(
            [
                srv("shop-1", service.port),
                f'txt-record=_shop._tcp.{DOMAIN},"farp.enabled=true","farp.manifest=/_farp/manifest"',
                host("shop-1", "127.0.0.1"),
            ]
        )
        dnsmasq.start()
        gateway = _dns_gateway(dnsmasq, "shop").start()
        try:
            gateway.wait_route("/shop/items/{id}")
            response = gateway.get("/shop/items/7")
            assert response.status_code == 200
            assert response.json() == {"path": "/items/7"}
        finally:
            gateway.stop()


def test_a_plain_dns_service_is_an_upstream_for_static_routes(dnsmasq: DnsmasqServer) -> None:
    app = ManifestServingApp()
    with ThreadedServer(app) as service:
        dnsmasq.configure(
            [
                srv("plain-1", service.port, name=f"_plain._tcp.{DOMAIN}"),
                host("plain-1", "127.0.0.1"),
            ]
        )
        dnsmasq.start()
        route = {
            "name": "plain",
            "match": {"path": "/plain/{rest:path}"},
            "upstream": "plain",
            "strip_prefix": True,
        }
        gateway = _dns_gateway(dnsmasq, "plain", routes=[route]).start()
        try:
            response = eventually(
                lambda: (r := gateway.get("/plain/a/b")).status_code == 200 and r,
                message="the plain service never became reachable",
            )
            assert response.json() == {"path": "/a/b"}
        finally:
            gateway.stop()
