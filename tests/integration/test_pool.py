"""The upstream connection pool: keep-alive reuse, the connection cap, idle eviction."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from typing import Any

import httpx

from gateway.routing.builder import build_table
from settings import load_settings
from tests.support.gateway import MakeGateway, gateway_config, route
from tests.support.raw import read_response, request_bytes
from tests.support.upstream import UpstreamApp, UpstreamServer
from tests.support.waiting import eventually


def pooled(url: str, **tuning: Any) -> dict[str, Any]:
    return gateway_config(
        {"main": {"endpoints": [url], **tuning}}, [route("all", "/{rest:path}", "main")]
    )


def test_sequential_requests_reuse_one_upstream_connection(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(pooled(upstream_server.url))
    with gw.client() as client:
        for index in range(10):
            assert client.get(f"/seq/{index}").status_code == 200
    assert len(upstream.requests) == 10
    assert len(upstream.peers) == 1
    assert gw.pool("main").open_connections == 1


def test_sequential_requests_from_different_clients_share_the_pool(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(pooled(upstream_server.url))
    for index in range(5):
        with gw.client() as client:
            assert client.get(f"/client/{index}").status_code == 200
    assert len(upstream.peers) == 1


def test_max_connections_caps_upstream_connections_under_concurrency(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(pooled(upstream_server.url, max_connections=2))
    pool = gw.pool("main")
    observed: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            observed.append(pool.open_connections)
            done.wait(0.005)

    def fetch(index: int) -> int:
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            return client.get(f"/slow?delay=0.2&n={index}").status_code

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(10) as executor:
            statuses = list(executor.map(fetch, range(10)))
    finally:
        done.set()
        sampler.join()
    assert statuses == [200] * 10
    assert len(upstream.requests) == 10
    assert upstream.max_in_flight <= 2
    assert len(upstream.peers) <= 2
    assert max(observed) <= 2


def test_a_request_waiting_past_the_connect_timeout_for_a_full_pool_gets_504(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(pooled(upstream_server.url, max_connections=1, connect_timeout="200ms"))
    with concurrent.futures.ThreadPoolExecutor(1) as executor, gw.client() as client:
        busy = executor.submit(client.get, "/slow?delay=1")
        eventually(lambda: upstream.in_flight == 1)
        with gw.client() as other:
            waiting = other.get("/queued")
        assert waiting.status_code == 504
        assert waiting.json()["error"] == "gateway_timeout"
        assert busy.result(timeout=5).status_code == 200
    assert "/queued" not in upstream.paths


def test_idle_connections_are_closed_after_the_idle_timeout(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(pooled(upstream_server.url, idle_timeout="200ms", max_connections=4))
    pool = gw.pool("main")
    with concurrent.futures.ThreadPoolExecutor(3) as executor:
        list(executor.map(lambda i: httpx.get(f"{gw.url}/slow?delay=0.1&i={i}"), range(3)))
    assert pool.open_connections >= 1
    eventually(lambda: pool.open_connections == 0, timeout=3, message="idle connections stayed")
    # And the pool still works afterwards, on a fresh connection.
    with gw.client() as client:
        assert client.get("/after-idle").status_code == 200
    assert pool.open_connections == 1


def test_a_connection_in_use_is_not_evicted_as_idle(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(pooled(upstream_server.url, idle_timeout="100ms"))
    with gw.client() as client:
        assert client.get("/warm").status_code == 200
        response = client.get("/slow?delay=0.6")
    assert response.status_code == 200
    assert not upstream.requests[-1].get("abandoned")


def test_a_table_swap_keeps_warm_connections(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    config = pooled(upstream_server.url)
    gw = make_gateway(config)
    with gw.client() as client:
        assert client.get("/before-swap").status_code == 200
        gw.gateway.swap(build_table(load_settings(config), gw.gateway.endpoints, version=2))
        assert client.get("/after-swap").status_code == 200
    assert len(upstream.peers) == 1


def test_a_client_leaving_mid_response_frees_the_upstream_connection(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(pooled(upstream_server.url))
    pool = gw.pool("main")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(request_bytes("GET", "/stream?chunks=50&interval=0.1"))
        head = read_response(sock, head_only=True)
        assert head.status == 200
        assert pool.open_connections == 1
    eventually(lambda: pool.open_connections == 0, message="the upstream exchange kept running")
    eventually(
        lambda: upstream.requests[-1].get("abandoned"), message="the upstream kept streaming"
    )
    assert len(upstream.stream_events) < 50


def test_head_requests_do_not_leak_upstream_connections(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(pooled(upstream_server.url, max_connections=2))
    pool = gw.pool("main")
    with gw.client() as client:
        for index in range(6):
            assert client.head(f"/head/{index}").status_code == 200
        assert client.get("/after-heads").status_code == 200
    eventually(lambda: pool.open_connections <= 1, message="HEAD exchanges leaked pool slots")
