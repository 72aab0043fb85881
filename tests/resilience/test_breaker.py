"""Circuit breakers and outlier ejection, seen from outside: traffic, admin API, metrics."""

from __future__ import annotations

import httpx

from tests.resilience.helpers import breaker_gauge, config_for, endpoint_view, served_by
from tests.support.controlled import ControlledUpstream, MakeControlled
from tests.support.gateway import MakeGateway
from tests.support.waiting import eventually

BREAKER = {"failure_threshold": 3, "timeout": "1s", "half_open_requests": 1}
CLOSED, HALF_OPEN, OPEN = 0.0, 1.0, 2.0


def _trip(client: httpx.Client, failing: ControlledUpstream) -> None:
    """Send GETs (each must still succeed, retried elsewhere) until ``failing``'s breaker
    is open."""
    for index in range(20):
        assert served_by(client.get(f"/trip/{index}")) != failing.name
        if endpoint_view(client, failing)["breaker"] == "open":
            return
    raise AssertionError(f"the breaker never opened: {endpoint_view(client, failing)}")


def test_a_breaker_opens_stops_traffic_probes_after_its_timeout_and_closes(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    failing, healthy = make_upstream("failing"), make_upstream("healthy")
    failing.app.fail_status = 503
    gw = make_gateway(config_for([failing, healthy], circuit_breaker=BREAKER))

    with gw.client() as client:
        assert breaker_gauge(client, failing) == CLOSED
        _trip(client, failing)
        assert failing.app.arrivals == BREAKER["failure_threshold"]
        assert breaker_gauge(client, failing) == OPEN
        assert endpoint_view(client, healthy)["breaker"] == "closed"

        # Open: no request goes to the endpoint, even once it has recovered.
        failing.app.heal()
        order = [served_by(client.get(f"/open/{i}")) for i in range(10)]
        assert order == ["healthy"] * 10
        assert failing.app.arrivals == BREAKER["failure_threshold"]

        # After `timeout` it turns half-open by itself, without any traffic: the metric
        # (scraped alone, before anything else looks at the breaker) and the admin API.
        eventually(lambda: breaker_gauge(client, failing) == HALF_OPEN, timeout=3)
        assert endpoint_view(client, failing)["breaker"] == "half-open"

        # One probe reaches the endpoint; its success closes the breaker.
        eventually(
            lambda: (
                client.get("/probe").status_code == 200
                and failing.app.arrivals > BREAKER["failure_threshold"]
            ),
            message="no half-open probe reached the endpoint",
        )
        assert failing.app.arrivals == BREAKER["failure_threshold"] + 1
        assert endpoint_view(client, failing)["breaker"] == "closed"
        assert breaker_gauge(client, failing) == CLOSED
        order = [served_by(client.get(f"/closed/{i}")) for i in range(10)]
        assert sorted(set(order)) == ["failing", "healthy"]


def test_a_failed_half_open_probe_opens_the_breaker_again(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    failing, healthy = make_upstream("failing"), make_upstream("healthy")
    failing.app.fail_status = 503
    gw = make_gateway(config_for([failing, healthy], circuit_breaker=BREAKER))

    with gw.client() as client:
        _trip(client, failing)
        tripped = failing.app.arrivals
        eventually(lambda: endpoint_view(client, failing)["breaker"] == "half-open", timeout=3)

        # The probe fails (the client is still served, by the other endpoint)...
        eventually(
            lambda: served_by(client.get("/probe")) == "healthy" and failing.app.arrivals > tripped,
            message="no half-open probe reached the endpoint",
        )

        # ...so the breaker is open again, and traffic stays away for another timeout.
        assert failing.app.arrivals == tripped + 1
        assert endpoint_view(client, failing)["breaker"] == "open"
        assert breaker_gauge(client, failing) == OPEN
        assert [served_by(client.get(f"/again/{i}")) for i in range(5)] == ["healthy"] * 5
        assert failing.app.arrivals == tripped + 1


def test_an_endpoint_removed_from_the_config_leaves_the_breaker_metric(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    failing, healthy = make_upstream("failing"), make_upstream("healthy")
    failing.app.fail_status = 503
    config = config_for([failing, healthy], circuit_breaker=BREAKER)
    gw = make_gateway(config)

    with gw.client() as client:
        _trip(client, failing)
        assert breaker_gauge(client, failing) == OPEN

        gw.reload(config_for([healthy], circuit_breaker=BREAKER))

        # A gauge left behind would report an open breaker that no longer exists.
        assert breaker_gauge(client, failing) is None
        assert breaker_gauge(client, healthy) == CLOSED


def test_an_endpoint_failing_in_a_row_is_ejected_and_gets_no_traffic(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    servers = [make_upstream(name) for name in ("a", "b", "c")]
    outlier = servers[0]
    outlier.app.fail_status = 503
    gw = make_gateway(config_for(servers))  # no breaker: only outlier detection acts

    with gw.client() as client:
        for index in range(20):
            assert served_by(client.get(f"/warm/{index}")) != "a"
            if endpoint_view(client, outlier)["ejected"]:
                break
        view = endpoint_view(client, outlier)
        assert view["ejected"] is True
        assert view["healthy"] is True and view["breaker"] == "closed"
        assert [endpoint_view(client, s)["ejected"] for s in servers[1:]] == [False, False]

        ejected_after = outlier.app.arrivals
        assert ejected_after == 5  # the detector's consecutive-error threshold
        order = [served_by(client.get(f"/after/{i}")) for i in range(20)]

    assert outlier.app.arrivals == ejected_after
    assert sorted(set(order)) == ["b", "c"]


def test_an_ejection_survives_a_rebuild_of_the_routing_table(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    servers = [make_upstream(name) for name in ("a", "b", "c")]
    outlier = servers[0]
    outlier.app.fail_status = 503
    config = config_for(servers)
    gw = make_gateway(config)

    with gw.client() as client:
        for index in range(20):
            client.get(f"/warm/{index}")
            if endpoint_view(client, outlier)["ejected"]:
                break
        assert endpoint_view(client, outlier)["ejected"] is True

        # Any rebuild (a FARP manifest changing elsewhere, a config reload) builds new
        # Upstream objects; the endpoint's ejection must not be forgotten with the old one.
        gw.reload(config)

        assert endpoint_view(client, outlier)["ejected"] is True
        before = outlier.app.arrivals
        assert "a" not in [served_by(client.get(f"/after/{i}")) for i in range(10)]
        assert outlier.app.arrivals == before


def test_an_ejected_endpoint_left_alone_in_its_upstream_takes_traffic_again(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    servers = [make_upstream(name) for name in ("a", "b")]
    outlier = servers[0]
    outlier.app.fail_status = 503
    gw = make_gateway(config_for(servers))

    with gw.client() as client:
        for index in range(20):
            client.get(f"/warm/{index}")
            if endpoint_view(client, outlier)["ejected"]:
                break
        assert endpoint_view(client, outlier)["ejected"] is True
        outlier.app.heal()

        # A single-endpoint upstream is never ejected: that would only turn its errors
        # into 503s. The verdict of the old, two-endpoint table must not linger.
        gw.reload(config_for([outlier]))

        assert endpoint_view(client, outlier)["ejected"] is False
        assert served_by(client.get("/alone")) == "a"
