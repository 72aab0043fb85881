"""Fixtures for the discovery tests: real etcd, redis-server and dnsmasq processes, a real
upstream, and gateways started per test.

etcd and Redis cost a second or so to start, so one of each serves a whole module;
tests that kill them get them back running (on the same port) before the next test, and
every test works on its own key prefix (etcd) or a flushed database (Redis). dnsmasq
starts in milliseconds and each test configures its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.discovery.processes import DnsmasqServer, EtcdServer, RedisServer, require_binary
from tests.discovery.support import Gateway
from tests.support.upstream import UpstreamServer


@pytest.fixture(scope="module")
def etcd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    binary = require_binary("etcd", "etcd-server")
    server = EtcdServer(binary, tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd(etcd_process: EtcdServer) -> EtcdServer:
    """The module's etcd, running (a previous test may have killed it)."""
    if not etcd_process.running:
        etcd_process.start()
    return etcd_process


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing one etcd never see each other."""
    return f"/farp-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = require_binary("redis-server", "redis-server")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_process: RedisServer) -> RedisServer:
    """The module's Redis, running and empty (the layout's key names are fixed)."""
    if not redis_process.running:
        redis_process.start()
    with redis_process.client() as client:
        client.flushall()
        client.config_set("notify-keyspace-events", "")
    return redis_process


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[DnsmasqServer]:
    """A dnsmasq of this test's own, not started: ``configure()`` then ``start()``."""
    binary = require_binary("dnsmasq", "dnsmasq")
    server = DnsmasqServer(binary, tmp_path / "dnsmasq")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("discovered") as server:
        yield server


@pytest.fixture
def start_gateway() -> Iterator[Callable[[dict[str, Any]], Gateway]]:
    """``start_gateway(discovery_config)``: a ready gateway, stopped when the test ends."""
    started: list[Gateway] = []

    def start(discovery: dict[str, Any]) -> Gateway:
        gateway = Gateway(discovery)
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()
