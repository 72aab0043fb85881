"""The ``rate-limit`` plugin: GCRA in process and in Redis, against real gateways, a real
upstream and a real ``redis-server`` (the multi-worker and multi-instance cases run the
``octopus`` process itself)."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from plugins.api import Plugin, PluginMetadata, RequestContext, Response
from plugins.rate_limit import LocalBuckets, parse_key
from settings import ConfigError
from tests.e2e.helpers import GatewayProcess, minimal_config, start_gateway
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.redis_server import RedisServer
from tests.support.upstream import UpstreamApp, UpstreamServer
from tests.support.waiting import eventually

RATE_HEADERS = (
    "ratelimit-policy",
    "ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)


class ClaimsFromHeader(Plugin):
    """Stands in for an auth plugin: ``X-Test-Sub: alice`` → ``ctx.state["claims"]``."""

    metadata = PluginMetadata(name="test-claims")

    async def on_request(self, ctx: RequestContext) -> Response | None:
        subject = ctx.header("x-test-sub")
        if subject is not None:
            ctx.state["claims"] = {"sub": subject}
        return None


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[UpstreamServer]:
    with UpstreamServer("limited") as server:
        yield server


@pytest.fixture
def upstream(upstream_server: UpstreamServer) -> UpstreamApp:
    upstream_server.app.reset()
    return upstream_server.app


@pytest.fixture
def make_gateway(upstream_server: UpstreamServer) -> Iterator[Callable[..., GatewayServer]]:
    """``make_gateway(config, routes=None)``: a gateway whose ``/limited/...`` route runs
    ``rate-limit`` with ``config``; stopped at teardown."""
    started: list[GatewayServer] = []

    def make(
        config: dict[str, Any],
        routes: list[dict[str, Any]] | None = None,
        plugins: list[dict[str, Any]] | None = None,
    ) -> GatewayServer:
        routes = routes or [route("limited", "/limited/{rest:path}", "up", plugins=["rate-limit"])]
        if config.get("backend") == "redis":
            # Generous: a busy test machine must not open the circuit by a slow answer.
            config = {"redis_timeout": "1s", **config}
        entries = [{"name": "rate-limit", "config": config}, *(plugins or [])]
        server = GatewayServer(
            gateway_config({"up": upstream_server.url}, routes, plugins=entries)
        ).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def statuses(
    client: httpx.Client, count: int, path: str = "/limited/x", **options: Any
) -> list[int]:
    return [client.get(path, **options).status_code for _ in range(count)]


def fresh_connection_get(url: str) -> int:
    """One request on a connection of its own, so a multi-worker gateway spreads them."""
    with httpx.Client(timeout=10) as client:
        return client.get(url, headers={"connection": "close"}).status_code


# --- the algorithm ---------------------------------------------------------------------


def test_gcra_admits_the_limit_at_once_then_one_per_emission_interval() -> None:
    buckets = LocalBuckets(limit=4, window=8.0)  # one request every 2 s once the burst is used
    admitted = [buckets.check("k", 100.0).allowed for _ in range(6)]
    assert admitted == [True, True, True, True, False, False]
    assert not buckets.check("k", 101.9).allowed
    assert buckets.check("k", 102.0).allowed
    refused = buckets.check("k", 102.5)
    assert not refused.allowed and refused.retry_after == pytest.approx(1.5)


def test_gcra_reports_remaining_and_seconds_until_the_bucket_is_full() -> None:
    buckets = LocalBuckets(limit=5, window=10.0)
    first = buckets.check("k", 0.0)
    second = buckets.check("k", 0.0)
    assert (first.remaining, first.reset) == (4, pytest.approx(2.0))
    assert (second.remaining, second.reset) == (3, pytest.approx(4.0))


def test_local_buckets_drop_idle_keys_lazily_so_memory_stays_bounded() -> None:
    buckets = LocalBuckets(limit=10, window=1.0)
    for second in range(200):
        for index in range(50):
            buckets.check(f"client-{second}-{index}", float(second))
    # Each check removes up to two expired buckets: only about one window's worth is left.
    assert len(buckets.tats) <= 150


def test_key_specs_combine_with_plus_and_reject_unknown_parts() -> None:
    assert parse_key("ip+route") == (("ip", ""), ("route", ""))
    assert parse_key("header:X-Api-Key+claim:sub") == (("header", "x-api-key"), ("claim", "sub"))
    for bad in ("cookie:a", "header:", "ip:x", "ip++route"):
        with pytest.raises(ValueError):
            parse_key(bad)


def test_invalid_rate_limit_config_stops_start_up_naming_the_key(
    upstream_server: UpstreamServer,
) -> None:
    for config, key in (
        ({"key": "cookie:session"}, "config.key"),
        ({"window": "soon"}, "config.window"),
        ({"limit": 0}, "config.limit"),
        ({"backend": "memcached"}, "config.backend"),
    ):
        with pytest.raises(ConfigError, match=key):
            GatewayServer(
                gateway_config(
                    {"up": upstream_server.url},
                    [route("r", "/{rest:path}", "up", plugins=["rate-limit"])],
                    plugins=[{"name": "rate-limit", "config": config}],
                )
            )


# --- local backend ---------------------------------------------------------------------


def test_local_limit_admits_exactly_the_limit_within_a_window(
    make_gateway: Callable[..., GatewayServer], upstream: UpstreamApp
) -> None:
    gateway = make_gateway({"limit": 5, "window": "1m"})
    with gateway.client() as client:
        results = statuses(client, 10)
    assert results == [200] * 5 + [429] * 5
    assert len(upstream.requests) == 5


def test_every_response_carries_consistent_rate_limit_headers(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = make_gateway({"limit": 3, "window": "30s"})
    with gateway.client() as client:
        responses = [client.get("/limited/x") for _ in range(4)]
    for response in responses:
        assert all(name in response.headers for name in RATE_HEADERS), response.headers
        assert response.headers["ratelimit-policy"] == "3;w=30"
        assert response.headers["x-ratelimit-limit"] == "3"
        limit, remaining, reset = (
            part.split("=")[1] for part in response.headers["ratelimit"].split(", ")
        )
        assert limit == "3"
        assert remaining == response.headers["x-ratelimit-remaining"]
        assert reset == response.headers["x-ratelimit-reset"]
        assert 0 < int(reset) <= 30
    assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["2", "1", "0", "0"]


def test_refusal_is_429_in_the_gateway_error_shape_with_retry_after(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = make_gateway({"limit": 2, "window": "10s"})
    with gateway.client() as client:
        statuses(client, 2)
        refused = client.get("/limited/x")
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "rate_limited"
    assert body["request_id"] == refused.headers["x-request-id"]
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 5  # the next slot opens window/limit = 5 s later
    assert refused.headers["x-ratelimit-remaining"] == "0"


def test_retry_after_is_at_least_one_second_for_sub_second_waits(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = make_gateway({"limit": 10, "window": "1s"})  # a slot every 100 ms
    with gateway.client() as client:
        refused = next(
            r for r in (client.get("/limited/x") for _ in range(30)) if r.status_code == 429
        )
    assert refused.headers["retry-after"] == "1"


def test_ip_key_gives_each_client_address_its_own_bucket(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = make_gateway({"limit": 2, "window": "1m", "key": "ip"})
    other = httpx.Client(
        base_url=gateway.url, timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.2")
    )
    with gateway.client() as client, other:
        assert statuses(client, 3) == [200, 200, 429]
        assert statuses(other, 3) == [200, 200, 429]


def test_header_key_limits_per_header_value_and_falls_back_to_the_ip(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = make_gateway({"limit": 2, "window": "1m", "key": "header:X-Api-Key"})
    with gateway.client() as client:
        assert statuses(client, 3, headers={"x-api-key": "a"}) == [200, 200, 429]
        assert statuses(client, 2, headers={"x-api-key": "b"}) == [200, 200]
        assert statuses(client, 3) == [200, 200, 429]  # no header: the client's IP bucket


def test_route_key_counts_each_route_separately(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    routes = [
        route("one", "/one/{rest:path}", "up", plugins=["rate-limit"]),
        route("two", "/two/{rest:path}", "up", plugins=["rate-limit"]),
    ]
    gateway = make_gateway({"limit": 2, "window": "1m", "key": "route"}, routes)
    with gateway.client() as client:
        assert statuses(client, 3, "/one/a") == [200, 200, 429]
        assert statuses(client, 3, "/two/a") == [200, 200, 429]


def test_ip_plus_route_key_separates_routes_for_the_same_client(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    routes = [
        route("one", "/one/{rest:path}", "up", plugins=["rate-limit"]),
        route("two", "/two/{rest:path}", "up", plugins=["rate-limit"]),
    ]
    gateway = make_gateway({"limit": 1, "window": "1m", "key": "ip+route"}, routes)
    with gateway.client() as client:
        assert statuses(client, 2, "/one/a") == [200, 429]
        assert statuses(client, 2, "/two/a") == [200, 429]


def test_claim_key_uses_the_verified_claims_and_falls_back_to_the_ip(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    routes = [route("limited", "/limited/{rest:path}", "up", plugins=["claims", "rate-limit"])]
    claims = {"name": "claims", "module": f"{__name__}:ClaimsFromHeader"}
    gateway = make_gateway({"limit": 2, "window": "1m", "key": "claim:sub"}, routes, [claims])
    with gateway.client() as client:
        assert statuses(client, 3, headers={"x-test-sub": "alice"}) == [200, 200, 429]
        assert statuses(client, 2, headers={"x-test-sub": "bob"}) == [200, 200]
        assert statuses(client, 3) == [200, 200, 429]


def test_with_two_limiters_the_headers_show_the_most_restrictive(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    routes = [route("limited", "/limited/{rest:path}", "up", plugins=["rate-limit", "strict"])]
    strict = {"name": "strict", "module": "plugins.rate_limit", "config": {"limit": 2}}
    gateway = make_gateway({"limit": 10, "window": "1m"}, routes, [strict])
    with gateway.client() as client:
        first = client.get("/limited/x")
        assert first.headers["x-ratelimit-limit"] == "2"
        assert first.headers["x-ratelimit-remaining"] == "1"
        assert statuses(client, 2) == [200, 429]


# --- redis backend ---------------------------------------------------------------------


def test_redis_limit_admits_exactly_the_limit_within_a_window(
    make_gateway: Callable[..., GatewayServer], redis_server: RedisServer
) -> None:
    gateway = make_gateway(
        {"limit": 5, "window": "1m", "backend": "redis", "redis_url": redis_server.url}
    )
    with gateway.client() as client:
        responses = [client.get("/limited/x") for _ in range(10)]
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 5
    assert [r.headers["x-ratelimit-remaining"] for r in responses[:5]] == ["4", "3", "2", "1", "0"]
    assert int(responses[-1].headers["retry-after"]) >= 1
    assert redis_server.keys("octopus:rl:*"), "the bucket lives in Redis"


def test_redis_buckets_are_shared_by_two_gateways(
    make_gateway: Callable[..., GatewayServer], redis_server: RedisServer
) -> None:
    config = {"limit": 6, "window": "1m", "backend": "redis", "redis_url": redis_server.url}
    first, second = make_gateway(config), make_gateway(config)
    with first.client() as a, second.client() as b:
        results = [(a if i % 2 else b).get("/limited/x").status_code for i in range(12)]
    assert results.count(200) == 6


def test_redis_check_is_one_script_loaded_again_after_a_flush(
    make_gateway: Callable[..., GatewayServer], redis_server: RedisServer
) -> None:
    gateway = make_gateway(
        {"limit": 5, "window": "1m", "backend": "redis", "redis_url": redis_server.url}
    )
    with gateway.client() as client:
        assert client.get("/limited/x").status_code == 200
        with redis_server.client() as admin:
            admin.script_flush()  # NOSCRIPT next time: EVALSHA must fall back to EVAL
        second = client.get("/limited/x")
    assert second.status_code == 200
    assert second.headers["x-ratelimit-remaining"] == "3"


def _outage_gateway(
    make_gateway: Callable[..., GatewayServer], server: RedisServer, fail_open: bool
) -> GatewayServer:
    return make_gateway(
        {
            "limit": 100,
            "window": "1m",
            "backend": "redis",
            "redis_url": server.url,
            "fail_open": fail_open,
        }
    )


def test_redis_killed_with_fail_open_lets_requests_through_without_headers(
    make_gateway: Callable[..., GatewayServer], upstream: UpstreamApp
) -> None:
    with RedisServer() as server:
        gateway = _outage_gateway(make_gateway, server, fail_open=True)
        with gateway.client() as client:
            assert client.get("/limited/x").headers["x-ratelimit-remaining"] == "99"
            server.kill()
            during = [client.get("/limited/x") for _ in range(5)]
    assert [r.status_code for r in during] == [200] * 5
    assert all("x-ratelimit-remaining" not in r.headers for r in during)
    assert len(upstream.requests) == 6


def test_redis_killed_with_fail_closed_answers_503(
    make_gateway: Callable[..., GatewayServer], upstream: UpstreamApp
) -> None:
    with RedisServer() as server:
        gateway = _outage_gateway(make_gateway, server, fail_open=False)
        with gateway.client() as client:
            assert client.get("/limited/x").status_code == 200
            server.kill()
            during = [client.get("/limited/x") for _ in range(5)]
    assert [r.status_code for r in during] == [503] * 5
    assert during[0].json()["error"] == "rate_limit_unavailable"
    assert len(upstream.requests) == 1


def test_redis_outage_is_logged_and_counted_once_per_state_change(
    make_gateway: Callable[..., GatewayServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="octopus.plugins.rate_limit")
    with RedisServer() as server:
        gateway = _outage_gateway(make_gateway, server, fail_open=True)
        plugin: Any = gateway.gateway.plugins.by_name["rate-limit"]
        with gateway.client() as client:
            client.get("/limited/x")
            server.kill()
            for _ in range(20):
                client.get("/limited/x")
            server.start()  # back, on the same port

            def limited_again() -> bool:
                return "x-ratelimit-remaining" in client.get("/limited/x").headers

            eventually(limited_again, timeout=5, interval=0.05)
    messages = [r.getMessage() for r in caplog.records if r.name == "octopus.plugins.rate_limit"]
    assert messages.count("redis unavailable") == 1
    assert messages.count("redis reachable again") == 1
    assert plugin.stats["redis_outages"] == 1
    assert plugin.stats["passed_open"] >= 20
    # The circuit: 20 requests in well under a second tried Redis once, not 20 times.
    assert plugin.stats["redis_failures"] <= 3


def test_an_unresponsive_redis_costs_one_short_timeout_per_second(
    make_gateway: Callable[..., GatewayServer],
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does), never answers
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    try:
        gateway = make_gateway(
            {"limit": 5, "backend": "redis", "redis_url": url, "redis_timeout": "100ms"}
        )
        with gateway.client() as client:
            started = time.monotonic()
            results = statuses(client, 10)
            elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert results == [200] * 10
    assert elapsed < 0.9  # at most one 100 ms timeout (start-up probe may take the first)


# --- the real process: workers and instances sharing Redis -------------------------------


def _process_config(upstream_url: str, redis_url: str, limit: int) -> dict[str, Any]:
    config = minimal_config(upstream_url)
    config["farp"] = {"enabled": False}
    config["admin"] = {"enabled": False}
    config["routes"][0]["plugins"] = ["rate-limit"]
    config["plugins"] = [
        {
            "name": "rate-limit",
            "config": {
                "limit": limit,
                "window": "1m",
                "backend": "redis",
                "redis_url": redis_url,
                "redis_timeout": "1s",
            },
        }
    ]
    return config


@pytest.fixture
def processes() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for handle in started:
        handle.stop(timeout=20)


def test_redis_limit_holds_across_two_workers(
    upstream_server: UpstreamServer, redis_server: RedisServer, processes: list[GatewayProcess]
) -> None:
    config = _process_config(upstream_server.url, redis_server.url, limit=10)
    gateway = start_gateway(config, "--workers", "2")
    processes.append(gateway)
    results = [fresh_connection_get(f"{gateway.data_url}/w") for _ in range(25)]
    assert 9 <= results.count(200) <= 11, f"{results}\n{gateway.output()[-3000:]}"
    assert set(results) == {200, 429}


def test_redis_limit_holds_across_two_gateway_processes(
    upstream_server: UpstreamServer, redis_server: RedisServer, processes: list[GatewayProcess]
) -> None:
    config = _process_config(upstream_server.url, redis_server.url, limit=8)
    processes.append(start_gateway(config))
    processes.append(start_gateway(config))
    urls = [f"{p.data_url}/p" for p in processes]
    results = [fresh_connection_get(urls[i % 2]) for i in range(20)]
    logs = "\n".join(p.output()[-3000:] for p in processes)
    assert 7 <= results.count(200) <= 9, f"{results}\n{logs}"
    by_process = {url: [r for i, r in enumerate(results) if urls[i % 2] == url] for url in urls}
    assert all(429 in seen for seen in by_process.values()), json.dumps(by_process)
