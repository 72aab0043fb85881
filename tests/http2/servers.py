"""Real HTTP/2 upstreams for the tests: hypercorn serving a small ASGI app (h2c with prior
knowledge on plain TCP, h2 over TLS with ALPN), and a scripted server written with the
``h2`` library for what hypercorn cannot be made to do on cue (a GOAWAY in the middle of
a live stream, a request window that stays shut).

Each runs on its own event loop in a daemon thread, on a socket bound before the thread
starts, so the port is known at once and connections queue until the loop accepts them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.events
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hyperframe.frame import GoAwayFrame

from gateway.types import Receive, Scope, Send
from tests.support.servers import bind_socket

PIECE = 64 * 1024


def make_certificates(folder: Path) -> Path:
    """A throwaway CA and a certificate for 127.0.0.1/localhost signed by it (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=Octopus HTTP2 Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
    )  # fmt: skip
    return folder


class H2App:
    """The upstream app. ``requests`` records what arrived, ``peer`` being the client port
    (one per TCP connection the gateway opened).

    - ``/big?size=N``: N bytes with a Content-Length; ``big_sent`` counts what the
      transport accepted (hypercorn's send waits for the HTTP/2 window);
    - ``/gather?n=N``: answers only once N such requests are in flight at once;
    - ``/trailers``: a body, then trailers (when the request said ``te: trailers``);
    - ``/stream?chunks=N``: N chunks without a length;
    - anything else: reads the body (``received`` grows as it arrives) and answers JSON
      describing the request, with the body's size and SHA-256.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.big_sent = 0
        self.received = 0
        self._arrived = 0
        self._gate: asyncio.Event | None = None

    def reset(self) -> None:
        self.requests = []
        self.big_sent = 0
        self.received = 0
        self._arrived = 0
        self._gate = None

    @property
    def peers(self) -> set[int]:
        return {r["peer"] for r in self.requests}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        path = scope["path"]
        record: dict[str, Any] = {
            "server": self.name,
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode(),
            "http_version": scope["http_version"],
            "headers": [[n.decode(), v.decode()] for n, v in scope["headers"]],
            "peer": scope["client"][1] if scope.get("client") else 0,
        }
        self.requests.append(record)
        if path == "/big":
            await self._big(send, int(query.get("size", "1000000")))
        elif path == "/gather":
            await self._gather(send, int(query["n"]), record)
        elif path == "/trailers":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/plain")],
                    "trailers": True,
                }
            )
            await send({"type": "http.response.body", "body": b"body before trailers"})
            await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"abc123")]})
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for index in range(int(query.get("chunks", "3"))):
                await send(
                    {"type": "http.response.body", "body": b"chunk %d\n" % index, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
        else:
            digest = hashlib.sha256()
            size = 0
            more = True
            while more:
                message = await receive()
                body = message.get("body", b"")
                digest.update(body)
                size += len(body)
                self.received += len(body)
                more = message.get("more_body", False)
            record["body_size"] = size
            record["body_sha256"] = digest.hexdigest()
            await _json(send, record)

    async def _big(self, send: Send, size: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(size).encode())],
            }
        )
        left = size
        while left:
            piece = b"x" * min(PIECE, left)
            left -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": left > 0})
            self.big_sent += len(piece)

    async def _gather(self, send: Send, count: int, record: dict[str, Any]) -> None:
        if self._gate is None:
            self._gate = asyncio.Event()
        gate = self._gate
        self._arrived += 1
        record["arrived"] = self._arrived
        if self._arrived >= count:
            gate.set()
        await asyncio.wait_for(gate.wait(), 10)
        await _json(send, record)


async def _json(send: Send, record: dict[str, Any]) -> None:
    body = json.dumps(record).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HypercornServer:
    """``app`` on hypercorn in a thread: h2c (prior knowledge) on plain TCP, or TLS with
    ``alpn`` offered (``["h2", "http/1.1"]`` unless told otherwise)."""

    def __init__(
        self,
        app: Any,
        *,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        alpn: list[str] | None = None,
        **options: Any,
    ) -> None:
        sock = bind_socket()
        self.port = sock.getsockname()[1]
        config = Config()
        # Hypercorn takes the socket over (and closes it when it stops).
        config.bind = [f"fd://{sock.detach()}"]
        config.loglevel = "WARNING"
        config.graceful_timeout = 1
        if certfile is not None and keyfile is not None:
            config.certfile = str(certfile)
            config.keyfile = str(keyfile)
            config.alpn_protocols = alpn or ["h2", "http/1.1"]
        for name, value in options.items():
            setattr(config, name, value)  # e.g. h2_max_concurrent_streams
        self.config = config
        self.url = f"{'h2' if certfile else 'h2c'}://127.0.0.1:{self.port}"
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await serve(self.app, self.config, shutdown_trigger=self._stop.wait)

        try:
            self.loop.run_until_complete(main())
        finally:
            self.loop.close()

    def start(self) -> HypercornServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.loop.is_running() and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def __enter__(self) -> HypercornServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _RawConnection(asyncio.Protocol):
    """One connection of :class:`ScriptedH2Server`."""

    def __init__(self, server: ScriptedH2Server, index: int) -> None:
        self.server = server
        self.index = index
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, dict[str, Any]] = {}
        self.held: int | None = None  # the stream id of a /hold request not answered yet
        self.unacked: list[tuple[int, int]] = []  # (stream, size) kept shut by /gated

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.append(self)
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.closed.append(self.index)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                record = {
                    "connection": self.index,
                    "stream": event.stream_id,
                    "method": headers[b":method"].decode(),
                    "path": headers[b":path"].decode(),
                    "body": b"",
                    "answered": False,
                }
                self.requests[event.stream_id] = record
                self.server.requests.append(record)
                self.on_request(event.stream_id, record)
            elif isinstance(event, h2.events.DataReceived):
                record = self.requests[event.stream_id]
                record["body"] += event.data
                if record["path"] == "/gated" and not self.server.gate_open:
                    self.unacked.append((event.stream_id, event.flow_controlled_length))
                else:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                record = self.requests[event.stream_id]
                if record["path"] != "/hold":
                    self.answer(event.stream_id, record)
        self.flush()

    def on_request(self, stream_id: int, record: dict[str, Any]) -> None:
        if record["path"] == "/hold":
            self.held = stream_id
        elif self.held is not None:
            # Graceful shutdown while /hold is in flight: promise to finish it (and only
            # it), refuse this one by leaving it out of last_stream_id, then hang up.
            # h2 itself sends nothing after its own GOAWAY (python-hyper/h2#1181), so the
            # frame is written by hand and h2 goes on as if the connection were open.
            held, self.held = self.held, None
            self.flush()
            assert self.transport is not None
            self.transport.write(GoAwayFrame(0, last_stream_id=held, error_code=0).serialize())
            self.answer(held, self.requests[held], b"held")
            self.flush()
            self.transport.close()

    def answer(self, stream_id: int, record: dict[str, Any], body: bytes | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        payload = (
            body
            if body is not None
            else json.dumps(
                {
                    "connection": self.index,
                    "method": record["method"],
                    "path": record["path"],
                    "body_size": len(record["body"]),
                }
            ).encode()
        )
        self.h2.send_headers(
            stream_id,
            [(b":status", b"200"), (b"content-length", str(len(payload)).encode())],
        )
        self.h2.send_data(stream_id, payload, end_stream=True)
        record["answered"] = True

    def open_gate(self) -> None:
        for stream_id, size in self.unacked:
            self.h2.acknowledge_received_data(size, stream_id)
        self.unacked.clear()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class ScriptedH2Server:
    """An h2c server with scripted behaviour, in a thread:

    - ``/hold`` is not answered until another request arrives on its connection; then
      the server sends GOAWAY naming ``/hold`` as the last stream it will process,
      answers ``/hold`` with ``held``, leaves the other request unprocessed and closes
      the connection;
    - ``/gated`` bodies are not acknowledged (the request window stays shut) until
      :meth:`open_gate`;
    - anything else is answered with JSON naming the connection index.
    """

    def __init__(self) -> None:
        self.sock = bind_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"h2c://127.0.0.1:{self.port}"
        self.requests: list[dict[str, Any]] = []
        self.connections: list[_RawConnection] = []
        self.closed: list[int] = []
        self.gate_open = False
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        def factory() -> _RawConnection:
            return _RawConnection(self, len(self.connections))

        async def listen() -> None:
            self._server = await self.loop.create_server(factory, sock=self.sock)
            self._started.set()

        self.loop.run_until_complete(listen())
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def open_gate(self) -> None:
        def opened() -> None:
            self.gate_open = True
            for conn in self.connections:
                conn.open_gate()

        self.call(opened)

    def gated_received(self) -> int:
        return sum(len(r["body"]) for r in self.requests if r["path"] == "/gated")

    def start(self) -> ScriptedH2Server:
        self._thread.start()
        self._started.wait(5)
        return self

    def stop(self) -> None:
        def shut() -> None:
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.close()
            if self._server is not None:
                self._server.close()
            self.loop.call_later(0.05, self.loop.stop)

        if self.loop.is_running():
            self.loop.call_soon_threadsafe(shut)
        self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedH2Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
