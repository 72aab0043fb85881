"""The ``eureka`` discovery backend against a fake Eureka server.

No Eureka runs where these tests run, so they use
:class:`tests.discovery.fakes.eureka.FakeEureka`, an in-test HTTP server that speaks
Eureka's REST API as its clients see it: ``/eureka/apps`` and ``/eureka/apps/delta`` in
Eureka's JSON (``port.$``, ``@class`` maps, one-per-change ``actionType`` entries),
``apps__hashcode`` computed over the whole registry so that a change missing from the
delta window shows up as a hash mismatch (forcing a full fetch), JSON only on
``Accept: application/json``, and HTTP basic authentication.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.discovery.eureka import EurekaBackend, reconcile_hashcode
from tests.discovery.fakes.common import Collector, addresses, until
from tests.discovery.fakes.eureka import FakeEureka

USER, PASSWORD = "eureka", "s3cret"
FARP = {"farp.enabled": "true", "farp.manifest": "http://10.0.0.1:8080/_farp/manifest"}


@pytest.fixture
def eureka() -> Iterator[FakeEureka]:
    fake = FakeEureka(username=USER, password=PASSWORD)
    fake.start()
    yield fake
    fake.stop()


def backend_for(fake: FakeEureka, **options: Any) -> EurekaBackend:
    options.setdefault("username", USER)
    options.setdefault("password", PASSWORD)
    return EurekaBackend(
        f"{fake.url}/eureka/", interval=0.02, backoff_initial=0.02, backoff_max=0.2, **options
    )


def full_fetches(fake: FakeEureka) -> int:
    return len(fake.requests("/eureka/apps"))


def test_hashcode_is_eurekas() -> None:
    registry = {
        "A": {"1": {"status": "UP"}, "2": {"status": "DOWN"}},
        "B": {"3": {"status": "UP"}, "4": {"status": "UP"}, "5": {"status": "STARTING"}},
    }
    assert reconcile_hashcode(registry) == "DOWN_1_STARTING_1_UP_3_"
    assert reconcile_hashcode({}) == ""


async def test_initial_fetch_keeps_up_instances_with_their_metadata(eureka: FakeEureka) -> None:
    eureka.register("orders", "orders-1", "10.0.0.1", 8080, metadata={**FARP, "zone": "a"})
    eureka.register("orders", "orders-2", "10.0.0.2", 8080, status="DOWN")
    eureka.register("orders", "orders-3", "10.0.0.3", 8080, status="STARTING")
    eureka.register("billing", "billing-1", "10.0.1.1", 9090)  # empty metadata (@class map)

    backend = backend_for(eureka)
    async with Collector(backend) as seen:
        snapshot = await seen.wait_for(lambda s: len(s) == 2)

    assert addresses(snapshot) == {"10.0.0.1:8080", "10.0.1.1:9090"}
    orders = next(i for i in snapshot if i.instance_id == "orders-1")
    assert orders.key == "eureka:ORDERS/orders-1"
    assert orders.service_name == "orders"
    assert orders.manifest is None
    assert orders.metadata == FARP
    billing = next(i for i in snapshot if i.instance_id == "billing-1")
    assert billing.metadata == {}
    assert backend.state == "synced"
    requests = eureka.requests()
    assert all(r.headers["authorization"].startswith("Basic ") for r in requests)
    assert all(r.headers["accept"] == "application/json" for r in requests)


async def test_deltas_apply_additions_changes_and_removals(eureka: FakeEureka) -> None:
    eureka.register("orders", "orders-1", "10.0.0.1", 8080)
    backend = backend_for(eureka)
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})

        eureka.register("orders", "orders-2", "10.0.0.2", 8080)  # ADDED
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.0.2:8080"})

        eureka.set_status("orders", "orders-1", "OUT_OF_SERVICE")  # MODIFIED
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.2:8080"})

        eureka.register("orders", "orders-2", "10.0.0.2", 8080, metadata=FARP)  # MODIFIED
        await seen.wait_for(lambda s: s[0].metadata == FARP)

        eureka.cancel("orders", "orders-2")  # DELETED
        await seen.wait_for(lambda s: s == [])
        await until(lambda: len(eureka.requests("/eureka/apps/delta")) >= 5)

    # Everything came through deltas whose hash matched: one full fetch only.
    assert full_fetches(eureka) == 1
    assert backend.relists == 0


async def test_hash_mismatch_forces_a_full_fetch(eureka: FakeEureka) -> None:
    eureka.register("orders", "orders-1", "10.0.0.1", 8080)
    backend = backend_for(eureka)
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
        eureka.expire_deltas()
        # A change that left the delta window before the backend polled: only the hash shows it.
        eureka.quiet(lambda: eureka.register("orders", "orders-2", "10.0.0.2", 8080))
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.0.2:8080"})
        assert backend.relists >= 1
        assert full_fetches(eureka) >= 2


async def test_deltas_disabled_fall_back_to_full_fetches(eureka: FakeEureka) -> None:
    eureka.deltas = False
    eureka.register("orders", "orders-1", "10.0.0.1", 8080)
    backend = backend_for(eureka)
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
        eureka.register("orders", "orders-2", "10.0.0.2", 8080)
        await seen.wait_for(lambda s: len(s) == 2)
        assert backend.state == "synced"


async def test_outage_keeps_the_last_snapshot_and_recovers(
    eureka: FakeEureka, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="octopus.discovery")
    eureka.register("orders", "orders-1", "10.0.0.1", 8080)
    backend = backend_for(eureka)
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
        yielded = len(seen.snapshots)

        eureka.stop()
        await until(lambda: backend.failures >= 4)
        assert backend.state == "unavailable"
        assert backend.last_error
        assert len(seen.snapshots) == yielded
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
        assert backend.outages == 1

        eureka.expire_deltas()  # the outage outlasted the delta window
        eureka.quiet(lambda: eureka.register("orders", "orders-2", "10.0.0.2", 8080))
        before = full_fetches(eureka)
        eureka.start()  # same port
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.0.2:8080"})
        assert backend.state == "synced" and backend.last_error is None
        assert full_fetches(eureka) > before  # recovery starts with a full fetch
    assert len([r for r in caplog.records if "recovered" in r.getMessage()]) == 1


async def test_rejected_credentials_are_an_outage_with_a_reason(eureka: FakeEureka) -> None:
    eureka.register("orders", "orders-1", "10.0.0.1", 8080)
    backend = backend_for(eureka, password="wrong")
    async with Collector(backend) as seen:
        await until(lambda: backend.state == "unavailable")
        assert "401" in str(backend.last_error)
        assert seen.snapshots == []
        eureka.password = "wrong"
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
