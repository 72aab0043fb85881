"""Active health checks: endpoints leave rotation when their checks fail, return when
they pass, and an upstream with nothing healthy fails fast."""

from __future__ import annotations

import time

import httpx

from tests.resilience.helpers import config_for, endpoint_view, served_by
from tests.support.controlled import ControlledUpstream, MakeControlled
from tests.support.gateway import MakeGateway
from tests.support.waiting import eventually

HEALTH_CHECK = {
    "type": "http",
    "path": "/health",
    "interval": "100ms",
    "timeout": "500ms",
    "healthy_threshold": 1,
    "unhealthy_threshold": 2,
}


def _healthy(client: httpx.Client, server: ControlledUpstream) -> bool:
    return bool(endpoint_view(client, server)["healthy"])


def test_an_endpoint_failing_its_health_check_gets_no_traffic_until_it_passes_again(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    sick, well = make_upstream("sick"), make_upstream("well")
    gw = make_gateway(config_for([sick, well], health_check=HEALTH_CHECK))

    with gw.client() as client:
        eventually(lambda: sick.app.health_probes >= 2, message="no health probe arrived")
        sick.app.health_status = 503  # real requests would still be answered fine
        eventually(lambda: not _healthy(client, sick), timeout=3)

        before = sick.app.arrivals
        order = [served_by(client.get(f"/down/{i}")) for i in range(10)]
        assert order == ["well"] * 10
        assert sick.app.arrivals == before

        sick.app.health_status = 200
        eventually(lambda: _healthy(client, sick), timeout=3)
        order = [served_by(client.get(f"/up/{i}")) for i in range(10)]
        assert order.count("sick") == 5


def test_a_stopped_endpoint_is_marked_down_and_back_up_once_it_restarts(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    flaky, steady = make_upstream("flaky"), make_upstream("steady")
    gw = make_gateway(config_for([flaky, steady], health_check=HEALTH_CHECK))

    with gw.client() as client:
        assert sorted({served_by(client.get(f"/before/{i}")) for i in range(4)}) == [
            "flaky",
            "steady",
        ]
        flaky.stop()
        eventually(lambda: not _healthy(client, flaky), timeout=3)
        assert [served_by(client.get(f"/down/{i}")) for i in range(6)] == ["steady"] * 6

        flaky.start()  # same port
        eventually(lambda: _healthy(client, flaky), timeout=3)
        order = [served_by(client.get(f"/back/{i}")) for i in range(10)]
        assert order.count("flaky") == 5


def test_an_upstream_whose_endpoints_are_all_down_answers_503_at_once(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    servers = [make_upstream(name) for name in ("a", "b")]
    for server in servers:
        # Would hold every request past any client's patience, and fails its checks.
        server.app.delay = 30.0
        server.app.health_status = 503
    gw = make_gateway(config_for(servers, health_check=HEALTH_CHECK))

    with gw.client() as client:
        for server in servers:
            eventually(lambda server=server: not _healthy(client, server), timeout=3)
        started = time.monotonic()
        response = client.get("/anything")
        elapsed = time.monotonic() - started

    assert response.status_code == 503, response.text
    assert response.json()["error"] == "service_unavailable"
    assert elapsed < 0.25, elapsed
    assert sum(server.app.arrivals for server in servers) == 0


def test_removing_the_health_check_puts_a_down_endpoint_back_in_rotation(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    sick, well = make_upstream("sick"), make_upstream("well")
    gw = make_gateway(config_for([sick, well], health_check=HEALTH_CHECK))

    with gw.client() as client:
        sick.app.health_status = 503
        eventually(lambda: not _healthy(client, sick), timeout=3)

        gw.reload(config_for([sick, well]))  # nothing checks it any more

        eventually(lambda: _healthy(client, sick), timeout=1)
        order = [served_by(client.get(f"/after/{i}")) for i in range(10)]
        assert order.count("sick") == 5
