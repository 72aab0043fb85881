"""The ``cache`` plugin against real gateways, a real upstream and a real ``redis-server``:
what is stored and for how long, keys (method, query order, Vary), stampedes in one
process and across two, oversize bodies, purging, and a Redis outage."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from gateway.types import Receive, Scope, Send
from plugins.cache import cache_control
from settings import ConfigError
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.redis_server import RedisServer
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamApp, _client_left_within
from tests.support.waiting import eventually

MAX_ENTRY = 2048


class CacheUpstream(UpstreamApp):
    """``/c/...`` answers are shaped by the query: ``cc`` (Cache-Control), ``vary``,
    ``expires``, ``age``, ``cookie=1``, ``status``, ``size`` (body bytes), ``delay``
    (seconds before answering), ``chunked=1`` (no Content-Length). Every body starts with
    ``#N``, N counting the upstream's answers, so a test sees whether it was served
    again. Other paths are :class:`UpstreamApp`'s."""

    def __init__(self) -> None:
        super().__init__("cached")
        self.served = 0
        #: When set, the next ``/c/`` answer sends its head and a little body, then stalls.
        self.stall_next = False
        #: When set, the next ``/c/`` answer breaks off after a little of its body.
        self.abort_next = False
        self._count = threading.Lock()

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if not path.startswith("/c/"):
            await super()._handle(scope, receive, send)
            return
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        self.requests.append({"method": scope["method"], "path": path, "query": query})
        if "delay" in query:
            await asyncio.sleep(float(query["delay"]))
        if self.abort_next:
            self.abort_next = False
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"1000")],
                }
            )
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise ConnectionAbortedError("upstream dies mid-body (on purpose)")
        if self.stall_next:
            self.stall_next = False
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            await _client_left_within(receive, 10.0)
            return
        with self._count:
            self.served += 1
            number = self.served
        body = f"#{number} {path}".encode()
        body = body.ljust(int(query.get("size", len(body))), b".")
        headers = [(b"content-type", b"text/plain")]
        for key, name in (
            ("cc", b"cache-control"),
            ("vary", b"vary"),
            ("expires", b"expires"),
            ("age", b"age"),
        ):
            if key in query:
                headers.append((name, query[key].encode()))
        if query.get("cookie"):
            headers.append((b"set-cookie", b"session=1; Path=/"))
        status = int(query.get("status", 200))
        if status in (204, 304):
            body = b""
        chunked = bool(query.get("chunked"))
        if not chunked:
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if chunked:
            half = len(body) // 2
            await send({"type": "http.response.body", "body": body[:half], "more_body": True})
            await send({"type": "http.response.body", "body": body[half:], "more_body": False})
        else:
            await send({"type": "http.response.body", "body": body, "more_body": False})

    def hits(self, path: str) -> int:
        return sum(1 for r in self.requests if r["path"] == path)


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[ThreadedServer]:
    with ThreadedServer(CacheUpstream()) as server:
        yield server


@pytest.fixture
def upstream(upstream_server: ThreadedServer) -> CacheUpstream:
    app: CacheUpstream = upstream_server.config.app
    app.reset()
    return app


def cache_gateway_config(upstream_url: str, redis_url: str, **cache: Any) -> dict[str, Any]:
    # A generous Redis timeout: test machines run many event loops at once, and a spurious
    # timeout would open the plugin's circuit (the outage tests kill Redis instead).
    options = {
        "redis_url": redis_url,
        "default_ttl": "60s",
        "max_entry_size": MAX_ENTRY,
        "redis_timeout": "1s",
    }
    options.update(cache)
    return gateway_config(
        {"up": upstream_url},
        [route("cached", "/c/{rest:path}", "up", plugins=["cache"])],
        plugins=[{"name": "cache", "config": options}],
    )


@pytest.fixture(scope="module")
def module_gateway(
    upstream_server: ThreadedServer, redis_process: RedisServer
) -> Iterator[GatewayServer]:
    with GatewayServer(cache_gateway_config(upstream_server.url, redis_process.url)) as server:
        yield server


@pytest.fixture
def gateway(module_gateway: GatewayServer, redis_server: RedisServer) -> GatewayServer:
    """The module's gateway over an empty Redis."""
    return module_gateway


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client


