"""Real gRPC pieces for the gRPC battery: the echo service compiled at test time, an
upstream ``grpc.aio`` server, the gateway with its gRPC (and HTTP) listener in the test's
event loop, gRPC-Web framing written by hand, and throwaway TLS certificates."""

from __future__ import annotations

import asyncio
import base64
import datetime
import importlib
import importlib.resources
import ipaddress
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import uvicorn

from gateway.asgi import GatewayApp
from gateway.grpc.server import start_grpc_listener
from gateway.runtime import Gateway
from settings import load_settings

ECHO_PROTO = """
syntax = "proto3";
package echo;

message Message {
  string text = 1;
  int32 number = 2;
}

service Echo {
  rpc Unary(Message) returns (Message);
  rpc ServerStream(Message) returns (stream Message);
  rpc ClientStream(stream Message) returns (Message);
  rpc Bidi(stream Message) returns (stream Message);
}
"""
#: How long anything expected may take to show up.
DEADLINE = 10.0


def compile_echo(folder: Path) -> tuple[ModuleType, ModuleType]:
    """Compile ``echo.proto`` with grpc_tools into ``folder``; (echo_pb2, echo_pb2_grpc)."""
    from grpc_tools import protoc

    (folder / "echo.proto").write_text(ECHO_PROTO)
    includes = str(importlib.resources.files("grpc_tools") / "_proto")
    code = protoc.main(
        [
            "protoc",
            f"-I{folder}",
            f"-I{includes}",
            f"--python_out={folder}",
            f"--grpc_python_out={folder}",
            str(folder / "echo.proto"),
        ]
    )
    assert code == 0, "protoc failed"
    sys.path.insert(0, str(folder))  # echo_pb2_grpc imports echo_pb2 by name
    try:
        return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
    finally:
        sys.path.remove(str(folder))


