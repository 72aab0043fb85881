"""When the upstream fails: the status the client sees, and what is retried."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from tests.support.gateway import MakeGateway, gateway_config, route
from tests.support.raw import (
    OK_REPLY,
    ScriptedUpstream,
    drop_second_request,
    read_response,
    request_bytes,
)
from tests.support.servers import free_port
from tests.support.upstream import MakeUpstream, UpstreamApp, UpstreamServer
from tests.support.waiting import eventually


def single_route(upstream: Any, **route_options: Any) -> dict[str, Any]:
    return gateway_config(
        {"main": upstream}, [route("all", "/{rest:path}", "main", **route_options)]
    )


def assert_json_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text


def test_a_refused_connection_gets_a_json_502(make_gateway: MakeGateway) -> None:
    gw = make_gateway(single_route(f"http://127.0.0.1:{free_port()}"))
    with gw.client() as client:
        response = client.get("/anything")
    assert_json_error(response, 502, "bad_gateway")


def test_an_upstream_slower_than_the_route_timeout_gets_504_promptly(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    gw = make_gateway(single_route(upstream_server.url, timeout="500ms"))
    started = time.monotonic()
    with gw.client() as client:
        response = client.get("/slow?delay=3")
    elapsed = time.monotonic() - started
    assert_json_error(response, 504, "gateway_timeout")
    assert 0.4 < elapsed < 1.5
    # The gateway hung up on the upstream rather than leaving the exchange running.
    eventually(lambda: upstream.requests and upstream.requests[-1].get("abandoned"))


def test_an_upstream_that_stalls_mid_body_makes_the_client_connection_drop(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    config = single_route({"endpoints": [upstream_server.url], "read_timeout": "500ms"})
    gw = make_gateway(config)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(request_bytes("GET", "/stall?size=100000&send=1000"))
        response = read_response(sock)
    assert response.status == 200  # the head had already gone to the client
    assert not response.complete
    assert response.closed
    assert len(response.body) == 1000
    assert time.monotonic() - started < 2.0


def test_an_upstream_that_closes_mid_body_makes_the_client_connection_drop(
    make_gateway: MakeGateway,
) -> None:
    def truncated(connection: int, index: int) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"t" * 100

    with ScriptedUpstream(truncated, close_after_reply=True) as scripted:
        gw = make_gateway(single_route(scripted.url))
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
            sock.sendall(request_bytes("GET", "/truncated"))
            response = read_response(sock)
    assert response.status == 200
    assert not response.complete
    assert response.closed


def test_an_upstream_answering_garbage_gets_a_json_502(make_gateway: MakeGateway) -> None:
    with ScriptedUpstream(lambda connection, index: b"NOT HTTP AT ALL\r\n\r\n") as scripted:
        gw = make_gateway(single_route(scripted.url))
        with gw.client() as client:
            response = client.get("/garbage")
    assert_json_error(response, 502, "bad_gateway")


def test_an_upstream_whose_endpoints_are_all_unreachable_gets_502(
    make_gateway: MakeGateway,
) -> None:
    endpoints = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    gw = make_gateway(single_route(endpoints))
    with gw.client() as client:
        response = client.get("/anything")
    assert_json_error(response, 502, "bad_gateway")


def test_an_upstream_with_no_endpoint_taking_traffic_gets_503(make_gateway: MakeGateway) -> None:
    config = single_route({"endpoints": [{"url": f"http://127.0.0.1:{free_port()}", "weight": 0}]})
    gw = make_gateway(config)
    with gw.client() as client:
        response = client.get("/anything")
    assert_json_error(response, 503, "service_unavailable")


def test_a_request_after_the_upstream_restarted_still_succeeds(
    make_gateway: MakeGateway, make_upstream: MakeUpstream
) -> None:
    restarting = make_upstream("restarting")
    gw = make_gateway(single_route(restarting.url))
    with gw.client() as client:
        assert client.get("/before").status_code == 200
        assert gw.pool("main").open_connections == 1
        restarting.restart()  # closes the kept-alive connection from the gateway
        after = client.get("/after")
    assert after.status_code == 200
    assert restarting.app.paths == ["/before", "/after"]


def test_a_get_on_a_keep_alive_connection_the_upstream_dropped_is_retried(
    make_gateway: MakeGateway,
) -> None:
    with ScriptedUpstream(drop_second_request) as scripted:
        gw = make_gateway(single_route(scripted.url))
        with gw.client() as client:
            assert client.get("/first").status_code == 200
            response = client.get("/second")
    assert response.status_code == 200
    assert response.content == OK_REPLY.rpartition(b"\r\n\r\n")[2]
    assert scripted.requests == [
        (1, "GET /first HTTP/1.1"),
        (1, "GET /second HTTP/1.1"),
        (2, "GET /second HTTP/1.1"),
    ]


def test_a_post_on_a_keep_alive_connection_the_upstream_dropped_is_never_repeated(
    make_gateway: MakeGateway,
) -> None:
    with ScriptedUpstream(drop_second_request) as scripted:
        gw = make_gateway(single_route(scripted.url))
        with gw.client() as client:
            assert client.get("/first").status_code == 200
            response = client.post("/order", content=b'{"qty": 1}')
    assert_json_error(response, 502, "bad_gateway")
    assert [line for _, line in scripted.requests].count("POST /order HTTP/1.1") == 1


def test_a_refused_connection_is_retried_on_another_endpoint(
    make_gateway: MakeGateway, upstream_server: UpstreamServer, upstream: UpstreamApp
) -> None:
    endpoints = [f"http://127.0.0.1:{free_port()}", upstream_server.url]
    gw = make_gateway(single_route(endpoints))
    with gw.client() as client:
        statuses = [client.get(f"/try/{i}").status_code for i in range(4)]
    assert statuses == [200, 200, 200, 200]
    assert upstream.paths == [f"/try/{i}" for i in range(4)]