@pytest.fixture
def make_gateway(upstream_server: ThreadedServer) -> Iterator[Callable[..., GatewayServer]]:
    started: list[GatewayServer] = []

    def make(redis_url: str, **cache: Any) -> GatewayServer:
        server = GatewayServer(cache_gateway_config(upstream_server.url, redis_url, **cache))
        started.append(server.start())
        return server

    yield make
    for server in started:
        server.stop()


def settled(redis: RedisServer, entries: int) -> None:
    """Wait until ``entries`` entries are stored and no fetch lock is left: a miss is
    stored (and its lock released) just after its response went to the client."""

    def done() -> bool:
        keys = redis.keys("octopus:cache:*")
        locks = [k for k in keys if k.startswith(b"octopus:cache:lock:")]
        return not locks and len(keys) == entries

    eventually(done, timeout=5, message=f"expected {entries} stored entries and no locks")


def twice(client: httpx.Client, url: str, **options: Any) -> tuple[httpx.Response, httpx.Response]:
    return client.get(url, **options), client.get(url, **options)


# --- hits and misses ---------------------------------------------------------------------


def test_second_get_is_a_hit_served_without_the_upstream(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    first, second = twice(client, "/c/plain")
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert second.content == first.content
    assert int(second.headers["age"]) >= 0
    assert second.headers["content-type"] == "text/plain"
    assert second.headers["content-length"] == str(len(first.content))
    assert upstream.hits("/c/plain") == 1


def test_hit_age_grows_with_the_time_the_entry_was_stored(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    client.get("/c/aging?age=7")  # the upstream says its answer is already 7 s old
    hit = client.get("/c/aging?age=7")
    assert hit.headers["x-cache"] == "HIT"
    assert int(hit.headers["age"]) >= 7


def test_head_is_answered_from_the_get_entry(client: httpx.Client, upstream: CacheUpstream) -> None:
    get = client.get("/c/head")
    head = client.head("/c/head")
    assert head.status_code == 200
    assert head.headers["x-cache"] == "HIT"
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert upstream.hits("/c/head") == 1


def test_head_miss_passes_through_and_stores_nothing(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    assert client.head("/c/head-first").headers["x-cache"] == "MISS"
    assert client.get("/c/head-first").headers["x-cache"] == "MISS"
    assert [r["method"] for r in upstream.requests] == ["HEAD", "GET"]


def test_query_parameter_order_does_not_split_entries(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    client.get("/c/query?b=2&a=1&a=0")
    assert client.get("/c/query?a=1&a=0&b=2").headers["x-cache"] == "HIT"
    assert client.get("/c/query?a=0&a=1&b=2").headers["x-cache"] == "MISS"  # values keep order
    assert client.get("/c/query?a=1").headers["x-cache"] == "MISS"


def test_different_hosts_have_different_entries(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    client.get("/c/host", headers={"host": "a.example"})
    assert client.get("/c/host", headers={"host": "a.example"}).headers["x-cache"] == "HIT"
    assert client.get("/c/host", headers={"host": "b.example"}).headers["x-cache"] == "MISS"


# --- what is stored --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "cc=no-store",
        "cc=private",
        "cc=no-cache",
        "cc=max-age%3D0",
        "cookie=1",
        "status=500",
        "status=302",
        "vary=*",
        "expires=0",
    ],
)
def test_responses_that_must_not_be_shared_are_not_stored(
    client: httpx.Client, upstream: CacheUpstream, query: str
) -> None:
    url = f"/c/uncacheable?{query}"
    second = twice(client, url)[1]
    assert second.headers["x-cache"] == "MISS"
    assert upstream.hits("/c/uncacheable") == 2
    if "cookie" in query:
        assert "set-cookie" in second.headers


@pytest.mark.parametrize("status", [404, 410, 301, 204])
def test_cacheable_non_200_statuses_are_stored(
    client: httpx.Client, upstream: CacheUpstream, status: int
) -> None:
    second = twice(client, f"/c/status?status={status}")[1]
    assert second.status_code == status
    assert second.headers["x-cache"] == "HIT"
    assert upstream.hits("/c/status") == 1


def test_ttl_is_s_maxage_then_max_age_then_default(
    client: httpx.Client, redis_server: RedisServer
) -> None:
    client.get("/c/ttl-a?cc=max-age%3D100,s-maxage%3D30")
    client.get("/c/ttl-b?cc=max-age%3D100")
    client.get("/c/ttl-c")
    client.get("/c/ttl-d?cc=max-age%3D100&age=40")
    settled(redis_server, entries=4)
    with redis_server.client() as redis:
        ttls = {}
        for key in redis.scan_iter(match="octopus:cache:*"):
            body = redis.get(key) or b""
            name = next(n for n in ("ttl-a", "ttl-b", "ttl-c", "ttl-d") if n.encode() in body)
            ttls[name] = redis.pttl(key) / 1000
    assert 25 < ttls["ttl-a"] <= 30
    assert 95 < ttls["ttl-b"] <= 100
    assert 55 < ttls["ttl-c"] <= 60  # default_ttl
    assert 55 < ttls["ttl-d"] <= 60  # max-age minus the upstream's Age


def test_expires_is_used_without_max_age_and_ignored_with_it(
    client: httpx.Client, upstream: CacheUpstream, redis_server: RedisServer
) -> None:
    past = "Thu, 01 Jan 2015 00:00:00 GMT"
    assert twice(client, f"/c/expired?expires={past}")[1].headers["x-cache"] == "MISS"
    url = f"/c/overridden?expires={past}&cc=max-age%3D60"
    assert twice(client, url)[1].headers["x-cache"] == "HIT"


def test_entries_expire_after_max_age(client: httpx.Client, upstream: CacheUpstream) -> None:
    url = "/c/short?cc=max-age%3D1"
    client.get(url)
    assert client.get(url).headers["x-cache"] == "HIT"
    eventually(lambda: client.get(url).headers["x-cache"] == "MISS", timeout=3, interval=0.05)
    assert upstream.hits("/c/short") == 2


def test_request_no_cache_goes_upstream_and_refreshes_the_entry(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    first = client.get("/c/refresh")
    fresh = client.get("/c/refresh", headers={"cache-control": "no-cache"})
    assert fresh.headers["x-cache"] == "MISS"
    assert fresh.content != first.content
    assert client.get("/c/refresh").content == fresh.content
    assert client.get("/c/refresh", headers={"pragma": "no-cache"}).headers["x-cache"] == "MISS"


def test_request_no_store_bypasses_the_cache_entirely(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    client.get("/c/private-call", headers={"cache-control": "no-store"})
    assert client.get("/c/private-call").headers["x-cache"] == "MISS"
    assert upstream.hits("/c/private-call") == 2


def test_request_max_age_refuses_older_entries(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    client.get("/c/old?age=30")
    assert (
        client.get("/c/old?age=30", headers={"cache-control": "max-age=60"}).headers["x-cache"]
        == "HIT"
    )
    too_old = client.get("/c/old?age=30", headers={"cache-control": "max-age=10"})
    assert too_old.headers["x-cache"] == "MISS"


def test_only_if_cached_miss_answers_504(client: httpx.Client) -> None:
    response = client.get("/c/absent", headers={"cache-control": "only-if-cached"})
    assert response.status_code == 504
    assert response.json()["error"] == "not_cached"


def test_authorized_requests_store_only_public_responses(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    auth = {"authorization": "Bearer secret"}
    assert twice(client, "/c/mine", headers=auth)[1].headers["x-cache"] == "MISS"
    assert twice(client, "/c/ours?cc=public", headers=auth)[1].headers["x-cache"] == "HIT"


def test_a_successful_unsafe_request_invalidates_the_entry(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    client.get("/c/doc")
    assert client.get("/c/doc").headers["x-cache"] == "HIT"
    client.post("/c/doc", content=b"update")
    assert client.get("/c/doc").headers["x-cache"] == "MISS"


# --- Vary ------------------------------------------------------------------------------------


def test_vary_keeps_one_entry_per_value_of_the_named_request_headers(
    client: httpx.Client, upstream: CacheUpstream
) -> None:
    url = "/c/lang?vary=Accept-Language"
    english = client.get(url, headers={"accept-language": "en"})
    german = client.get(url, headers={"accept-language": "de"})
    assert german.headers["x-cache"] == "MISS"
    again_en = client.get(url, headers={"accept-language": "en"})
    again_de = client.get(url, headers={"accept-language": "de"})
    assert (again_en.headers["x-cache"], again_de.headers["x-cache"]) == ("HIT", "HIT")
    assert again_en.content == english.content and again_de.content == german.content
    assert client.get(url).headers["x-cache"] == "MISS"  # header absent: a variant of its own
    assert upstream.hits("/c/lang") == 3


# --- size -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_over_max_entry_size_pass_through_uncached(
    client: httpx.Client, upstream: CacheUpstream, chunked: bool
) -> None:
    url = f"/c/large?size={MAX_ENTRY + 1}" + ("&chunked=1" if chunked else "")
    first, second = twice(client, url)
    assert len(first.content) == len(second.content) == MAX_ENTRY + 1
    assert second.headers["x-cache"] == "MISS"
    assert upstream.hits("/c/large") == 2
    small = f"/c/small?size={MAX_ENTRY}" + ("&chunked=1" if chunked else "")
    assert twice(client, small)[1].headers["x-cache"] == "HIT"


# --- stampedes ------------------------------------------------------------------------------


async def _concurrent_gets(urls: list[str], count: int) -> list[httpx.Response]:
    # One Host for all: the host is part of the key, and gateways behind one name share it.
    async with httpx.AsyncClient(timeout=10, headers={"host": "api.example"}) as client:
        return list(await asyncio.gather(*(client.get(urls[i % len(urls)]) for i in range(count))))


def test_concurrent_misses_for_one_key_reach_the_upstream_once(
    gateway: GatewayServer, upstream: CacheUpstream
) -> None:
    responses = asyncio.run(_concurrent_gets([f"{gateway.url}/c/stampede?delay=0.3"], 20))
    assert [r.status_code for r in responses] == [200] * 20
    assert upstream.hits("/c/stampede") == 1
    assert len({r.content for r in responses}) == 1
    assert sorted(r.headers["x-cache"] for r in responses).count("MISS") == 1


def test_concurrent_misses_across_two_gateways_reach_the_upstream_once(
    gateway: GatewayServer,
    make_gateway: Callable[..., GatewayServer],
    redis_server: RedisServer,
    upstream: CacheUpstream,
) -> None:
    other = make_gateway(redis_server.url)
    urls = [f"{gateway.url}/c/herd?delay=0.3", f"{other.url}/c/herd?delay=0.3"]
    responses = asyncio.run(_concurrent_gets(urls, 20))
    assert [r.status_code for r in responses] == [200] * 20
    assert upstream.hits("/c/herd") == 1
    assert len({r.content for r in responses}) == 1


def test_waiters_fetch_themselves_when_the_leaders_answer_is_not_cacheable(
    gateway: GatewayServer, upstream: CacheUpstream
) -> None:
    url = f"{gateway.url}/c/personal?delay=0.2&cc=private"
    responses = asyncio.run(_concurrent_gets([url], 5))
    assert [r.status_code for r in responses] == [200] * 5
    assert len({r.content for r in responses}) == 5  # nobody got somebody else's answer


def test_a_waiter_is_not_stuck_behind_a_fetch_that_never_completes(
    make_gateway: Callable[..., GatewayServer], redis_server: RedisServer, upstream: CacheUpstream
) -> None:
    gateway = make_gateway(redis_server.url, lock_timeout="500ms")
    url = f"{gateway.url}/c/abandoned"
    upstream.stall_next = True  # the leader's response never ends; its client gives up

    async def scenario() -> tuple[httpx.Response, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with httpx.AsyncClient(timeout=0.2) as impatient:
            with pytest.raises(httpx.TimeoutException):
                async with impatient.stream("GET", url) as stalled:
                    await stalled.aread()
        async with httpx.AsyncClient(timeout=10) as patient:
            response = await patient.get(url)
        return response, loop.time() - started

    response, elapsed = asyncio.run(scenario())
    assert response.status_code == 200
    assert response.headers["x-cache"] == "MISS"  # gave up waiting, fetched by itself
    assert 0.45 <= elapsed < 2.0  # waited for lock_timeout (from the leader's start), no more
    assert upstream.hits("/c/abandoned") == 2


def test_waiters_go_upstream_at_once_when_the_leaders_fetch_fails(
    gateway: GatewayServer, upstream: CacheUpstream
) -> None:
    url = f"{gateway.url}/c/broken?delay=0.3"
    upstream.abort_next = True  # lock_timeout is 5 s: waiting that long would fail the test

    async def scenario() -> tuple[httpx.Response, float]:
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(timeout=10) as client:
            leader = asyncio.ensure_future(client.get(url))
            await asyncio.sleep(0.1)  # the waiter arrives while the leader's fetch is running
            started = loop.time()
            waiter = await client.get(url)
            elapsed = loop.time() - started
            with pytest.raises(httpx.HTTPError):
                await leader
        return waiter, elapsed

    waiter, elapsed = asyncio.run(scenario())
    assert waiter.status_code == 200
    assert elapsed < 2.0
    assert upstream.hits("/c/broken") == 2


# --- purge ----------------------------------------------------------------------------------


def test_purge_by_path_drops_only_that_paths_entries(
    client: httpx.Client, upstream: CacheUpstream, redis_server: RedisServer
) -> None:
    for url in ("/c/p1", "/c/p1?x=1", "/c/p2"):
        client.get(url)
    settled(redis_server, entries=3)
    purged = client.delete("/_/cache", params={"path": "/c/p1"})
    assert purged.status_code == 200
    assert purged.json() == {"purged": 2, "path": "/c/p1"}
    assert client.get("/c/p1").headers["x-cache"] == "MISS"
    assert client.get("/c/p1?x=1").headers["x-cache"] == "MISS"
    assert client.get("/c/p2").headers["x-cache"] == "HIT"


def test_purge_all_drops_every_entry_of_the_prefix(
    client: httpx.Client, redis_server: RedisServer
) -> None:
    with redis_server.client() as redis:
        redis.set("someone-else:key", b"kept")
    for url in ("/c/a", "/c/b"):
        client.get(url)
    settled(redis_server, entries=2)
    assert client.delete("/_/cache").json()["purged"] == 2
    assert client.get("/c/a").headers["x-cache"] == "MISS"
    assert redis_server.keys("someone-else:*") == [b"someone-else:key"]


def test_purge_without_a_cache_plugin_is_404() -> None:
    server = GatewayServer(
        gateway_config({"up": "http://127.0.0.1:9"}, [route("r", "/r/{rest:path}", "up")])
    )
    with server, server.client() as client:
        response = client.delete("/_/cache")
    assert response.status_code == 404


# --- Redis outages -----------------------------------------------------------------------------


def test_redis_down_passes_requests_through_and_caching_resumes_when_it_is_back(
    make_gateway: Callable[..., GatewayServer], upstream: CacheUpstream
) -> None:
    with RedisServer() as server:
        gateway = make_gateway(server.url)
        plugin: Any = gateway.gateway.plugins.by_name["cache"]
        with gateway.client() as client:
            client.get("/c/outage")
            assert client.get("/c/outage").headers["x-cache"] == "HIT"
            server.kill()
            during = [client.get("/c/outage") for _ in range(5)]
            assert [r.status_code for r in during] == [200] * 5
            assert all(r.headers["x-cache"] == "MISS" for r in during)
            assert client.delete("/_/cache").status_code == 503
            server.start()
            eventually(
                lambda: client.get("/c/outage").headers["x-cache"] == "HIT",
                timeout=5,
                interval=0.05,
            )
    assert plugin.stats["redis_outages"] == 1


def test_invalid_cache_config_stops_start_up_naming_the_key(
    upstream_server: ThreadedServer,
) -> None:
    for options, key in (
        ({"default_ttl": "forever"}, "config.default_ttl"),
        ({"max_entry_size": "huge"}, "config.max_entry_size"),
        ({"methods": ["POST"]}, "config.methods"),
        ({"ttl": "1s"}, "config.ttl"),
    ):
        with pytest.raises(ConfigError, match=key):
            GatewayServer(cache_gateway_config(upstream_server.url, "redis://x", **options))


def test_cache_control_parsing_handles_quotes_case_and_repeats() -> None:
    parsed = cache_control(['Public, Max-Age=60, no-cache="set-cookie, x-a"', "s-maxage=5"])
    assert parsed == {
        "public": None,
        "max-age": "60",
        "no-cache": "set-cookie, x-a",
        "s-maxage": "5",
    }
