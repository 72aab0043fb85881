"""gRPC-Web on the HTTP listener: frames written by hand, sent with httpx to the real
HTTP listener, answered by a real gRPC upstream."""

from __future__ import annotations

import base64
from types import ModuleType
from typing import Any

import httpx

from gateway.grpc.web import decode_text, parse_frames, parse_timeout, percent_encode
from tests.grpc.conftest import StartGateway
from tests.grpc.support import (
    DEADLINE,
    EchoUpstream,
    decode_web_text,
    gateway_config,
    parse_web_body,
    web_frame,
)

PROTO = "application/grpc-web+proto"
TEXT = "application/grpc-web-text"


async def web_gateway(
    start_gateway: StartGateway, upstream: EchoUpstream, **sections: Any
) -> tuple[Any, httpx.AsyncClient]:
    """A gateway serving its HTTP listener, and an httpx client for it (the test closes it)."""
    config = gateway_config({"echo": [f"h2c://{upstream.address}"]}, **sections)
    gateway = await start_gateway(config)
    base = await gateway.serve_http()
    return gateway, httpx.AsyncClient(base_url=base, timeout=DEADLINE)


async def test_a_unary_call_over_grpc_web_proto(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType
) -> None:
    _, client = await web_gateway(start_gateway, upstream)
    async with client:
        body = web_frame(pb.Message(text="web", number=1).SerializeToString())
        response = await client.post(
            "/echo.Echo/Unary",
            content=body,
            headers={"content-type": PROTO, "x-grpc-web": "1", "x-ping": "pong"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == PROTO
    assert response.headers["x-server"] == "a" and response.headers["x-initial"] == "pong"
    messages, trailers = parse_web_body(response.content)
    reply = pb.Message.FromString(messages[0])
    assert (len(messages), reply.text, reply.number) == (1, "web", 2)
    assert trailers is not None
    assert trailers["grpc-status"] == "0" and trailers["x-trailing"] == "bye"
    assert base64.b64decode(trailers["x-trailing-bin"] + "==") == b"\x00\xff"
    seen = upstream.metadata[-1]
    assert seen["x-ping"] == "pong" and "x-grpc-web" not in seen


async def test_a_server_stream_over_grpc_web_text(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType
) -> None:
    _, client = await web_gateway(start_gateway, upstream)
    body = base64.b64encode(web_frame(pb.Message(text="s", number=3).SerializeToString()))
    async with client:
        response = await client.post(
            "/echo.Echo/ServerStream",
            content=body,
            headers={"content-type": TEXT, "accept": TEXT, "grpc-timeout": "5S"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == TEXT
    messages, trailers = parse_web_body(decode_web_text(response.content))
    replies = [pb.Message.FromString(m) for m in messages]
    assert [(r.text, r.number) for r in replies] == [("s-0", 0), ("s-1", 1), ("s-2", 2)]
    assert trailers is not None and trailers["grpc-status"] == "0"
    remaining = upstream.deadlines[-1]
    assert remaining is not None and 0 < remaining <= 5 + 0.05  # units round up


async def test_an_upstream_error_is_a_headers_only_answer(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType
) -> None:
    _, client = await web_gateway(start_gateway, upstream)
    async with client:
        response = await client.post(
            "/echo.Echo/Unary",
            content=web_frame(pb.Message(text="abort").SerializeToString()),
            headers={"content-type": PROTO},
        )
    assert response.status_code == 200
    assert response.headers["grpc-status"] == "5" and response.headers["grpc-message"] == "nope"
    assert response.headers["x-why"] == "gone"
    assert response.content == b""


async def test_no_endpoint_is_unavailable_over_grpc_web(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType
) -> None:
    gateway, client = await web_gateway(start_gateway, upstream)
    for endpoint in gateway.gateway.table.upstreams["echo"].endpoints:
        endpoint.healthy = False
    async with client:
        response = await client.post(
            "/echo.Echo/Unary",
            content=web_frame(pb.Message(text="hi").SerializeToString()),
            headers={"content-type": PROTO},
        )
    assert response.status_code == 200 and response.headers["grpc-status"] == "14"


async def test_a_malformed_body_is_refused_before_calling_upstream(
    start_gateway: StartGateway, upstream: EchoUpstream
) -> None:
    _, client = await web_gateway(start_gateway, upstream)
    async with client:
        truncated = await client.post(
            "/echo.Echo/Unary", content=b"\x00\x00\x00\x00\x09abc", headers={"content-type": PROTO}
        )
        compressed = await client.post(
            "/echo.Echo/Unary", content=web_frame(b"x", flag=1), headers={"content-type": PROTO}
        )
    assert truncated.headers["grpc-status"] == "3"  # INVALID_ARGUMENT
    assert compressed.headers["grpc-status"] == "12"  # UNIMPLEMENTED
    assert upstream.metadata == []


CORS = {
    "middleware": ["cors"],
    "plugins": [
        {
            "name": "cors",
            "config": {
                "allow_origins": ["https://app.example"],
                "allow_methods": ["POST"],
                "allow_headers": ["content-type", "x-grpc-web", "x-user-agent", "grpc-timeout"],
                "expose_headers": ["grpc-status", "grpc-message"],
            },
        }
    ],
    # A POST-only route: the preflight is answered by the global middleware.
    "routes": [
        {
            "name": "echo",
            "match": {"path": "/echo.Echo/{method}", "methods": ["POST"]},
            "upstream": "echo",
        }
    ],
}


async def test_a_cors_preflight_for_grpc_web_and_exposed_status_headers(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType
) -> None:
    _, client = await web_gateway(start_gateway, upstream, **CORS)
    origin = "https://app.example"
    async with client:
        preflight = await client.options(
            "/echo.Echo/Unary",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-grpc-web,x-user-agent",
            },
        )
        response = await client.post(
            "/echo.Echo/Unary",
            content=web_frame(pb.Message(text="abort").SerializeToString()),
            headers={"content-type": PROTO, "origin": origin, "x-grpc-web": "1"},
        )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == origin
    allowed = preflight.headers["access-control-allow-headers"]
    assert allowed == "content-type, x-grpc-web, x-user-agent"
    assert response.headers["access-control-allow-origin"] == origin
    assert response.headers["access-control-expose-headers"] == "grpc-status, grpc-message"
    assert response.headers["grpc-status"] == "5"


def test_frame_and_header_helpers() -> None:
    assert parse_frames(web_frame(b"ab") + web_frame(b"")) == [b"ab", b""]
    chunks = base64.b64encode(web_frame(b"a")) + base64.b64encode(web_frame(b"bc"))
    assert parse_frames(decode_text(chunks)) == [b"a", b"bc"]
    assert parse_timeout("250m") == 0.25 and parse_timeout("2S") == 2.0
    assert parse_timeout("bogus") is None
    assert percent_encode("no ünïcode 100%") == "no %C3%BCn%C3%AFcode 100%25"
