"""Retries: what is tried again and where, what never is, and what caps them."""

from __future__ import annotations

import time

from tests.resilience.helpers import ClientLoop, config_for, endpoint_view, served_by
from tests.support.controlled import MakeControlled
from tests.support.gateway import MakeGateway
from tests.support.waiting import eventually


def test_a_killed_endpoint_costs_a_client_loop_no_errors(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    servers = [make_upstream(name) for name in ("a", "b", "c")]
    victim = servers[1]
    gw = make_gateway(config_for(servers))

    with ClientLoop(gw) as loop:
        loop.wait_for(60)
        victim.stop()  # its kept-alive connections close; new ones are refused
        killed_at = loop.count
        loop.wait_for(killed_at + 150)

    assert loop.errors == []
    # Its refusals were seen (and retried elsewhere) until outlier detection ejected it.
    with gw.client() as client:
        assert endpoint_view(client, victim)["ejected"] is True
    assert loop.count >= killed_at + 150
    # Before the kill the victim took its share; afterwards the others served everything.
    assert "b" in loop.served[:killed_at]
    assert "b" not in loop.served[killed_at + 5 :]
    assert {"a", "c"} <= set(loop.served[killed_at:])


def test_a_post_that_reached_an_endpoint_is_never_sent_again(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    failing, healthy = make_upstream("failing"), make_upstream("healthy")
    failing.app.fail_status = 503
    gw = make_gateway(config_for([failing, healthy], retries=2))

    with gw.client() as client:
        statuses = [client.post(f"/orders/{i}", json={"n": i}).status_code for i in range(6)]

    # Each POST arrived exactly once; those that met the failing endpoint got its 503.
    assert failing.app.arrivals + healthy.app.arrivals == 6
    assert failing.app.arrivals >= 1
    assert statuses.count(503) == failing.app.arrivals
    assert statuses.count(200) == healthy.app.arrivals


def test_a_post_whose_connection_is_refused_is_sent_to_another_endpoint(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    live = make_upstream("live")
    dead = make_upstream("dead")
    dead.stop()  # nothing listens there: the POST was never sent, so trying again is safe
    gw = make_gateway(config_for([dead, live]))

    with gw.client() as client:
        responses = [client.post(f"/orders/{i}", json={"n": i}) for i in range(4)]

    assert [served_by(r) for r in responses] == ["live"] * 4
    assert live.app.arrivals_of("POST") == 4


def test_a_post_is_retried_elsewhere_when_the_route_allows_it(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    failing, healthy = make_upstream("failing"), make_upstream("healthy")
    failing.app.fail_status = 503
    config = config_for([failing, healthy], retries=2, route_options={"retry_non_idempotent": True})
    gw = make_gateway(config)

    with gw.client() as client:
        responses = [client.post(f"/orders/{i}", json={"n": i}) for i in range(6)]

    assert [r.status_code for r in responses] == [200] * 6
    assert healthy.app.arrivals_of("POST") == 6
    assert failing.app.arrivals_of("POST") >= 1
    # The replayed request carried its whole body.
    assert all(r["body_size"] == len(b'{"n":0}') for r in healthy.app.requests)


def test_a_503_from_one_endpoint_is_retried_on_another_for_a_get(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    failing, healthy = make_upstream("failing"), make_upstream("healthy")
    failing.app.fail_status = 503
    gw = make_gateway(config_for([failing, healthy], retry_on_status=[503]))

    with gw.client() as client:
        order = [served_by(client.get(f"/items/{i}")) for i in range(10)]

    assert order == ["healthy"] * 10
    assert failing.app.arrivals >= 1
    assert healthy.app.arrivals == 10


def test_a_status_missing_from_retry_on_status_is_relayed_as_is(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    failing, healthy = make_upstream("failing"), make_upstream("healthy")
    failing.app.fail_status = 503
    gw = make_gateway(config_for([failing, healthy], retry_on_status=[502]))

    with gw.client() as client:
        statuses = [client.get(f"/items/{i}").status_code for i in range(6)]

    assert statuses.count(503) == failing.app.arrivals >= 1
    assert failing.app.arrivals + healthy.app.arrivals == 6


def test_the_retry_budget_caps_amplification_when_every_endpoint_fails(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    servers = [make_upstream(name) for name in ("a", "b", "c")]
    for server in servers:
        server.app.fail_status = 503
    # Up to 3 attempts per request: without a budget, 3x the load on a failing upstream.
    gw = make_gateway(config_for(servers, retries=2))
    requests = 100

    with gw.client() as client:
        statuses = [client.get(f"/outage/{i}").status_code for i in range(requests)]

    arrivals = sum(server.app.arrivals for server in servers)
    # The budget: retries <= 20% of requests + a floor of 3/s over its 10 s window.
    assert requests < arrivals <= 1.2 * requests + 30
    # Whether or not a retry was allowed, the client sees the upstream's own answer.
    assert statuses == [503] * requests


def test_the_route_timeout_covers_every_retry(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    servers = [make_upstream(name) for name in ("a", "b", "c")]
    for server in servers:
        server.app.delay = 0.3
        server.app.fail_status = 503
    gw = make_gateway(config_for(servers, retries=3, route_options={"timeout": "500ms"}))

    with gw.client() as client:
        started = time.monotonic()
        response = client.get("/slow-and-failing")
        elapsed = time.monotonic() - started

    # One attempt takes 0.3 s; four would take 1.2 s. The deadline is for all of them.
    assert response.status_code == 504, response.text
    assert response.json()["error"] == "gateway_timeout"
    assert 0.45 <= elapsed < 0.7, elapsed
    # The attempt cut short by the deadline was hung up on, not left running upstream.
    eventually(lambda: any(r.get("abandoned") for s in servers for r in s.app.requests))
