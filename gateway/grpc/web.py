"""gRPC-Web on the HTTP listener: browsers call gRPC services through the gateway.

Browsers cannot speak gRPC (no HTTP trailers, no control over HTTP/2), so gRPC-Web
carries the same length-prefixed messages in an ordinary HTTP/1.1 or HTTP/2 body and
moves the trailers into a last frame of the body. ``GatewayApp.handle_http`` hands a
request here when its route matched and its content type starts with
``application/grpc-web``; the route's plugins have already run (auth, CORS...). This
module then makes a real gRPC call upstream with grpcio and translates back:

* request: ``application/grpc-web``, ``application/grpc-web+proto`` (binary frames)
  or ``application/grpc-web-text[+proto]`` (the frames in base64, chunks possibly
  padded one by one). Frames are ``flag(1) length(4, big endian) message``; compressed
  frames (flag 0x01) are refused (``UNIMPLEMENTED``). Every message of the body goes
  upstream; a browser sends one (unary and server-streaming calls; gRPC-Web has no
  client streaming). ``grpc-timeout`` becomes the call's deadline; other headers become
  metadata (browser and connection headers excepted), ``-bin`` values base64-decoded;
* response: status 200, the request's content type, the upstream's initial metadata
  as headers; each response message as a data frame as soon as it arrives (server
  streaming streams); then the trailer frame (flag 0x80) holding ``grpc-status``,
  ``grpc-message`` (percent-encoded) and the trailing metadata as an HTTP/1 header
  block. In ``-text`` mode every frame is base64-encoded on its own;
* a failure before any message (no endpoint, the upstream's error, a bad body) is a
  headers-only ("trailers-only") 200 response with ``grpc-status``/``grpc-message`` in
  the headers.

For metrics and the access log the request counts with the HTTP equivalent of its gRPC
status (``gateway.grpc.status``), not the literal 200 every gRPC-Web answer has.

CORS: browsers need a preflight for ``content-type: application/grpc-web*``,
``x-grpc-web`` and ``x-user-agent`` and must be allowed to read ``grpc-status`` and
``grpc-message`` (needed for headers-only answers). With ``middleware: [cors]`` and::

    plugins:
      - name: cors
        config:
          allow_origins: ["https://app.example.com"]
          allow_methods: [POST]
          allow_headers: [content-type, x-grpc-web, x-user-agent, grpc-timeout, authorization]
          expose_headers: [grpc-status, grpc-message, grpc-status-details-bin]

the preflight is answered by the gateway (also for routes that list only ``POST``) and
every gRPC-Web answer carries ``Access-Control-Expose-Headers``. Add the custom
metadata keys scripts must read to ``expose_headers``. (The ``cors`` plugin replaces
any ``Access-Control-*`` header set before it, so the exposure list lives in its
config, not here.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import grpc

from gateway.grpc.content import grpc_web_content_type, is_text
from gateway.grpc.forwarder import GrpcForwarder, forwarder_for
from gateway.grpc.metadata import is_binary, request_metadata, response_metadata
from gateway.grpc.status import code_number, http_status
from gateway.proxy.http import Outcome
from gateway.routing.table import Route
from gateway.types import Receive, Scope, Send
from gateway.upstream.errors import UpstreamError
from gateway.upstream.upstream import Endpoint

DATA_FLAG = 0x00
COMPRESSED_FLAG = 0x01
TRAILER_FLAG = 0x80

#: Browser and HTTP/1 headers that mean nothing to a gRPC service.
_BROWSER_HEADERS = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"cache-control",
        b"dnt",
        b"origin",
        b"pragma",
        b"priority",
        b"referer",
        b"x-grpc-web",
        b"x-user-agent",
    }
)
_TIMEOUT = re.compile(r"^\s*(\d{1,8})([HMSmun])\s*$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_PADDING = re.compile(rb"=+")


class GrpcWebError(Exception):
    """A request the gateway refuses before calling upstream, with its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_frames(data: bytes) -> list[bytes]:
    """The messages of a gRPC-Web request body.

    Raises:
        GrpcWebError: truncated frames, a trailer frame, or a compressed message.
    """
    messages = []
    position = 0
    size = len(data)
    while position < size:
        if size - position < 5:
            raise GrpcWebError(grpc.StatusCode.INVALID_ARGUMENT, "truncated gRPC-Web frame")
        flag = data[position]
        length = int.from_bytes(data[position + 1 : position + 5], "big")
        start = position + 5
        if start + length > size:
            raise GrpcWebError(grpc.StatusCode.INVALID_ARGUMENT, "truncated gRPC-Web message")
        if flag & TRAILER_FLAG:
            raise GrpcWebError(grpc.StatusCode.INVALID_ARGUMENT, "trailer frame in a request")
        if flag & COMPRESSED_FLAG:
            raise GrpcWebError(
                grpc.StatusCode.UNIMPLEMENTED, "compressed gRPC-Web messages are not supported"
            )
        messages.append(data[start : start + length])
        position = start + length
    return messages


