"""HTTP/1.1 at the byte level: a raw client for requests no library would send, and a
raw upstream that misbehaves in ways an ASGI server cannot (dropping a request on a
kept-alive connection without answering, answering garbage)."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools


@dataclass
class RawResponse:
    """A response read off a socket; ``complete`` is False when the body was cut short."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    closed: bool = False  # the server closed the connection after (or instead of) it
    invalid: bool = False  # the bytes were not a valid HTTP/1.1 response

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]


class _Parser:
    """Feeds a RawResponse; interim (1xx) responses are parsed and forgotten."""

    def __init__(self, response: RawResponse) -> None:
        self.response = response
        self.interim = False
        self.head_done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.interim = 100 <= status < 200 and status != 101
        if self.interim:
            self.response.headers.clear()
            return
        self.response.status = status
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.response.body += body

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.response.complete = True


def read_response(sock: socket.socket, *, head_only: bool = False) -> RawResponse:
    """Read one final response (skipping ``1xx``); stops at its end or at EOF.

    With ``head_only`` it stops after the head (for HEAD requests, whose answer
    announces a length it does not send).
    """
    response = RawResponse()
    parser = _Parser(response)
    try:
        while not response.complete and not (head_only and parser.head_done):
            data = sock.recv(65536)
            if not data:
                response.closed = True
                break
            parser.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        response.complete = True
    except httptools.HttpParserError:
        response.invalid = True
    except (ConnectionResetError, TimeoutError):
        response.closed = True
    return response


def exchange(
    port: int, data: bytes, *, timeout: float = 5.0, wait_for_close: float = 0.0
) -> RawResponse:
    """Send ``data`` on a new connection and read one response; with ``wait_for_close``,
    then wait that long to see whether the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = read_response(sock)
        if not response.closed and wait_for_close:
            response.closed = is_closed(sock, timeout=wait_for_close)
        return response


def is_closed(sock: socket.socket, *, timeout: float) -> bool:
    """Whether the peer closes the connection within ``timeout`` (without sending more)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


OK_REPLY = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
)


class ScriptedUpstream:
    """A raw HTTP/1.1 upstream whose answers are scripted per connection and request:
    ``reply(connection_number, request_index)`` returns the bytes to send, or None to
    close the connection without answering. Connections are numbered from 1; with
    ``close_after_reply`` each connection is closed right after its first answer."""

    def __init__(
        self, reply: Callable[[int, int], bytes | None], *, close_after_reply: bool = False
    ) -> None:
        self.reply = reply
        self.close_after_reply = close_after_reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        #: ``(connection number, request line)`` of every request received.
        self.requests: list[tuple[int, str]] = []
        self._connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self._thread.join(timeout=5)
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            conn, _ = self.listener.accept()
            if self._stop.is_set():
                conn.close()
                return
            self._connections += 1
            threading.Thread(
                target=self._handle, args=(conn, self._connections), daemon=True
            ).start()

    def _handle(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(10)
        buffered = b""
        with conn:
            for index in itertools.count():
                try:
                    while b"\r\n\r\n" not in buffered:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffered += data
                    head, _, buffered = buffered.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    self.requests.append((number, lines[0]))
                    length = 0
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value.strip())
                    while len(buffered) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffered += data
                    buffered = buffered[length:]
                    answer = self.reply(number, index)
                    if answer is None:
                        return
                    conn.sendall(answer)
                    if self.close_after_reply:
                        return
                except OSError:
                    return


def drop_second_request(connection: int, index: int) -> bytes | None:
    """Answer the first request on each connection, then close on the next one unanswered:
    what a server does when its keep-alive timeout fires just as a request arrives."""
    return OK_REPLY if index == 0 else None


def request_bytes(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    host: str = "gateway.test",
) -> bytes:
    """An HTTP/1.1 request exactly as written (a Content-Length is added for a body)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if body and not any(name.lower() == "content-length" for name, _ in headers or []):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
