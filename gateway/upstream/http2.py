"""HTTP/2 upstreams: ``h2c://`` (cleartext, prior knowledge) and ``h2://`` (TLS, ALPN ``h2``).

Why a second client next to ``http1.py`` (DESIGN.md §2.5): gRPC and many services behind
sidecars speak only HTTP/2, and one multiplexed connection replaces a pool of hundreds of
keep-alive sockets. The framing is done by the ``h2`` library (sans-IO); this module
owns the I/O, flow control and the connection lifecycle.

The proxy is not told which protocol it drives: it holds one *exchange object* per
request and uses exactly the interface of :class:`~gateway.upstream.http1.H1Connection`
(``start``, ``write_chunk``, ``end_chunks``, ``drain``, ``read_head``, ``read_body``,
``complete``, ``reusable``, ``received_any``, ``head_received``, ``closed``,
``keep_alive``, ``abort``, ``loop``). For HTTP/2 that object is an :class:`H2Stream`;
:class:`H2Pool` hands one out per ``acquire`` on a shared :class:`H2Connection`.
``start`` receives the HTTP/1.1 head that ``build_request_head`` made (the header rules
live in one place) and turns it back into an HTTP/2 header block.

Flow control, both ways:

- response DATA is acknowledged to the *connection* window as soon as it arrives (so one
  slow stream never starves the others) but to the *stream* window only as the proxy
  reads it, so a slow client holds its upstream stream back and the gateway buffers at
  most ``STREAM_WINDOW`` bytes per stream;
- request bodies go out only as far as the upstream's windows allow; the rest waits in a
  small per-stream queue and ``drain()`` blocks while that queue is above
  ``OUT_HIGH_WATER``, so an upload streams at the upstream's pace.

GOAWAY: streams the upstream accepted (id ≤ last_stream_id) finish; later ones fail with
:class:`StreamRefused` (nothing was processed, RFC 9113 §6.8) and are replayed once on a
new connection when their whole body is known; new streams go to another connection.
The ``h2`` library moves its state machine to CLOSED on any GOAWAY and drops pending
output (python-hyper/h2#1181), which would kill the streams the server promised to
finish, so GOAWAY frames are taken out of the byte stream before ``h2`` sees them.

Trailers are kept on the stream (``H2Stream.trailers``); the proxy relays them as ASGI
``http.response.trailers`` when the client sent ``TE: trailers`` and the server has that
extension (uvicorn's HTTP/1.1 does not; HTTP/2 servers such as hypercorn do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from time import monotonic

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from gateway.upstream.errors import (
    ConnectFailed,
    ConnectionReset,
    PoolTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

log = logging.getLogger("octopus.upstream.h2")

#: What we let an upstream send on one stream before the proxy has read it: the most
#: one response can occupy in gateway memory (the same bound as http1's HIGH_WATER).
STREAM_WINDOW = 256 * 1024
#: The connection-level receive window. It is acknowledged on arrival (buffering is
#: bounded per stream), so it only needs to cover the bytes on the wire.
CONNECTION_WINDOW = 16 * 1024 * 1024
#: Request bytes queued per stream (waiting for the upstream's window) before ``drain``
#: makes the client side wait.
OUT_HIGH_WATER = 64 * 1024
#: Streams per connection even when the upstream allows more (most say 100..250).
MAX_STREAMS_PER_CONNECTION = 256
#: How often a refused stream (GOAWAY past it, REFUSED_STREAM) is sent again.
MAX_REPLAYS = 1

_DEFAULT_WINDOW = 65_535
_GOAWAY = 0x7
_FRAME_HEADER = 9

#: Headers that are meaningless or forbidden in HTTP/2 (RFC 9113 §8.2.2); ``host``
#: becomes ``:authority`` and ``te`` survives only as ``trailers``.
_CONNECTION_SPECIFIC = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)


class StreamRefused(ConnectionReset):
    """The upstream did not process the stream (GOAWAY past it, or REFUSED_STREAM).

    Safe to send again on another connection whatever the method (RFC 9113 §8.7).
    """

    retryable = True


def request_from_head(
    head: bytes, scheme: bytes
) -> tuple[list[tuple[bytes, bytes]], memoryview, bool]:
    """The HTTP/2 header block for an HTTP/1.1 request head, the body bytes that followed
    the head, and whether the body is streamed (``transfer-encoding: chunked``).

    A cheap split, not a parser: the head was built by ``build_request_head``, so it is
    well formed and hop-by-hop headers are already gone except the framing line, which
    HTTP/2 replaces with DATA frames.
    """
    end = head.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError("request head without its blank line")
    lines = head[:end].split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.rpartition(b" ")[0] or rest
    authority = b""
    streamed = False
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"host":
            if not authority:
                authority = value
        elif name == b"transfer-encoding":
            streamed = b"chunked" in value.lower()
        elif name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
            continue
        else:
            fields.append((name, value))
    headers = [
        (b":method", method),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", target),
        *fields,
    ]
    return headers, memoryview(head)[end + 4 :], streamed


class H2Stream:
    """One request/response exchange on an :class:`H2Connection`.

    Has the interface the proxy uses on ``H1Connection``; what "the connection" means
    there (closing it, reusing it) means "the stream" here: ``abort`` resets this
    stream only, and the pool never closes a connection because one stream failed.
    """

    __slots__ = (
        "_body",
        "_body_waiter",
        "_buffered_fc",
        "_chunks",
        "_complete",
        "_conn",
        "_consumed",
        "_drain_waiter",
        "_end_pending",
        "_error",
        "_head_waiter",
        "_headers",
        "_local_ended",
        "_out",
        "_out_bytes",
        "_pool",
        "_replays",
        "_request",
        "_timer",
        "attached",
        "keep_alive",
        "received_any",
        "status",
        "stream_id",
        "trailers",
    )

    def __init__(self, conn: H2Connection, pool: H2Pool | None = None) -> None:
        self._conn = conn
        self._pool = pool
        self._replays = 0
        self._request: list[tuple[bytes, bytes]] | None = None
        self._body: memoryview | None = None  # the whole body when it is known (replayable)
        self._timer: asyncio.TimerHandle | None = None
        self.attached = True  # counted in the connection's active streams
        self.keep_alive = True
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.stream_id = 0
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        #: Trailer fields of the response, when the upstream sent any (not relayed yet).
        self.trailers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered_fc = 0  # flow-controlled bytes (padding included) not yet read
        self._consumed = 0  # read but not yet handed back to the upstream's window
        self._complete = False
        self._error: UpstreamError | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._end_pending = False
        self._local_ended = False
        self.received_any = False

    # --- the exchange API used by the proxy ------------------------------------------

    def start(self, head: bytes, *, head_only: bool = False) -> None:
        """Open the stream: HEADERS from the HTTP/1.1 ``head``, then any body after it.

        ``head_only`` (HEAD requests) needs nothing here: an HTTP/2 answer to HEAD ends
        with its headers.
        """
        self._head_waiter = self._conn.loop.create_future()
        try:
            headers, body, streamed = request_from_head(head, self._conn.scheme)
        except ValueError as exc:
            self._fail(UpstreamProtocolError(f"cannot convert the request head: {exc}"))
            return
        self._request = headers
        # A body given whole (Content-Length, or none) can be sent again if the stream
        # is refused; a streamed one cannot, its chunks are gone once written.
        self._body = None if streamed else body
        self._open(streamed)

    def write_chunk(self, data: bytes) -> None:
        """One piece of a streamed request body: sent as far as the windows allow."""
        if data and self._error is None and not self._local_ended:
            self._out.append(memoryview(data))
            self._out_bytes += len(data)
            self._conn.pump(self)

    def end_chunks(self) -> None:
        """The end of a streamed request body (END_STREAM once the queue is sent)."""
        if self._error is None and not self._local_ended:
            self._end_pending = True
            self._conn.pump(self)

    async def drain(self) -> None:
        """Wait while this stream's unsent request bytes are above ``OUT_HIGH_WATER``
        (the upstream's window is closed) or the socket's write buffer is full."""
        while True:
            if self._error is not None:
                raise self._error
            if self._conn.closed:
                raise ConnectionReset("upstream closed the connection")
            if self._out_bytes <= OUT_HIGH_WATER and not self._conn.write_paused:
                return
            self._drain_waiter = self._conn.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._conn.loop

    @property
    def head_received(self) -> bool:
        return self.status != 0

    @property
    def closed(self) -> bool:
        """The stream can carry nothing more: failed, reset, or its connection is gone."""
        return self._error is not None or self._conn.closed

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def reusable(self) -> bool:
        """Ended cleanly on both sides: releasing it needs no RST_STREAM.

        A stream is never reused; this tells the pool the upstream got a whole request
        and sent a whole response, read to the end.
        """
        return (
            self._complete
            and self._local_ended
            and self.keep_alive
            and self._error is None
            and not self._chunks
            and not self._conn.closed
        )

    @property
    def buffered(self) -> int:
        """Response bytes received and not yet read by the proxy (at most the window)."""
        return self._buffered_fc

    @property
    def queued(self) -> int:
        """Request bytes waiting for the upstream's window (about ``OUT_HIGH_WATER``)."""
        return self._out_bytes

    async def read_head(self, timeout: float | None) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Wait for the response status and headers, at most ``timeout`` seconds.

        A refused stream whose body is known is sent again on another connection (once)
        within the same timeout; otherwise the error goes to the proxy, which retries
        when nothing was received and the request may be repeated.
        """
        loop = self._conn.loop
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            waiter = self._head_waiter
            assert waiter is not None, "read_head before start"
            try:
                if not waiter.done():
                    self._arm(_left(loop, deadline), "no response from upstream within the timeout")
                    try:
                        await waiter
                    finally:
                        self._disarm()
                else:
                    waiter.result()
                return self.status, self._headers
            except StreamRefused:
                if not self._replayable():
                    raise
            await self._replay(_left(loop, deadline))

    async def read_body(self, timeout: float | None) -> tuple[bytes, bool]:
        """The next piece of the response body and whether more follows.

        Reading is what reopens the upstream's window for this stream: a client that
        does not read holds the upstream back.
        """
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._consumed += self._buffered_fc
                self._buffered_fc = 0
                if self._consumed >= STREAM_WINDOW // 2 and not self._complete:
                    self._conn.open_window(self, self._consumed)
                    self._consumed = 0
                return data, not self._complete
            if self._complete:
                return b"", False
            if self._error is not None:
                raise self._error
            self._body_waiter = self._conn.loop.create_future()
            self._arm(timeout, "upstream stopped sending the response body")
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
                self._disarm()

    def abort(self, error: UpstreamError | None = None) -> None:
        """Give up on the exchange: RST_STREAM (CANCEL); the connection lives on."""
        self.keep_alive = False
        if self._complete and error is None:
            self._conn.cancel(self)  # only our side may still be open
            return
        self._fail(error or ConnectionReset("the exchange was abandoned"))

    def close(self) -> None:
        self.abort()

    # --- called by H2Connection ------------------------------------------------------

    def on_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.received_any = True
        status = 0
        fields: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif not name.startswith(b":"):
                fields.append((name, value))
        if not 200 <= status <= 599:
            # 1xx arrive as InformationalResponseReceived; anything else is invalid.
            self._fail(UpstreamProtocolError(f"invalid status {status} from upstream"))
            return
        self.status = status
        self._headers = fields
        _wake(self._head_waiter)

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        self.received_any = True
        self._buffered_fc += flow_controlled
        if data:
            self._chunks.append(data)
        _wake(self._body_waiter)

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = [(n, v) for n, v in headers if not n.startswith(b":")]

    def on_end(self) -> None:
        self._complete = True
        if not self.status:
            self._fail(UpstreamProtocolError("upstream ended the stream without a response"))
            return
        _wake(self._head_waiter)
        _wake(self._body_waiter)

    def on_reset(self, error_code: int) -> None:
        """The upstream reset the stream (RST_STREAM)."""
        if self._complete:
            # A whole response, then "stop sending" (RFC 9113 §8.1): nothing is lost.
            self._local_ended = True
            self._out.clear()
            self._out_bytes = 0
            _wake(self._drain_waiter)
            return
        if error_code == h2.errors.ErrorCodes.REFUSED_STREAM and not self.received_any:
            self._fail(StreamRefused("upstream refused the stream"))
        else:
            name = _error_name(error_code)
            self._fail(ConnectionReset(f"upstream reset the stream ({name})"))

    def on_sent_end(self) -> None:
        self._local_ended = True
        self._end_pending = False

    def wake_drain(self) -> None:
        _wake(self._drain_waiter)

    def fail(self, error: UpstreamError) -> None:
        """The connection failed or went away under this stream."""
        if self._complete:
            return  # the whole response is here; only our (finished) side is affected
        self._fail(error)

    # --- internals -------------------------------------------------------------------

    def _open(self, streamed: bool) -> None:
        body = self._body
        end_now = not streamed and not body
        try:
            self.stream_id = self._conn.open_stream(self, self._request or [], end_now)
        except UpstreamError as exc:
            self._fail(exc)
            return
        if end_now:
            self._local_ended = True
        elif body is not None:
            self._out.append(body)
            self._out_bytes = len(body)
            self._end_pending = True
        self._conn.pump(self)

    def _replayable(self) -> bool:
        return (
            self._pool is not None
            and self._request is not None
            and self._body is not None
            and self._replays < MAX_REPLAYS
            and not self.received_any
        )

    async def _replay(self, timeout: float | None) -> None:
        """Send the same request again on another connection of the pool."""
        assert self._pool is not None
        self._replays += 1
        conn, _ = await self._pool.reserve(timeout)
        old = self._conn
        old.detach(self)
        self._pool.settle(old)
        self._conn = conn
        self.attached = True
        self._disarm()
        self._reset_exchange()
        self.keep_alive = True
        self._head_waiter = conn.loop.create_future()
        log.debug("replaying a refused stream on a new connection")
        self._open(streamed=False)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.keep_alive = False
        for waiter in (self._head_waiter, self._body_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # marks it retrieved: nobody may be waiting yet
        self._out.clear()
        self._out_bytes = 0
        self._end_pending = False
        self._conn.cancel(self)

    def _arm(self, timeout: float | None, message: str) -> None:
        if timeout is not None:
            # Build the exception only if the timer fires (per-request cost otherwise).
            self._timer = self._conn.loop.call_later(timeout, self._timed_out, message)

    def _timed_out(self, message: str) -> None:
        self._fail(UpstreamTimeout(message))

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class H2Connection(asyncio.Protocol):
    """One HTTP/2 client connection carrying many :class:`H2Stream` exchanges."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        tls: bool,
        on_lost: Callable[[H2Connection], None] | None = None,
        on_change: Callable[[H2Connection], None] | None = None,
    ) -> None:
        self.loop = loop
        self.tls = tls
        self.scheme = b"https" if tls else b"http"
        self._on_lost = on_lost
        self._on_change = on_change  # told when streams may be opened (again)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        # Replaced before the preface, so the values are in force from the first frame
        # (``update_settings`` would apply them only once acknowledged).
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.transport: asyncio.Transport | None = None
        #: Resolved once the upstream's SETTINGS arrived (it speaks HTTP/2).
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed = False
        #: GOAWAY received or shutting down: no new streams.
        self.draining = False
        self.write_paused = False
        self.streams: dict[int, H2Stream] = {}
        #: Streams handed out by the pool and not yet released (the capacity in use).
        self.active = 0
        self.streams_opened = 0
        #: Bytes read from the socket (what the upstream got to send, for tests and stats).
        self.received_bytes = 0
        self.idle_since = monotonic()
        self._partial = b""  # bytes of a frame header (or GOAWAY) not complete yet
        self._skip = 0  # bytes of the current frame already passed on to h2
        self._conn_unacked = 0
        self._said_goaway = False  # our GOAWAY is out: h2 accepts no more frames
        self._initiated = False  # the preface is out

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            ssl_object = transport.get_extra_info("ssl_object")
            protocol = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if protocol != "h2":
                # An HTTP/1.1-only server would read our preface as a broken request.
                self._refuse(
                    ConnectFailed(f"upstream did not negotiate h2 over TLS (ALPN: {protocol})")
                )
                return
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self._initiated = True
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.received_bytes += len(data)
        try:
            self._receive(data)
        except h2.exceptions.H2Error as exc:
            self._abort_connection(UpstreamProtocolError(f"HTTP/2 protocol error: {exc}"))
            return
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.draining = True
        reason = f": {exc}" if exc else ""
        if not self.ready.done():
            self.ready.set_exception(ConnectFailed(f"upstream closed the connection{reason}"))
            self.ready.exception()
        error = ConnectionReset(f"upstream closed the connection{reason}")
        for stream in list(self.streams.values()):
            stream.fail(error)
        self.streams.clear()
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.wake_drain()

    # --- what the pool and streams call ----------------------------------------------

    def stream_limit(self, cap: int) -> int:
        """How many streams may be open at once: the upstream's limit, at most ``cap``."""
        return min(self._h2.remote_settings.max_concurrent_streams, cap)

    def open_stream(self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> int:
        """Send HEADERS for a new stream; raises StreamRefused when none can be opened."""
        if self.closed or self.draining:
            raise StreamRefused("the upstream connection is going away")
        h2c = self._h2
        try:
            stream_id = h2c.get_next_available_stream_id()
            h2c.send_headers(stream_id, headers, end_stream=end)
        except h2.exceptions.TooManyStreamsError:
            raise StreamRefused("upstream lowered its concurrent stream limit") from None
        except h2.exceptions.NoAvailableStreamIDError:
            self.draining = True
            raise StreamRefused("stream ids of the upstream connection ran out") from None
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamProtocolError(f"cannot send the request headers: {exc}") from None
        self.streams[stream_id] = stream
        self.streams_opened += 1
        return stream_id

    def pump(self, stream: H2Stream) -> None:
        """Send as much of the stream's queued body as the flow-control windows allow."""
        self._send_queued(stream)
        self._flush()

    def open_window(self, stream: H2Stream, size: int) -> None:
        """Hand ``size`` read bytes back to the upstream's window for ``stream``."""
        if self.closed or stream.stream_id not in self.streams:
            return
        try:
            self._h2.increment_flow_control_window(size, stream.stream_id)
        except (h2.exceptions.ProtocolError, KeyError, ValueError):
            return  # the stream closed meanwhile: there is no window to open
        self._flush()

    def cancel(self, stream: H2Stream) -> None:
        """RST_STREAM (CANCEL) when the stream is still open on either side."""
        if self.closed or not stream.stream_id or stream.stream_id not in self.streams:
            return
        h2_stream = self._h2.streams.get(stream.stream_id)
        if h2_stream is not None and not h2_stream.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            self._flush()

    def detach(self, stream: H2Stream) -> None:
        """The pool took the stream back (or it moved to another connection)."""
        if not stream.attached:
            return
        stream.attached = False
        if stream.stream_id and not stream.reusable:
            self.cancel(stream)
        self.streams.pop(stream.stream_id, None)
        self.active -= 1
        if self.active == 0:
            self.idle_since = monotonic()

    def shutdown(self) -> None:
        """Close gracefully: GOAWAY (NO_ERROR), then the socket."""
        self.draining = True
        if self.transport is None or self.closed:
            return
        if self._initiated and not self._said_goaway and not self.transport.is_closing():
            self._said_goaway = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
            self._flush()
        self.transport.close()

    # --- internals -------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        """Feed ``data`` to h2, except GOAWAY frames, which are handled here (see the
        module docstring). Only frame headers are looked at; bodies pass through."""
        buf = self._partial + data if self._partial else data
        self._partial = b""
        size = len(buf)
        pos = self._skip
        if pos >= size:
            self._skip = pos - size
            self._feed(buf)
            return
        start = 0
        while True:
            if pos + _FRAME_HEADER > size:
                self._feed(buf[start:pos])
                self._partial = buf[pos:]
                self._skip = 0
                return
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + _FRAME_HEADER + length
            if buf[pos + 3] == _GOAWAY:
                if length > self._h2.max_inbound_frame_size:
                    self._abort_connection(UpstreamProtocolError("oversized GOAWAY from upstream"))
                    return
                if end > size:
                    self._feed(buf[start:pos])
                    self._partial = buf[pos:]
                    self._skip = 0
                    return
                self._feed(buf[start:pos])
                self._goaway(buf[pos + _FRAME_HEADER : end])
                if self.closed:
                    return
                start = pos = end
                continue
            if end >= size:
                self._feed(buf[start:] if start else buf)
                self._skip = end - size
                return
            pos = end

    def _feed(self, data: bytes) -> None:
        if not data or self.closed or self._said_goaway:
            return
        self._handle(self._h2.receive_data(data))

    def _handle(self, events: list[h2.events.Event]) -> None:
        streams = self.streams
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._conn_unacked += event.flow_controlled_length
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.flow_controlled_length)
            elif isinstance(event, h2.events.ResponseReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_headers(event.headers)
            elif isinstance(event, h2.events.TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_trailers(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_end()
            elif isinstance(event, h2.events.StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_reset(event.error_code)
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        self._send_queued(stream)
                else:
                    self._send_all_queued()
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if not self.ready.done():
                    self.ready.set_result(None)
                changed = event.changed_settings
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                    self._send_all_queued()
                if self._on_change is not None:
                    self._on_change(self)
            elif isinstance(event, h2.events.ConnectionTerminated):
                # Only if a GOAWAY ever slipped past ``_receive``.
                self._on_goaway(event.last_stream_id or 0, int(event.error_code or 0))
        if self._conn_unacked >= CONNECTION_WINDOW // 4:
            self._h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0

    def _send_queued(self, stream: H2Stream) -> None:
        if self.closed or stream.stream_id not in self.streams:
            return
        h2c = self._h2
        sid = stream.stream_id
        out = stream._out
        try:
            while out:
                room = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
                if room <= 0:
                    break
                piece = out[0]
                if len(piece) <= room:
                    out.popleft()
                    stream._out_bytes -= len(piece)
                    last = not out and stream._end_pending
                    h2c.send_data(sid, piece, end_stream=last)
                    if last:
                        stream.on_sent_end()
                else:
                    h2c.send_data(sid, piece[:room])
                    out[0] = piece[room:]
                    stream._out_bytes -= room
            if not out and stream._end_pending:
                h2c.end_stream(sid)
                stream.on_sent_end()
        except (h2.exceptions.ProtocolError, KeyError):
            # The upstream closed its side or reset the stream meanwhile: the body is
            # not wanted any more; the response (or the reset) tells the rest.
            out.clear()
            stream._out_bytes = 0
            stream._end_pending = False
            stream._local_ended = True
        if stream._out_bytes <= OUT_HIGH_WATER:
            stream.wake_drain()

    def _send_all_queued(self) -> None:
        for stream in list(self.streams.values()):
            if stream._out or stream._end_pending:
                self._send_queued(stream)

    def _goaway(self, payload: bytes) -> None:
        if len(payload) < 8:
            self._abort_connection(UpstreamProtocolError("malformed GOAWAY from upstream"))
            return
        last_stream_id = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        error_code = int.from_bytes(payload[4:8], "big")
        self._on_goaway(last_stream_id, error_code)

    def _on_goaway(self, last_stream_id: int, error_code: int) -> None:
        if error_code:
            log.info(
                "upstream sent GOAWAY",
                extra={"error_code": _error_name(error_code), "last_stream_id": last_stream_id},
            )
        self.draining = True
        if not self.ready.done():
            self.ready.set_exception(ConnectFailed("upstream sent GOAWAY at once"))
            self.ready.exception()
        refused = [s for sid, s in self.streams.items() if sid > last_stream_id]
        for stream in refused:
            stream.fail(StreamRefused("upstream is going away and did not process the stream"))
        if self._on_change is not None:
            self._on_change(self)
        if self.active == 0:
            self.shutdown()

    def _refuse(self, error: UpstreamError) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()
        self.draining = True
        if self.transport is not None:
            self.transport.close()

    def _abort_connection(self, error: UpstreamError) -> None:
        """A connection error: every stream fails, GOAWAY goes out, the socket closes."""
        if not self.ready.done():
            self.ready.set_exception(ConnectFailed(f"upstream does not speak HTTP/2: {error}"))
            self.ready.exception()
        self.draining = True
        for stream in list(self.streams.values()):
            stream.fail(error)
        if self._initiated and not self._said_goaway:
            self._said_goaway = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._flush()
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)


class H2Pool:
    """The HTTP/2 connections to one endpoint; the same interface as ``ConnectionPool``.

    ``acquire`` returns a new stream on the first connection with a free stream slot
    (streams are packed, so a few connections carry everything), connecting when none
    has room. Concurrent callers that find no connection wait for the same connect
    instead of opening one each. With ``max_connections`` connections all at their
    stream limit, callers queue until a stream ends.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_connections: int = 512,
        idle_timeout: float = 60.0,
        max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.max_connections = max(1, max_connections)
        self.idle_timeout = idle_timeout
        self.max_streams_per_connection = max_streams_per_connection
        self._conns: list[H2Connection] = []
        self._connecting: asyncio.Task[H2Connection] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return len(self._conns) + (1 if self._connecting is not None else 0)

    @property
    def idle_connections(self) -> int:
        return sum(1 for conn in self._conns if conn.active == 0 and not conn.closed)

    @property
    def connections(self) -> list[H2Connection]:
        return list(self._conns)

    async def acquire(self, connect_timeout: float | None) -> tuple[H2Stream, bool]:
        """A new stream, and whether its connection existed before this call."""
        conn, reused = await self.reserve(connect_timeout)
        return H2Stream(conn, self), reused

    def release(self, stream: H2Stream) -> None:
        """Take a stream back: reset it if it did not end cleanly, free its slot."""
        conn = stream._conn
        conn.detach(stream)
        self.settle(conn)

    async def close(self) -> None:
        """Close idle connections now; busy ones close when their last stream ends."""
        self._closed = True
        for conn in list(self._conns):
            if conn.active == 0:
                conn.shutdown()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    # --- internals -------------------------------------------------------------------

    async def reserve(self, timeout: float | None) -> tuple[H2Connection, bool]:
        """A connection with one stream slot taken for the caller."""
        conn = self._pick()
        if conn is not None:
            conn.active += 1
            return conn, True
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            fresh = False
            task = self._connecting
            if task is None and len(self._conns) < self.max_connections:
                task = self._connecting = loop.create_task(self._connect(_left(loop, deadline)))
                task.add_done_callback(self._connect_done)
            if task is not None:
                try:
                    async with asyncio.timeout(_left(loop, deadline)):
                        await asyncio.shield(task)
                except TimeoutError:
                    raise ConnectFailed(f"connect to {self.host}:{self.port} timed out") from None
                fresh = True
            else:
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
                try:
                    async with asyncio.timeout(_left(loop, deadline)):
                        await waiter
                except TimeoutError:
                    raise PoolTimeout(
                        f"all {len(self._conns)} connections to {self.host}:{self.port} "
                        "stayed at their stream limit"
                    ) from None
                finally:
                    if not waiter.done():
                        waiter.cancel()
            conn = self._pick()
            if conn is not None:
                conn.active += 1
                return conn, not fresh

    def settle(self, conn: H2Connection) -> None:
        """After a stream left ``conn``: close it if it is going away and now unused,
        else offer the free slot to a waiter."""
        if conn.closed:
            return
        if conn.draining or self._closed:
            if conn.active == 0:
                conn.shutdown()
            return
        if conn.active == 0 and self._sweep_handle is None:
            self._schedule_sweep(conn.loop)
        self._wake(1)

    def _pick(self) -> H2Connection | None:
        cap = self.max_streams_per_connection
        for conn in self._conns:
            if not conn.draining and conn.active < conn.stream_limit(cap):
                return conn
        return None

    async def _connect(self, timeout: float | None) -> H2Connection:
        loop = asyncio.get_running_loop()
        tls = self.ssl_context is not None
        conn: H2Connection | None = None

        def protocol() -> H2Connection:
            return H2Connection(loop, tls=tls, on_lost=self._lost, on_change=self._changed)

        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    protocol,
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname if tls else None,
                )
                await conn.ready
        except TimeoutError:
            if conn is not None:
                conn.shutdown()
            raise ConnectFailed(f"connect to {self.host}:{self.port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        except UpstreamError as exc:
            if conn is not None:
                conn.shutdown()
            raise ConnectFailed(f"{self.host}:{self.port}: {exc}") from None
        except BaseException:
            if conn is not None:
                conn.shutdown()
            raise
        self._conns.append(conn)
        return conn

    def _connect_done(self, task: asyncio.Task[H2Connection]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved: the waiters got it through the shield
        self._wake(len(self._waiters))

    def _lost(self, conn: H2Connection) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        self._wake(len(self._waiters))  # room for a new connection

    def _changed(self, conn: H2Connection) -> None:
        self._wake(len(self._waiters))

    def _wake(self, count: int) -> None:
        waiters = self._waiters
        while count > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _schedule_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        delay = max(self.idle_timeout / 2, 0.05)
        self._sweep_handle = loop.call_later(delay, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep_handle = None
        now = monotonic()
        for conn in list(self._conns):
            if conn.active == 0 and now - conn.idle_since >= self.idle_timeout:
                conn.shutdown()
        if any(conn.active == 0 and not conn.closed for conn in self._conns):
            self._schedule_sweep(loop)


def _left(loop: asyncio.AbstractEventLoop, deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(deadline - loop.time(), 0.001)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error {code}"
