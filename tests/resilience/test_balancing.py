"""How each load-balancing algorithm spreads real traffic over real endpoints."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.resilience.helpers import config_for, endpoint_view, served_by
from tests.support.controlled import MakeControlled
from tests.support.gateway import MakeGateway
from tests.support.waiting import eventually


def test_round_robin_sends_each_endpoint_its_turn(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    servers = [make_upstream(name) for name in ("a", "b", "c")]
    gw = make_gateway(config_for(servers, load_balance="round-robin"))

    with gw.client() as client:
        order = [served_by(client.get(f"/rr/{i}")) for i in range(30)]

    assert Counter(order) == {"a": 10, "b": 10, "c": 10}
    # Turns, not bursts: every three consecutive requests reach all three endpoints.
    assert all(len(set(order[i : i + 3])) == 3 for i in range(0, 30, 3))


def test_weighted_80_20_splits_traffic_80_20_and_interleaves_it(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    heavy, light = make_upstream("heavy"), make_upstream("light")
    gw = make_gateway(config_for([(heavy, 80), (light, 20)], load_balance="weighted"))

    with gw.client() as client:
        order = [served_by(client.get(f"/w/{i}")) for i in range(100)]

    assert Counter(order) == {"heavy": 80, "light": 20}
    # Smooth weighted round-robin: one light pick in every five, never four in a row.
    assert all(order[i : i + 5].count("light") == 1 for i in range(0, 100, 5))


def test_least_conn_sends_new_requests_to_the_idle_endpoint(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    busy, idle = make_upstream("busy"), make_upstream("idle")
    busy.app.delay = 30.0  # held until released at the end of the test
    gw = make_gateway(config_for([busy, idle], load_balance="least-conn"))

    with gw.client() as client, ThreadPoolExecutor(4) as pool:
        try:
            # Four concurrent requests: those that land on `busy` stay there, those on
            # `idle` finish at once. Ties take turns, so `busy` holds at least one.
            background = [pool.submit(client.get, f"/occupy/{i}") for i in range(4)]
            eventually(
                lambda: (
                    busy.app.in_flight >= 1
                    and busy.app.in_flight + sum(f.done() for f in background) == 4
                ),
                message="the busy endpoint never held a request",
            )
            held = busy.app.in_flight
            assert endpoint_view(client, busy)["in_flight"] == held

            order = [served_by(client.get(f"/next/{i}", timeout=2)) for i in range(20)]

            assert order == ["idle"] * 20
            assert busy.app.arrivals == held
            assert endpoint_view(client, idle)["in_flight"] == 0
        finally:
            busy.app.release()
        assert all(f.result().status_code == 200 for f in background)


def test_p2c_ewma_prefers_the_fast_endpoint(
    make_upstream: MakeControlled, make_gateway: MakeGateway
) -> None:
    slow, fast = make_upstream("slow"), make_upstream("fast")
    slow.app.delay = 0.2
    gw = make_gateway(config_for([slow, fast], load_balance="p2c-ewma"))

    with gw.client() as client:
        order = [served_by(client.get(f"/p2c/{i}")) for i in range(50)]
        slow_view, fast_view = endpoint_view(client, slow), endpoint_view(client, fast)

    # Round-robin would send 25 to each; p2c measures `slow` once or twice and then
    # keeps to `fast` (its latency estimate decays over ~10 s, far beyond this test).
    assert order.count("slow") <= 3, order
    assert slow_view["ewma_ms"] > 100 > fast_view["ewma_ms"]


def _header_key(key: str) -> dict[str, str]:
    return {"x-user": key}


def _cookie_key(key: str) -> dict[str, str]:
    return {"cookie": f"theme=dark; session={key}; lang=en"}


HASH_KEYS = pytest.mark.parametrize(
    ("hash_on", "keyed"),
    [("header:X-User", _header_key), ("cookie:session", _cookie_key)],
    ids=["header", "cookie"],
)


def _owners(client: httpx.Client, keys: list[str], keyed: Callable[[str], dict[str, str]]) -> dict:
    return {key: served_by(client.get(f"/hash/{key}", headers=keyed(key))) for key in keys}


@HASH_KEYS
def test_consistent_hash_keeps_each_key_on_one_endpoint(
    make_upstream: MakeControlled,
    make_gateway: MakeGateway,
    hash_on: str,
    keyed: Callable[[str], dict[str, str]],
) -> None:
    servers = [make_upstream(name) for name in ("a", "b", "c", "d")]
    gw = make_gateway(config_for(servers, load_balance="consistent-hash", hash_on=hash_on))
    keys = [f"user-{i}" for i in range(120)]

    with gw.client() as client:
        first = _owners(client, keys, keyed)
        second = _owners(client, list(reversed(keys)), keyed)

    assert second == first
    spread = Counter(first.values())
    assert set(spread) == {"a", "b", "c", "d"}
    assert min(spread.values()) >= 12, spread  # ~30 each; no endpoint is starved


@HASH_KEYS
def test_consistent_hash_moves_only_the_removed_endpoints_keys(
    make_upstream: MakeControlled,
    make_gateway: MakeGateway,
    hash_on: str,
    keyed: Callable[[str], dict[str, str]],
) -> None:
    servers = [make_upstream(name) for name in ("a", "b", "c", "d")]
    tuning = {"load_balance": "consistent-hash", "hash_on": hash_on}
    gw = make_gateway(config_for(servers, **tuning))
    keys = [f"user-{i}" for i in range(400)]

    with gw.client() as client:
        before = _owners(client, keys, keyed)
        removed = servers[2]
        gw.reload(config_for([s for s in servers if s is not removed], **tuning))
        arrivals = removed.app.arrivals
        after = _owners(client, keys, keyed)

    moved = {key for key in keys if after[key] != before[key]}
    assert moved == {key for key in keys if before[key] == "c"}
    assert 0.12 <= len(moved) / len(keys) <= 0.38, len(moved)  # ~1/4 for 4 endpoints
    assert removed.app.arrivals == arrivals
    assert len({after[key] for key in moved}) == 3  # its keys spread over the others