def frame(payload: bytes, flag: int = DATA_FLAG) -> bytes:
    return bytes((flag,)) + len(payload).to_bytes(4, "big") + payload


def decode_text(data: bytes) -> bytes:
    """A ``-text`` body: base64, possibly several padded chunks one after the other."""
    data = re.sub(rb"\s+", b"", data)
    out = bytearray()
    start = 0
    try:
        for padding in _PADDING.finditer(data):
            out += base64.b64decode(data[start : padding.end()], validate=True)
            start = padding.end()
        tail = data[start:]
        if tail:
            out += base64.b64decode(tail + b"=" * (-len(tail) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise GrpcWebError(
            grpc.StatusCode.INVALID_ARGUMENT, "gRPC-Web text body is not base64"
        ) from None
    return bytes(out)


def parse_timeout(value: str) -> float | None:
    """``grpc-timeout`` (``100m``, ``5S``...) in seconds; None when absent or malformed."""
    found = _TIMEOUT.match(value)
    if found is None:
        return None
    return int(found.group(1)) * _TIMEOUT_UNITS[found.group(2)]


def percent_encode(message: str) -> str:
    """``grpc-message`` encoding: UTF-8, percent-encoding outside printable ASCII and ``%``."""
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def metadata_headers(metadata: Sequence[tuple[str, str | bytes]]) -> list[tuple[bytes, bytes]]:
    """gRPC metadata as HTTP headers: ``-bin`` values base64 (unpadded, as gRPC sends)."""
    headers = []
    for key, value in metadata:
        if is_binary(key):
            raw = value if isinstance(value, bytes) else value.encode("latin-1")
            text = base64.b64encode(raw).rstrip(b"=")
        else:
            text = value.encode("latin-1") if isinstance(value, str) else value
        headers.append((key.encode("latin-1"), text))
    return headers


def trailer_block(
    code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, str | bytes]]
) -> bytes:
    """The body of the trailer frame: an HTTP/1 header block, lower-case keys."""
    lines = [
        b"grpc-status:" + str(code_number(code)).encode(),
        b"grpc-message:" + percent_encode(message).encode("ascii"),
    ]
    lines += [name + b":" + value for name, value in metadata_headers(trailing)]
    return b"".join(line + b"\r\n" for line in lines)


