"""The gRPC listener with real grpcio clients and upstream servers: every call kind,
metadata both ways, deadlines, cancellation, statuses, routing failures, load balancing,
plugins, TLS on both sides, and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from gateway.grpc.forwarder import GrpcForwarder
from tests.grpc.conftest import StartGateway, StartUpstream
from tests.grpc.support import (
    DEADLINE,
    EchoUpstream,
    eventually,
    gateway_config,
    make_certificates,
)

StubFor = Callable[[grpc.aio.Channel], Any]


async def echo_gateway(start_gateway: StartGateway, upstream: EchoUpstream, **sections: Any) -> Any:
    return await start_gateway(gateway_config({"echo": [f"h2c://{upstream.address}"]}, **sections))


async def test_a_unary_call_is_relayed(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    reply = await stub.Unary(pb.Message(text="hello", number=41), timeout=DEADLINE)
    assert (reply.text, reply.number) == ("hello", 42)


async def test_a_server_stream_is_relayed_message_by_message(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    call = stub.ServerStream(pb.Message(text="item", number=3), timeout=DEADLINE)
    replies = [(reply.text, reply.number) async for reply in call]
    assert replies == [("item-0", 0), ("item-1", 1), ("item-2", 2)]
    assert await call.code() == grpc.StatusCode.OK


async def test_a_client_stream_is_relayed(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    requests = [pb.Message(text=text, number=n) for text, n in (("a", 1), ("b", 2), ("c", 3))]
    reply = await stub.ClientStream(iter(requests), timeout=DEADLINE)
    assert (reply.text, reply.number) == ("a+b+c", 6)


async def test_a_bidi_stream_flows_both_ways_at_once(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    """Each reply arrives before the next request is sent: nothing waits for the end of
    the request stream."""
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    call = stub.Bidi(timeout=DEADLINE)
    for index, text in enumerate(("one", "two", "three")):
        await call.write(pb.Message(text=text, number=index))
        reply = await asyncio.wait_for(call.read(), DEADLINE)
        assert (reply.text, reply.number) == (text.upper(), index)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_metadata_crosses_both_ways_initial_and_trailing(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    call = stub.Unary(
        pb.Message(text="hi"),
        metadata=(("x-ping", "pong"), ("x-data-bin", b"\x01\x02\xff"), ("x-request-id", "req-1")),
        timeout=DEADLINE,
    )
    await call
    initial = dict(await call.initial_metadata())
    trailing = dict(await call.trailing_metadata())
    assert initial["x-server"] == "a" and initial["x-initial"] == "pong"
    assert trailing["x-trailing"] == "bye" and trailing["x-trailing-bin"] == b"\x00\xff"
    seen = upstream.metadata[-1]
    assert seen["x-ping"] == "pong" and seen["x-data-bin"] == b"\x01\x02\xff"
    assert seen["x-request-id"] == "req-1"
    assert seen["x-forwarded-for"] == "127.0.0.1"


async def test_an_untrusted_client_cannot_spoof_its_address(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    spoof = (("x-forwarded-for", "6.6.6.6"), ("x-forwarded-host", "evil"))
    await stub.Unary(pb.Message(text="hi"), metadata=spoof, timeout=DEADLINE)
    seen = upstream.metadata[-1]
    assert seen["x-forwarded-for"] == "127.0.0.1" and "x-forwarded-host" not in seen


async def test_the_deadline_reaches_the_upstream_and_expiry_cancels_it(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(pb.Message(text="sleep"), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(upstream.cancelled.wait(), DEADLINE)
    remaining = upstream.deadlines[-1]
    # grpc-timeout travels in whole units, rounded up: allow a few milliseconds.
    assert remaining is not None and 0 < remaining <= 0.5 + 0.05


async def test_a_client_cancellation_cancels_the_upstream_call(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    call = stub.ServerStream(pb.Message(text="forever"), timeout=DEADLINE)
    first = await asyncio.wait_for(call.read(), DEADLINE)
    assert first.text == "first"
    await asyncio.wait_for(upstream.started.wait(), DEADLINE)
    call.cancel()
    await asyncio.wait_for(upstream.cancelled.wait(), DEADLINE)


async def test_status_details_and_trailers_of_a_failure_pass_through(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(pb.Message(text="abort"), timeout=DEADLINE)
    error = caught.value
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "nope")
    assert dict(error.trailing_metadata())["x-why"] == "gone"


async def test_an_unrouted_service_is_unimplemented(
    start_gateway: StartGateway, upstream: EchoUpstream
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    call = gateway.channel().unary_unary("/other.Service/Method")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"", timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/other.Service/Method" in (caught.value.details() or "")


async def test_no_available_endpoint_is_unavailable(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream)
    for endpoint in gateway.gateway.table.upstreams["echo"].endpoints:
        endpoint.healthy = False  # what failing health checks do
    stub = stub_for(gateway.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(pb.Message(text="hi"), timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no available endpoint" in (caught.value.details() or "")
    assert upstream.metadata == []


async def test_an_unreachable_endpoint_is_unavailable(
    start_gateway: StartGateway, pb: ModuleType, stub_for: StubFor, unused_tcp_port: int
) -> None:
    config = gateway_config({"echo": [f"h2c://127.0.0.1:{unused_tcp_port}"]})
    gateway = await start_gateway(config)
    stub = stub_for(gateway.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(pb.Message(text="hi"), timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_calls_are_balanced_across_endpoints(
    start_gateway: StartGateway, start_upstream: StartUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    first, second = await start_upstream("a"), await start_upstream("b")
    urls = [f"h2c://{first.address}", f"h2c://{second.address}"]
    gateway = await start_gateway(gateway_config({"echo": urls}))
    stub = stub_for(gateway.channel())
    servers = []
    for _ in range(6):
        call = stub.Unary(pb.Message(text="hi"), timeout=DEADLINE)
        await call
        servers.append(dict(await call.initial_metadata())["x-server"])
    assert sorted(servers) == ["a", "a", "a", "b", "b", "b"]


def stamp_plugins(**route: Any) -> dict[str, Any]:
    return {
        "plugins": [
            {
                "name": "stamp",
                "module": "plugins.examples.stamp",
                "config": {"deny_header": "x-deny"},
            },
            {"name": "api-key", "config": {"keys": [{"name": "web-app", "key": "s3cret"}]}},
        ],
        "routes": [
            {"name": "echo", "match": {"path": "/echo.Echo/{method}"}, "upstream": "echo", **route}
        ],
    }


async def test_a_plugin_refusal_is_permission_denied_and_its_edits_apply(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream, **stamp_plugins(plugins=["stamp"]))
    stub = stub_for(gateway.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(pb.Message(text="hi"), metadata=(("x-deny", "1"),), timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "denied by the stamp plugin"
    assert upstream.metadata == []
    call = stub.Unary(pb.Message(text="hi"), timeout=DEADLINE)
    await call
    assert upstream.metadata[-1]["x-stamp"] == "octopus"  # on_request edit went upstream
    assert dict(await call.initial_metadata())["x-stamp"] == "octopus"  # on_response edit


async def test_an_auth_plugin_is_enforced_unauthenticated_without_a_key(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    gateway = await echo_gateway(start_gateway, upstream, **stamp_plugins(plugins=["api-key"]))
    stub = stub_for(gateway.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(pb.Message(text="hi"), timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "www-authenticate" in dict(caught.value.trailing_metadata())
    reply = await stub.Unary(
        pb.Message(text="hi", number=1), metadata=(("x-api-key", "s3cret"),), timeout=DEADLINE
    )
    assert reply.number == 2
    seen = upstream.metadata[-1]
    assert seen["x-consumer"] == "web-app" and "x-api-key" not in seen


async def test_calls_are_counted_in_the_metrics_and_the_access_log(
    start_gateway: StartGateway,
    upstream: EchoUpstream,
    pb: ModuleType,
    stub_for: StubFor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    logging_on = {"logging": {"access_log": True}}
    gateway = await echo_gateway(start_gateway, upstream, observability=logging_on)
    stub = stub_for(gateway.channel())
    await stub.Unary(pb.Message(text="hi"), timeout=DEADLINE)
    with (
        caplog.at_level(logging.INFO, logger="octopus.access"),
        pytest.raises(grpc.aio.AioRpcError),
    ):
        await stub.Unary(pb.Message(text="abort"), timeout=DEADLINE)
    text = gateway.gateway.metrics.exposition().decode()
    ok = 'octopus_requests_total{method="POST",route="/echo.Echo/{method}",status="200"} 1.0'
    missing = 'octopus_requests_total{method="POST",route="/echo.Echo/{method}",status="404"} 1.0'
    assert ok in text and missing in text, text
    upstream_ok = 'octopus_upstream_requests_total{status="200",upstream="echo"} 1.0'
    assert upstream_ok in text, text
    [record] = [r for r in caplog.records if r.name == "octopus.access"]
    assert (record.path, record.status, record.grpc_status) == (  # type: ignore[attr-defined]
        "/echo.Echo/Unary",
        404,
        "NOT_FOUND",
    )


async def test_tls_on_the_listener_and_to_an_h2_upstream(
    start_gateway: StartGateway,
    start_upstream: StartUpstream,
    pb: ModuleType,
    stub_for: StubFor,
    tmp_path: Path,
) -> None:
    certs = make_certificates(tmp_path)
    key, cert, ca = (certs[name].read_bytes() for name in ("key", "cert", "ca"))
    upstream = await start_upstream("tls", grpc.ssl_server_credentials([(key, cert)]))
    config = gateway_config(
        {"echo": [f"h2://localhost:{upstream.port}"]},
        tls={"enabled": True, "cert": str(certs["cert"]), "key": str(certs["key"])},
    )
    config["upstreams"]["echo"]["tls"] = {"ca": str(certs["ca"])}
    gateway = await start_gateway(config)
    stub = stub_for(gateway.channel(grpc.ssl_channel_credentials(root_certificates=ca)))
    call = stub.Unary(pb.Message(text="secure", number=1), timeout=DEADLINE)
    assert (await call).number == 2
    assert dict(await call.initial_metadata())["x-server"] == "tls"


async def test_shutdown_lets_an_in_flight_call_finish_then_refuses_new_ones(
    start_gateway: StartGateway, upstream: EchoUpstream, pb: ModuleType, stub_for: StubFor
) -> None:
    """The drain: the listener stops taking calls, the gateway's shutdown waits for the
    calls in flight before closing the upstream channels under them."""
    gateway = await echo_gateway(start_gateway, upstream)
    stub = stub_for(gateway.channel())
    call = stub.Bidi(timeout=DEADLINE)
    await call.write(pb.Message(text="before"))
    assert (await call.read()).text == "BEFORE"
    assert gateway.grpc_server is not None
    stopping = asyncio.create_task(gateway.grpc_server.stop(DEADLINE))
    shutdown = asyncio.create_task(gateway.gateway.shutdown())
    await eventually(lambda: gateway.gateway.draining)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(pb.Message(text="late"), timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await call.write(pb.Message(text="during"))
    assert (await call.read()).text == "DURING"
    assert not shutdown.done()
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    await asyncio.wait_for(asyncio.gather(stopping, shutdown), DEADLINE)
    gateway.grpc_server = None  # stopped here already


async def test_a_gateway_failure_is_internal_without_its_details(
    start_gateway: StartGateway,
    upstream: EchoUpstream,
    pb: ModuleType,
    stub_for: StubFor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    gateway = await echo_gateway(start_gateway, upstream)
    monkeypatch.setattr(GrpcForwarder, "open_call", broken)
    stub = stub_for(gateway.channel())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unary(pb.Message(text="hi"), timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal gateway error"
    assert gateway.gateway.table.upstreams["echo"].endpoints[0].in_flight == 0
