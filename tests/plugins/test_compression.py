"""The ``compression`` plugin against a real gateway and upstream: coding negotiation by
q-value, each coding decodes to the original, streaming stays live, and what must never
be touched (SSE, small, encoded, partial, HEAD, 204) is not."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator

import brotli
import httpx
import pytest
import zstandard

from plugins.compression import choose_encoding
from settings import ConfigError
from tests.plugins.shaped_upstream import (
    ENCODED_BODY,
    ShapedUpstream,
    ShapedUpstreamServer,
    text_body,
)
from tests.support.gateway import GatewayServer, gateway_config, route


@pytest.fixture(scope="module")
def shaped() -> Iterator[ShapedUpstreamServer]:
    with ShapedUpstreamServer() as server:
        yield server


@pytest.fixture
def upstream(shaped: ShapedUpstreamServer) -> ShapedUpstream:
    shaped.app.reset()
    shaped.app.sse_events.clear()
    return shaped.app


@pytest.fixture(scope="module")
def gateway(shaped: ShapedUpstreamServer) -> Iterator[GatewayServer]:
    config = gateway_config(
        {"up": shaped.url},
        [route("all", "/{rest:path}", "up", plugins=["compression"])],
        plugins=[{"name": "compression", "config": {}}],
    )
    with GatewayServer(config) as server:
        yield server


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        c.headers.pop("accept-encoding", None)  # each test says what it accepts
        yield c


def fetch(client: httpx.Client, path: str, accept: str | None, method: str = "GET") -> Raw:
    headers = {"accept-encoding": accept} if accept is not None else {}
    with client.stream(method, path, headers=headers) as response:
        return Raw(response, b"".join(response.iter_raw()))


class Raw:
    """A response and its body exactly as sent (not decoded by the client)."""

    def __init__(self, response: httpx.Response, body: bytes) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self.body = body

    @property
    def encoding(self) -> str | None:
        return self.headers.get("content-encoding")

    def vary(self) -> list[str]:
        return [
            member.strip().lower()
            for value in self.headers.get_list("vary")
            for member in value.split(",")
        ]


def decode(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if coding == "br":
        return brotli.decompress(data)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise AssertionError(coding)


class StreamDecoder:
    """Incremental decoding, to prove each piece is decodable as it arrives."""

    def __init__(self, coding: str) -> None:
        if coding == "gzip":
            self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self.feed = self._d.decompress
        elif coding == "br":
            self._b = brotli.Decompressor()
            self.feed = self._b.process
        else:
            self._z = zstandard.ZstdDecompressor().decompressobj()
            self.feed = self._z.decompress


# --- each coding -------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_each_coding_decodes_to_the_original_body(client: httpx.Client, coding: str) -> None:
    raw = fetch(client, "/text?size=200000", coding)
    assert raw.status == 200
    assert raw.encoding == coding
    assert "content-length" not in raw.headers
    assert len(raw.body) < 200000 // 4
    assert decode(coding, raw.body) == text_body(200000)


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_json_bodies_are_compressed_too(client: httpx.Client, coding: str) -> None:
    raw = fetch(client, "/text?size=5000&type=application/json;%20charset=utf-8", coding)
    assert raw.encoding == coding
    assert decode(coding, raw.body) == text_body(5000)


# --- negotiation -------------------------------------------------------------------------


def test_equal_q_values_go_to_the_servers_preference_br_first(client: httpx.Client) -> None:
    assert fetch(client, "/text", "gzip, zstd, br").encoding == "br"


def test_higher_q_value_wins_over_server_preference(client: httpx.Client) -> None:
    assert fetch(client, "/text", "br;q=0.5, gzip").encoding == "gzip"


def test_q_zero_refuses_a_coding(client: httpx.Client) -> None:
    raw = fetch(client, "/text?size=4096", "gzip;q=0")
    assert raw.encoding is None
    assert raw.body == text_body(4096)


def test_star_accepts_every_coding_not_named(client: httpx.Client) -> None:
    assert fetch(client, "/text", "*").encoding == "br"
    assert fetch(client, "/text", "br;q=0, *;q=0.3").encoding == "zstd"


def test_star_q_zero_with_nothing_else_means_identity(client: httpx.Client) -> None:
    assert fetch(client, "/text", "*;q=0, identity").encoding is None


def test_identity_q_zero_without_a_usable_coding_still_gets_the_body(
    client: httpx.Client,
) -> None:
    raw = fetch(client, "/text?size=3000", "identity;q=0, compress")
    assert raw.status == 200
    assert raw.encoding is None
    assert raw.body == text_body(3000)


def test_no_accept_encoding_gets_identity_with_vary(client: httpx.Client) -> None:
    raw = fetch(client, "/text?size=4096", None)
    assert raw.encoding is None
    assert raw.headers["content-length"] == "4096"
    assert raw.vary() == ["accept-encoding"]


def test_accept_encoding_parsing_details() -> None:
    server = ["br", "zstd", "gzip"]
    assert choose_encoding("x-gzip", server) == "gzip"
    assert choose_encoding("GZIP;Q=0.8, br;q=0.9", server) == "br"
    assert choose_encoding("gzip;q=2", server) is None  # invalid q counts as refused
    assert choose_encoding("gzip;q=abc", server) is None
    assert choose_encoding("", server) is None
    assert choose_encoding("gzip;q=0.001", ["gzip"]) == "gzip"


# --- headers -----------------------------------------------------------------------------


def test_vary_is_appended_to_an_existing_vary(client: httpx.Client) -> None:
    raw = fetch(client, "/text?vary=Accept-Language", "gzip")
    assert raw.encoding == "gzip"
    assert raw.vary() == ["accept-language", "accept-encoding"]


def test_a_strong_etag_becomes_weak_when_the_body_is_compressed(client: httpx.Client) -> None:
    raw = fetch(client, '/text?etag="v1"', "gzip")
    assert raw.headers["etag"] == 'W/"v1"'


# --- left alone --------------------------------------------------------------------------


def test_bodies_below_min_size_are_untouched(client: httpx.Client) -> None:
    raw = fetch(client, "/text?size=1000", "gzip, br")
    assert raw.encoding is None
    assert raw.headers["content-length"] == "1000"
    assert raw.body == text_body(1000)
    assert "vary" not in raw.headers


def test_event_streams_are_untouched_and_each_event_arrives_at_once(
    client: httpx.Client, upstream: ShapedUpstream
) -> None:
    with client.stream(
        "GET", "/sse?events=3&interval=0.4", headers={"accept-encoding": "gzip, br, zstd"}
    ) as response:
        assert "content-encoding" not in response.headers
        assert "accept-encoding" not in response.headers.get("vary", "").lower()
        pieces = response.iter_raw()
        first = next(pieces)
        # The first event is readable while the upstream still has events to send.
        assert first == b"id: 0\ndata: event 0\n\n"
        assert len(upstream.sse_events) < 3
        rest = b"".join(pieces)
    assert rest == b"id: 1\ndata: event 1\n\nid: 2\ndata: event 2\n\n"


def test_already_encoded_responses_are_untouched(client: httpx.Client) -> None:
    raw = fetch(client, "/encoded", "br, zstd, gzip")
    assert raw.headers.get_list("content-encoding") == ["gzip"]
    assert raw.body == ENCODED_BODY


def test_partial_content_is_untouched(client: httpx.Client) -> None:
    raw = fetch(client, "/partial", "gzip")
    assert raw.status == 206
    assert raw.encoding is None
    assert raw.headers["content-range"] == "bytes 0-2047/10000"
    assert raw.body == text_body(2048)


def test_head_requests_are_untouched(client: httpx.Client) -> None:
    raw = fetch(client, "/text?size=5000", "gzip", method="HEAD")
    assert raw.status == 200
    assert raw.encoding is None
    assert raw.headers["content-length"] == "5000"


def test_no_content_responses_are_untouched(client: httpx.Client) -> None:
    raw = fetch(client, "/status/204", "gzip")
    assert raw.status == 204
    assert raw.encoding is None
    assert raw.body == b""


def test_types_outside_content_types_are_untouched(client: httpx.Client) -> None:
    raw = fetch(client, "/big?size=5000", "gzip")  # application/octet-stream
    assert raw.encoding is None
    assert raw.body == b"x" * 5000


def test_no_transform_responses_are_untouched(client: httpx.Client) -> None:
    raw = fetch(client, "/text?size=5000&cache_control=public,%20no-transform", "gzip")
    assert raw.encoding is None
    assert raw.body == text_body(5000)


# --- streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_compressed_chunks_arrive_before_the_upstream_has_finished(
    client: httpx.Client, upstream: ShapedUpstream, coding: str
) -> None:
    chunks = 4
    with client.stream(
        "GET", f"/stream?chunks={chunks}&interval=0.3", headers={"accept-encoding": coding}
    ) as response:
        assert response.headers["content-encoding"] == coding
        decoder = StreamDecoder(coding)
        pieces = response.iter_raw()
        decoded = b""
        deadline = time.monotonic() + 5
        while not decoded and time.monotonic() < deadline:
            decoded += decoder.feed(next(pieces))
        # "chunk 0" decoded while the upstream has yet to send its last chunk.
        assert decoded == b"chunk 0\n"
        assert len(upstream.stream_events) < chunks
        for piece in pieces:
            decoded += decoder.feed(piece)
    assert decoded == b"".join(f"chunk {i}\n".encode() for i in range(chunks))


# --- configuration -----------------------------------------------------------------------


def test_min_size_and_algorithms_are_configurable(shaped: ShapedUpstreamServer) -> None:
    config = gateway_config(
        {"up": shaped.url},
        [route("all", "/{rest:path}", "up", plugins=["gz"])],
        plugins=[
            {
                "name": "gz",
                "module": "plugins.compression",
                "config": {"algorithms": ["gzip"], "min_size": "8KiB", "level": {"gzip": 9}},
            }
        ],
    )
    with GatewayServer(config) as gateway, gateway.client() as client:
        client.headers.pop("accept-encoding", None)
        assert fetch(client, "/text?size=8000", "gzip").encoding is None
        big = fetch(client, "/text?size=9000", "br, gzip;q=0.1")
    assert big.encoding == "gzip"
    assert decode("gzip", big.body) == text_body(9000)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"min_size": "lots"}, "config.min_size"),
        ({"algorithms": ["deflate"]}, "config.algorithms.0"),
        ({"algorithms": []}, "config.algorithms"),
        ({"level": {"gzip": 12}}, "config.level"),
        ({"algorithms": ["gzip"], "level": 0}, "config.level"),
        ({"content_types": ["json"]}, "config.content_types"),
    ],
)
def test_bad_compression_config_stops_startup_naming_the_plugin_and_key(
    config: dict[str, object], key: str
) -> None:
    from gateway.asgi import create_app

    with pytest.raises(ConfigError) as raised:
        create_app(
            gateway_config(
                {"up": "http://127.0.0.1:9"},
                [route("r", "/r", "up", plugins=["compression"])],
                plugins=[{"name": "compression", "config": config}],
            )
        )
    assert f"plugins[0] (compression): {key}" in str(raised.value)
