"""The ``consul`` discovery backend against a fake Consul agent.

No Consul runs where these tests run, so they use
:class:`tests.discovery.fakes.consul.FakeConsul`, an in-test HTTP server that speaks the
parts of Consul's HTTP API the backend relies on: blocking queries (held until the
endpoint's index moves past ``index`` or ``wait`` elapses, ``X-Consul-Index`` on every
answer), an index that goes backwards (a snapshot restore) waking held queries, health
filtered by ``?passing``, ``dc=``, ACL tokens in ``X-Consul-Token``, and KV ``?raw`` reads.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.discovery.consul import ConsulBackend
from tests.discovery.fakes.common import Collector, addresses, until
from tests.discovery.fakes.consul import FakeConsul

TOKEN = "consul-acl-token"
CATALOG = "/v1/catalog/services"


@pytest.fixture
def consul() -> Iterator[FakeConsul]:
    fake = FakeConsul(token=TOKEN)
    fake.start()
    yield fake
    fake.stop()


def backend_for(fake: FakeConsul, **options: Any) -> ConsulBackend:
    options.setdefault("token", TOKEN)
    return ConsulBackend(
        fake.url, datacenter="dc1", wait=2.0, backoff_initial=0.02, backoff_max=0.2, **options
    )


def web(fake: FakeConsul, *ids: str) -> None:
    for number, service_id in enumerate(ids, start=1):
        fake.register("web", service_id, node=f"node-{number}", node_address=f"10.0.0.{number}")


async def test_initial_list_from_catalog_and_passing_health(consul: FakeConsul) -> None:
    consul.register("web", "web-1", node="node-1", node_address="10.0.0.1", port=8080)
    consul.register(
        "web",
        "web-2",
        node="node-2",
        node_address="10.0.0.2",
        address="10.1.0.2",  # the service's own address wins over the node's
        port=9090,
        meta={"farp.enabled": "true", "farp.manifest": "/_farp/manifest", "version": "1.2"},
    )
    consul.register("web", "web-3", node="node-3", node_address="10.0.0.3", passing=False)
    consul.register("api", "api-1", node="node-1", node_address="10.0.0.1", port=7070)

    backend = backend_for(consul)
    async with Collector(backend) as seen:
        snapshot = await seen.wait_for(lambda s: len(s) == 4)

    assert addresses(snapshot, "web") == {"10.0.0.1:8080", "10.1.0.2:9090"}
    assert addresses(snapshot, "api") == {"10.0.0.1:7070"}
    assert addresses(snapshot, "consul") == {"127.0.0.1:8300"}
    second = next(i for i in snapshot if i.instance_id == "web-2")
    assert second.key == "consul:web/node-2/web-2"
    assert second.manifest is None
    assert second.metadata == {"farp.enabled": "true", "farp.manifest": "/_farp/manifest"}
    assert backend.state == "synced"

    requests = consul.requests()
    assert all(r.headers["x-consul-token"] == TOKEN for r in requests)
    assert all(r.query["dc"] == "dc1" for r in requests)
    health = consul.requests("/v1/health/service/web")
    assert health and all("passing" in r.query for r in health)


async def test_services_option_filters_the_catalog(consul: FakeConsul) -> None:
    web(consul, "web-1")
    consul.register("api", "api-1")
    backend = backend_for(consul, services=["web"])
    async with Collector(backend) as seen:
        snapshot = await seen.wait_for(lambda s: len(s) == 1)
    assert addresses(snapshot) == {"10.0.0.1:8080"}
    assert consul.requests("/v1/health/service/api") == []
    assert consul.requests("/v1/health/service/consul") == []


async def test_blocking_queries_deliver_changes_and_removals(consul: FakeConsul) -> None:
    web(consul, "web-1")
    consul.register("api", "api-1", node_address="10.0.9.1")
    backend = backend_for(consul, services=["web", "api", "cart"])
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.9.1:8080"})

        consul.register("web", "web-2", node="node-2", node_address="10.0.0.2")
        await seen.wait_for(lambda s: addresses(s, "web") == {"10.0.0.1:8080", "10.0.0.2:8080"})

        consul.set_passing("web", "web-1", False)  # failing check: out of ?passing
        await seen.wait_for(lambda s: addresses(s, "web") == {"10.0.0.2:8080"})

        consul.deregister("api", "api-1")  # the service leaves the catalog
        await seen.wait_for(lambda s: addresses(s, "api") == set())

        consul.register("cart", "cart-1", node_address="10.0.8.1")  # a new service
        await seen.wait_for(lambda s: addresses(s, "cart") == {"10.0.8.1:8080"})

    held = [r for r in consul.requests() if "index" in r.query]
    assert held and all(r.query["wait"] == "2s" for r in held)
    # Changes arrive by answers to held queries, not by polling: a handful of requests.
    assert len(consul.requests(CATALOG)) < 10


async def test_index_going_backwards_relists(consul: FakeConsul) -> None:
    web(consul, "web-1")
    backend = backend_for(consul, services=["web"])
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
        await until(lambda: any("index" in r.query for r in consul.requests(CATALOG)))
        before = len([r for r in consul.requests(CATALOG) if "index" not in r.query])

        consul.reset_index(
            lambda: consul.register("web", "web-2", node="node-2", node_address="10.0.0.2")
        )
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.0.2:8080"})
        await until(lambda: backend.relists >= 1)
        # A clean re-list: queries without an index, which Consul answers at once.
        fresh = [r for r in consul.requests(CATALOG) if "index" not in r.query]
        assert len(fresh) > before
        # Then blocking resumes from the new, lower numbering.
        await until(
            lambda: any(int(r.query.get("index", 10**9)) <= 4 for r in consul.requests(CATALOG))
        )
        assert backend.state == "synced"


async def test_outage_keeps_the_last_snapshot_and_recovers(
    consul: FakeConsul, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="octopus.discovery")
    web(consul, "web-1")
    backend = backend_for(consul, services=["web"])
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
        yielded = len(seen.snapshots)

        consul.stop()
        await until(lambda: backend.failures >= 4)
        assert backend.state == "unavailable"
        assert backend.last_error
        assert len(seen.snapshots) == yielded
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
        assert backend.outages == 1

        consul.register("web", "web-2", node="node-2", node_address="10.0.0.2")
        consul.start()  # same port, same data
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.0.2:8080"})
        await until(lambda: backend.state == "synced")
        assert backend.last_error is None
    assert len([r for r in caplog.records if "recovered" in r.getMessage()]) == 1


async def test_rejected_token_is_an_outage_with_a_reason(consul: FakeConsul) -> None:
    web(consul, "web-1")
    backend = backend_for(consul, token="wrong", services=["web"])
    async with Collector(backend) as seen:
        await until(lambda: backend.state == "unavailable")
        assert "403" in str(backend.last_error)
        assert seen.snapshots == []
        consul.token = "wrong"  # the operator fixes the ACL: the retries get through
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})


async def test_read_key_serves_registry_schemas(consul: FakeConsul) -> None:
    document = b'{"openapi": "3.1.0", "paths": {}}'
    consul.put_kv("farp/schemas/web/openapi.json", document)
    consul.put_kv("farp/schemas/big/openapi.json.gz", gzip.compress(document * 3))
    consul.put_kv("farp/schemas/big/openapi.json", b"stale plain copy")
    backend = backend_for(consul)
    try:
        assert await backend.read_key("/schemas/web/openapi.json") == document
        assert await backend.read_key("schemas/big/openapi.json") == document * 3  # .gz first
        assert await backend.read_key("/schemas/none") is None
        kv = [r for r in consul.requests() if r.path.startswith("/v1/kv/")]
        assert all("raw" in r.query and r.headers["x-consul-token"] == TOKEN for r in kv)
        consul.stop()
        assert await backend.read_key("/schemas/web/openapi.json") is None  # down: not found
    finally:
        await backend.close()
