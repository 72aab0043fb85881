"""The client's frame splitter: GOAWAY frames are taken out of the byte stream before
``h2`` sees them, wherever TCP happens to cut the bytes.

A real ``H2Connection`` on a real socket pair talks to a server-side ``h2`` connection
driven by the test; the server's bytes reach the client one byte at a time through the
protocol's own ``data_received``, so every frame header, GOAWAY and DATA body is split at
every possible place.
"""

from __future__ import annotations

import asyncio
import socket

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import GoAwayFrame

from gateway.upstream.http2 import H2Connection, H2Stream, StreamRefused


async def exchange(step: int) -> tuple[H2Stream, H2Stream, H2Connection]:
    loop = asyncio.get_running_loop()
    client_sock, server_sock = socket.socketpair()
    server_sock.setblocking(False)
    _, conn = await loop.create_connection(lambda: H2Connection(loop, tls=False), sock=client_sock)
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.initiate_connection()

    def feed(data: bytes) -> None:
        for index in range(0, len(data), step):
            conn.data_received(data[index : index + step])

    feed(server.data_to_send())
    await asyncio.wait_for(conn.ready, 5)
    conn.active = 2
    first, second = H2Stream(conn), H2Stream(conn)
    first.start(b"GET /one HTTP/1.1\r\nhost: upstream\r\n\r\n")
    second.start(b"POST /two HTTP/1.1\r\nhost: upstream\r\ncontent-length: 3\r\n\r\nabc")

    received = b""
    while not any(
        isinstance(e, h2.events.StreamEnded) and e.stream_id == 3
        for e in server.receive_data(received)
    ):
        received = await loop.sock_recv(server_sock, 65536)
    body = b"x" * 40_000
    server.send_headers(1, [(b":status", b"200"), (b"content-length", b"40000")])
    wire = server.data_to_send()
    wire += GoAwayFrame(0, last_stream_id=1, error_code=0).serialize()
    server.send_data(1, body[:16384])
    server.send_data(1, body[16384:32768])
    server.send_data(1, body[32768:], end_stream=True)
    wire += server.data_to_send()
    feed(wire)
    server_sock.close()
    return first, second, conn


@pytest.mark.parametrize("step", [1, 7, 9, 17, 4096])
async def test_goaway_is_found_wherever_the_bytes_are_cut(step: int) -> None:
    first, second, conn = await exchange(step)
    status, headers = await first.read_head(5)
    assert status == 200
    assert headers == [(b"content-length", b"40000")]
    body, more = b"", True
    while more:
        data, more = await first.read_body(5)
        body += data
    assert body == b"x" * 40_000
    with pytest.raises(StreamRefused):
        await second.read_head(5)  # past last_stream_id: never processed
    assert conn.draining
    assert not second.received_any
    conn.shutdown()