def _incoming_metadata(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Request headers that become metadata: browser headers dropped, ``-bin`` decoded."""
    out = []
    for name, value in headers:
        if name in _BROWSER_HEADERS or name.startswith(b"sec-"):
            continue
        if name.endswith(b"-bin"):
            try:
                value = base64.b64decode(value + b"=" * (-len(value) % 4))
            except (binascii.Error, ValueError):
                continue
        out.append((name, value))
    return out


class _Reply:
    """The HTTP side of one gRPC-Web exchange: head once, frames, then the trailer."""

    def __init__(self, send: Send, content_type: bytes, text: bool, request_id: str) -> None:
        self.send = send
        self.content_type = content_type
        self.text = text
        self.request_id = request_id
        self.started = False

    def _base_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", self.content_type),
            (b"x-request-id", self.request_id.encode("latin-1")),
        ]

    async def start(self, initial: Sequence[tuple[str, str | bytes]]) -> None:
        headers = self._base_headers() + metadata_headers(initial)
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True

    async def _body(self, data: bytes, more: bool) -> None:
        if self.text:
            data = base64.b64encode(data)
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def message(self, payload: bytes) -> None:
        await self._body(frame(payload), True)

    async def finish(
        self,
        code: grpc.StatusCode,
        message: str,
        initial: Sequence[tuple[str, str | bytes]] = (),
        trailing: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        """The trailer frame, or, before any message, a headers-only answer."""
        if self.started:
            await self._body(frame(trailer_block(code, message, trailing), TRAILER_FLAG), False)
            return
        headers = self._base_headers() + metadata_headers(initial)
        headers += [
            (b"grpc-status", str(code_number(code)).encode()),
            (b"grpc-message", percent_encode(message).encode("ascii")),
        ]
        headers += metadata_headers(trailing)
        headers.append((b"content-length", b"0"))
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        self.started = True


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body (None if the client left); GrpcWebError over ``limit``."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise GrpcWebError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request body exceeds the limit of {limit} bytes",
            )
        if not message.get("more_body", False):
            return bytes(body)


async def forward_grpc_web(
    gateway: Any,
    scope: Scope,
    receive: Receive,
    send: Send,
    route: Route,
    upstream_path: bytes,
    request_id: str,
) -> Outcome:
    """Serve one gRPC-Web request that matched ``route`` (see the module doc).

    ``upstream_path`` (the path after the route's strip_prefix/rewrite) is the gRPC
    method called upstream, so a gRPC-Web API can be mounted under a prefix.
    """
    forwarder = forwarder_for(gateway)
    headers = scope["headers"]
    content_type = grpc_web_content_type(headers) or b"application/grpc-web+proto"
    text = is_text(content_type)
    reply = _Reply(send, content_type, text, request_id)
    limit = int(gateway.settings.server.max_body_size)
    with forwarder.tracking():
        try:
            body = await _read_body(receive, limit * 4 // 3 + 4 if text else limit)
            if body is None:
                return Outcome(499)
            messages = parse_frames(decode_text(body) if text else body)
        except GrpcWebError as exc:
            await reply.finish(exc.code, str(exc))
            return Outcome(http_status(exc.code))
        upstream = route.upstream
        if upstream is None:  # handle_http answers this case before calling here
            await reply.finish(grpc.StatusCode.UNAVAILABLE, "upstream not available")
            return Outcome(503)
        try:
            endpoint = forwarder.pick(upstream)
        except UpstreamError as exc:
            await reply.finish(grpc.StatusCode.UNAVAILABLE, exc.public_message)
            return Outcome(503)
        client = scope.get("client")
        client_ip = client[0] if client else ""
        metadata = request_metadata(
            _incoming_metadata(headers),
            client_ip=client_ip,
            request_id=request_id,
            trusted=gateway.trusted_proxies.trusts(client_ip),
        )
        timeout = None
        for name, value in headers:
            if name == b"grpc-timeout":
                timeout = parse_timeout(value.decode("latin-1"))
        timeout = forwarder.timeout_for(route, timeout)
        method = upstream_path.decode("latin-1").split("?", 1)[0]
        return await _call(
            forwarder, route, endpoint, method, metadata, timeout, messages, reply, receive
        )


async def _call(
    forwarder: GrpcForwarder,
    route: Route,
    endpoint: Endpoint,
    method: str,
    metadata: list[tuple[str, str | bytes]],
    timeout: float | None,
    messages: list[bytes],
    reply: _Reply,
    receive: Receive,
) -> Outcome:
    """Make the upstream call and stream its answer to the browser."""
    started = time.perf_counter()
    code = grpc.StatusCode.UNKNOWN
    answered = False
    call: grpc.aio.StreamStreamCall | None = None
    watcher: asyncio.Task[None] | None = None
    endpoint.in_flight += 1
    try:
        call = forwarder.open_call(route, endpoint, method, metadata, timeout, iter(messages))
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, call))
        initial: list[tuple[str, str | bytes]] = []
        try:
            initial = response_metadata(await call.initial_metadata())
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                if not reply.started:
                    await reply.start(initial)
                await reply.message(message)
            code = await call.code()
            details = await call.details() or ""
            trailing = response_metadata(await call.trailing_metadata())
            answered = True
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            trailing = response_metadata(exc.trailing_metadata())
            answered = code != grpc.StatusCode.UNAVAILABLE or bool(exc.initial_metadata())
        if code == grpc.StatusCode.CANCELLED and watcher.done():
            return Outcome(499, endpoint=endpoint)  # the browser left; nobody to answer
        if code == grpc.StatusCode.OK and not reply.started:
            await reply.start(initial)
        await reply.finish(code, details, initial, trailing)
        status = http_status(code)
        return Outcome(status, status if answered else None, endpoint)
    finally:
        endpoint.in_flight -= 1
        if call is not None and not call.done():
            call.cancel()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        forwarder.record_endpoint(
            route, endpoint, code, answered=answered, upstream_started=started
        )


async def _cancel_on_disconnect(receive: Receive, call: grpc.aio.StreamStreamCall) -> None:
    """The browser closed the connection: cancel the upstream call (server streams)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            call.cancel()
            return
