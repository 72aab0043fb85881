"""The outage bookkeeping and value decoding shared by the etcd, Redis and DNS backends,
and the construction of those backends from configuration."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import AsyncIterator

import pytest

from gateway.discovery.base import DiscoveredInstance
from gateway.discovery.dns import DnsBackend
from gateway.discovery.etcd import EtcdBackend
from gateway.discovery.factory import create_backends
from gateway.discovery.redis import RedisBackend
from gateway.discovery.remote import (
    UNAVAILABLE,
    Backoff,
    ManifestValues,
    ResilientBackend,
    decode_stored,
    parse_stored_manifest,
)
from settings import load_settings


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter() -> None:
    low = Backoff(0.1, 1.0, rng=lambda: 0.0)
    assert [round(low.next(), 3) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    high = Backoff(0.1, 1.0, rng=lambda: 0.999999)
    assert [round(high.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    high.reset()
    assert high.attempts == 0 and round(high.next(), 3) == 0.1
    spread = {round(Backoff(1.0, 8.0).next(), 6) for _ in range(50)}
    assert len(spread) > 1 and all(0.5 <= delay <= 1.0 for delay in spread)
    with pytest.raises(ValueError):
        Backoff(1.0, 0.5)


class Flaky(ResilientBackend):
    name = "flaky"

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:  # pragma: no cover
        yield []


def test_state_changes_are_logged_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    backend = Flaky(backoff_initial=0.1, backoff_max=1.0)
    assert backend.state == "starting"
    with caplog.at_level(logging.INFO, "octopus.discovery"):
        delays = [backend.failed(ConnectionError("refused"), "list") for _ in range(5)]
        assert backend.state == UNAVAILABLE and backend.last_error == "list: refused"
        assert backend.failures == 5 and backend.outages == 1
        assert all(0.05 <= delay <= 1.0 for delay in delays)
        backend.recovered()
        assert backend.state == "synced" and backend.last_error is None
        assert backend.backoff.attempts == 0 and backend.last_sync is not None
        backend.recovered()  # staying healthy logs nothing
        backend.failed(TimeoutError(), "watch")
        assert backend.last_error == "watch: TimeoutError" and backend.outages == 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "discovery backend unavailable, keeping the last good snapshot",
        "discovery backend recovered",
        "discovery backend unavailable, keeping the last good snapshot",
    ]
    assert backend.describe() == {
        "backend": "flaky",
        "state": UNAVAILABLE,
        "last_sync": backend.last_sync,
        "last_error": "watch: TimeoutError",
    }


def test_stored_values_may_be_gzipped() -> None:
    document = {"service_name": "shop"}
    raw = json.dumps(document).encode()
    assert decode_stored(raw) == raw
    assert decode_stored(gzip.compress(raw)) == raw
    assert parse_stored_manifest(gzip.compress(raw)) == document
    with pytest.raises(ValueError, match="gzip"):
        decode_stored(b"\x1f\x8b not really")
    for bad in (b"[1]", b"{", b"\xff\xfe"):
        with pytest.raises(ValueError):
            parse_stored_manifest(bad)


def test_manifest_values_fall_back_to_the_last_good_document() -> None:
    values = ManifestValues("test")
    good = json.dumps({"v": 1}).encode()
    assert values.decode("a", [b"{broken", good]) == {"v": 1}  # first that decodes
    assert values.decode("a", [b"{still broken"]) == {"v": 1}
    assert values.decode("a", [b"{still broken"]) == {"v": 1}
    assert values.rejected == 1  # the same bad value counts once
    assert values.decode("b", [b"nope"]) is None
    values.retain({"b"})
    assert values.decode("a", [b"{broken"]) is None  # "a" left: no resurrection


def test_backends_are_built_from_configuration() -> None:
    settings = load_settings(
        {
            "farp": {"watch_interval": "250ms"},
            "discovery": {
                "backends": [
                    {
                        "backend": "etcd",
                        "etcd": {
                            "endpoints": ["10.0.0.1:2379", "https://10.0.0.2:2379/"],
                            "prefix": "/reg/",
                            "username": "gw",
                            "password": "pw",
                            "tls": {"ca": "/ca.pem", "cert": "/c.pem", "key": "/k.pem"},
                        },
                    },
                    {"backend": "redis", "redis": {"url": "redis://127.0.0.1:6390/2"}},
                    {
                        "backend": "dns",
                        "dns": {
                            "nameservers": ["127.0.0.1:5353"],
                            "domain": "svc.test.",
                            "services": ["shop", "billing"],
                        },
                    },
                ]
            },
        }
    )
    etcd, redis, dns = create_backends(settings)
    assert isinstance(etcd, EtcdBackend)
    assert etcd.endpoints == ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]  # TLS given
    assert (etcd.prefix, etcd.username, etcd.password) == ("/reg", "gw", "pw")
    assert (etcd.ca, etcd.cert, etcd.key) == ("/ca.pem", "/c.pem", "/k.pem")
    assert etcd.registry_key("/schemas/x") == "/reg/schemas/x"
    assert isinstance(redis, RedisBackend)
    assert (redis.url, redis.interval) == ("redis://127.0.0.1:6390/2", 0.25)
    assert isinstance(dns, DnsBackend)
    assert dns.nameservers == [("127.0.0.1", 5353)]
    assert dns.record_name("shop") == "_shop._tcp.svc.test."
    assert (dns.services, dns.interval, dns.min_interval) == (["shop", "billing"], 0.25, 0.25)