class EchoUpstream:
    """An upstream Echo service on ``127.0.0.1:0`` in the current event loop.

    Every call records its metadata and deadline, sends initial metadata
    (``x-server``, ``x-initial`` = the request's ``x-ping``) and trailing metadata
    (``x-trailing``, ``x-trailing-bin``). ``text`` steers the unary call: ``abort``
    fails with NOT_FOUND "nope", ``sleep`` waits until cancelled (``cancelled`` is set).
    ``ServerStream`` with ``forever`` sends one message, then waits until cancelled.
    """

    def __init__(self, pb: ModuleType, pb_grpc: ModuleType, name: str) -> None:
        self.pb = pb
        self.name = name
        self.metadata: list[dict[str, Any]] = []
        self.deadlines: list[float | None] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.server = grpc.aio.server()
        pb_grpc.add_EchoServicer_to_server(self._servicer(pb_grpc), self.server)
        self.port = 0

    async def start(self, credentials: grpc.ServerCredentials | None = None) -> EchoUpstream:
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(0)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _begin(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.metadata.append(metadata)
        self.deadlines.append(context.time_remaining())
        await context.send_initial_metadata(
            (("x-server", self.name), ("x-initial", str(metadata.get("x-ping", "none"))))
        )
        context.set_trailing_metadata((("x-trailing", "bye"), ("x-trailing-bin", b"\x00\xff")))

    async def _wait_for_cancel(self) -> None:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def _servicer(self, pb_grpc: ModuleType) -> Any:
        upstream = self
        message = self.pb.Message

        class Servicer(pb_grpc.EchoServicer):  # type: ignore[misc, name-defined]
            async def Unary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
                await upstream._begin(context)
                if request.text == "abort":
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND, "nope", trailing_metadata=(("x-why", "gone"),)
                    )
                if request.text == "sleep":
                    await upstream._wait_for_cancel()
                return message(text=request.text, number=request.number + 1)

            async def ServerStream(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
                await upstream._begin(context)
                if request.text == "forever":
                    yield message(text="first", number=0)
                    await upstream._wait_for_cancel()
                for index in range(request.number):
                    yield message(text=f"{request.text}-{index}", number=index)

            async def ClientStream(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await upstream._begin(context)
                texts, total = [], 0
                async for request in requests:
                    texts.append(request.text)
                    total += request.number
                return message(text="+".join(texts), number=total)

            async def Bidi(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await upstream._begin(context)
                async for request in requests:
                    yield message(text=request.text.upper(), number=request.number)

        return Servicer()


def gateway_config(
    upstreams: dict[str, list[str]],
    routes: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A config dict: the upstreams (name → endpoint URLs) and routes; ``routes`` default
    to one route per upstream for ``/echo.Echo/{method}`` (the first upstream)."""
    if routes is None:
        first = next(iter(upstreams))
        routes = [{"name": "echo", "match": {"path": "/echo.Echo/{method}"}, "upstream": first}]
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "graceful_timeout": "2s"},
        "farp": {"enabled": False},
        "discovery": {"backend": "static", "static": {"manifests": []}},
        "upstreams": {
            name: {"endpoints": [{"url": url} for url in urls]} for name, urls in upstreams.items()
        },
        "routes": routes,
        "observability": {"logging": {"access_log": False}},
    }
    config.update(sections)
    return config


class RunningGateway:
    """A gateway whose gRPC listener (and, on demand, HTTP listener) runs in this loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.gateway = Gateway(load_settings(config, env={}))
        self.app = GatewayApp(self.gateway, serve_admin=False)
        self.grpc_server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.http: uvicorn.Server | None = None
        self.http_socket: socket.socket | None = None
        self.channels: list[grpc.aio.Channel] = []

    async def start(self) -> RunningGateway:
        await self.gateway.startup()
        self.grpc_server, self.grpc_port = await start_grpc_listener(self.gateway, "127.0.0.1", 0)
        return self

    def channel(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
        """A client channel to the gRPC listener (closed at stop)."""
        target = f"localhost:{self.grpc_port}" if credentials else f"127.0.0.1:{self.grpc_port}"
        channel = (
            grpc.aio.secure_channel(target, credentials)
            if credentials
            else grpc.aio.insecure_channel(target)
        )
        self.channels.append(channel)
        return channel

    async def serve_http(self) -> str:
        """Serve the HTTP listener (uvicorn on 127.0.0.1:0); returns its base URL."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self.http, self.http_socket = server, sock
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        if self.http is not None:
            self.http.should_exit = True
            await self.http.shutdown(sockets=[self.http_socket] if self.http_socket else None)
        if self.grpc_server is not None:
            await self.grpc_server.stop(0)
        await self.gateway.shutdown()


async def eventually(predicate: Any, timeout: float = DEADLINE, interval: float = 0.02) -> Any:
    """Poll ``predicate`` (in the loop, so servers keep running) until it is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


# -- gRPC-Web framing ----------------------------------------------------------------


def web_frame(payload: bytes, flag: int = 0) -> bytes:
    return bytes((flag,)) + len(payload).to_bytes(4, "big") + payload


def decode_web_text(body: bytes) -> bytes:
    """A ``-text`` response: base64 chunks, each padded on its own, one after another."""
    out = b""
    start = 0
    for padding in re.finditer(rb"=+", body):
        out += base64.b64decode(body[start : padding.end()])
        start = padding.end()
    tail = body[start:]
    return out + (base64.b64decode(tail + b"=" * (-len(tail) % 4)) if tail else b"")


def parse_web_body(body: bytes) -> tuple[list[bytes], dict[str, str] | None]:
    """(messages, trailers) of a gRPC-Web response body; trailers None when absent."""
    messages: list[bytes] = []
    trailers: dict[str, str] | None = None
    position = 0
    while position < len(body):
        flag = body[position]
        length = int.from_bytes(body[position + 1 : position + 5], "big")
        payload = body[position + 5 : position + 5 + length]
        assert len(payload) == length, "truncated frame"
        position += 5 + length
        if flag & 0x80:
            assert position == len(body), "the trailer frame must come last"
            trailers = {}
            for line in payload.decode("latin-1").split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            assert trailers is None, "a message after the trailers"
            messages.append(payload)
    return messages, trailers


# -- TLS -----------------------------------------------------------------------------


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for localhost/127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(
        subject: str,
        key: Any,
        issuer: tuple[x509.Name, Any] | None,
        extensions: Sequence[tuple[Any, bool]],
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer_name, issuer_key = issuer if issuer else (name, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("Octopus gRPC Test CA", ca_key, None, [(x509.BasicConstraints(True, None), True)])
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server = build(
        "localhost",
        server_key,
        (ca.subject, ca_key),
        [(x509.BasicConstraints(False, None), True), (alt_names, False)],
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths
