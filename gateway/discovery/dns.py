"""The ``dns`` backend: instances from SRV records, FARP metadata from TXT records.

For each configured service, ``_{service}._tcp.{domain}`` SRV gives the instances
(``target:port``; the target's address comes from the answer's additional section when
the server put it there, else from an A, then AAAA, query) and TXT records on the same
name carry ``farp.*`` ``key=value`` pairs (FARP.md §5), shared by every instance of the
service. DNS holds no manifest: snapshots carry ``manifest=None`` with the metadata and
``address="host:port"``, and :func:`gateway.discovery.metadata.resolve_manifest` turns
them into manifests.

DNS has no change notification, so the backend polls: again after the smallest TTL of
the answers, but never later than ``interval`` (answers may carry long TTLs while
operators expect the configured watch interval) and never sooner than ``min_interval``
(local servers such as dnsmasq answer with TTL 0). No answer is cached between polls:
the TTL only sets the pace.

An authoritative "no such name" (NXDOMAIN) or "no records" means the service has no
instances right now; a timeout, SERVFAIL or REFUSED is an outage for that service, which
keeps its last good instances while the others keep updating.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any

import dns.asyncresolver
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.discovery.base import DiscoveredInstance
from gateway.discovery.remote import ResilientBackend

log = logging.getLogger("octopus.discovery.dns")

_EMPTY = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)


def parse_nameserver(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, or a bare host (port 53)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53  # a bare name, IPv4 or IPv6 address


def parse_txt(strings: Iterable[bytes]) -> dict[str, str]:
    """``key=value`` pairs from the character-strings of TXT records (RFC 1464 style).

    Each string is one pair; a string with several space-separated pairs, as some
    tools write them, is split when every token is a pair (so a value with spaces, like
    ``farp.capabilities=[rest websocket]``, stays whole).
    """
    pairs: dict[str, str] = {}
    for raw in strings:
        text = raw.decode("utf-8", "replace").strip()
        tokens = text.split()
        parts = tokens if len(tokens) > 1 and all("=" in t for t in tokens) else [text]
        for part in parts:
            key, _, value = part.partition("=")
            if key.strip():
                pairs[key.strip()] = value.strip()
    return pairs


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class DnsBackend(ResilientBackend):
    """Instances of the configured services from SRV + TXT, polled."""

    name = "dns"

    def __init__(
        self,
        services: list[str],
        domain: str = "",
        nameservers: list[str] | None = None,
        *,
        interval: float = 5.0,
        min_interval: float = 1.0,
        timeout: float = 2.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
    ) -> None:
        super().__init__(backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.services = list(services)
        self.domain = domain.strip(".")
        self.nameservers = [parse_nameserver(n) for n in nameservers or []]
        self.interval = interval
        self.min_interval = min(min_interval, interval)
        self.timeout = timeout
        self._resolver: dns.asyncresolver.Resolver | None = None

    def record_name(self, service: str) -> str:
        """``_{service}._tcp.{domain}``; absolute when a domain is configured, relative
        (the system's search list applies) when it is not."""
        label = f"_{service}._tcp"
        return f"{label}.{self.domain}." if self.domain else label

    # --- the stream of snapshots ---------------------------------------------------

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        last: list[DiscoveredInstance] | None = None
        good: dict[str, list[DiscoveredInstance]] = {}
        while True:
            results = await asyncio.gather(
                *(self._query(service) for service in self.services), return_exceptions=True
            )
            failure: BaseException | None = None
            ttls: list[float] = []
            for service, result in zip(self.services, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result  # cancellation: stop; anything else is an outage
                    failure = failure or result
                    continue
                instances, ttl = result
                good[service] = instances
                if ttl is not None:
                    ttls.append(ttl)
            if failure is not None:
                delay = self.failed(failure, "dns query")
            else:
                self.recovered()
                delay = max(self.min_interval, min([self.interval, *ttls]))
            if len(good) == len(self.services):  # the first snapshot waits for every service
                snapshot = [i for service in self.services for i in good[service]]
                if snapshot != last:
                    last = snapshot
                    yield snapshot
            await asyncio.sleep(delay)

    async def _query(self, service: str) -> tuple[list[DiscoveredInstance], float | None]:
        """The instances of one service and the smallest TTL seen (None: no records)."""
        resolver = await self._get_resolver()
        name = self.record_name(service)
        try:
            srv = await resolver.resolve(name, "SRV")
        except _EMPTY:
            return [], None
        ttls = [float(srv.rrset.ttl)] if srv.rrset is not None else []
        try:
            txt = await resolver.resolve(name, "TXT")
        except _EMPTY:
            metadata: dict[str, str] = {}
        else:
            metadata = parse_txt(s for rdata in txt for s in rdata.strings)
            if txt.rrset is not None:
                ttls.append(float(txt.rrset.ttl))
        additional = _additional_addresses(srv.response.additional)
        instances = []
        for record in sorted(srv, key=lambda r: (r.priority, -r.weight, str(r.target), r.port)):
            target = record.target.to_text(omit_final_dot=True)
            if target in ("", "."):  # RFC 2782: "service decidedly not available"
                continue
            address = await self._address(resolver, target, additional)
            if address is None:
                log.debug("SRV target without an address", extra={"target": target})
                continue
            instances.append(
                DiscoveredInstance(
                    key=f"dns:{name}/{target}:{record.port}",
                    manifest=None,
                    address=_host_port(address, record.port),
                    service_name=service,
                    instance_id=f"{target}:{record.port}",
                    metadata={
                        **metadata,
                        "dns.srv.target": target,
                        "dns.srv.priority": str(record.priority),
                        "dns.srv.weight": str(record.weight),
                    },
                )
            )
        return instances, min(ttls) if ttls else None

    async def _address(
        self, resolver: dns.asyncresolver.Resolver, target: str, additional: dict[str, list[str]]
    ) -> str | None:
        """The target's address: an IP literal as is, else from the additional section,
        else an A then an AAAA query (IPv4 first: it is what most upstreams listen on)."""
        try:
            return str(ipaddress.ip_address(target))
        except ValueError:
            pass
        known = additional.get(target.lower())
        if known:
            return sorted(known, key=lambda a: (":" in a, a))[0]
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(target + ".", rdtype)
            except _EMPTY:
                continue
            addresses = sorted(r.address for r in answer)
            if addresses:
                return addresses[0]
        return None

    async def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is not None:
            return self._resolver
        if self.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            loop = asyncio.get_running_loop()
            for host, port in self.nameservers:
                try:
                    ip = str(ipaddress.ip_address(host))
                except ValueError:  # a name: resolved once, by the system resolver
                    info = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                    ip = str(info[0][4][0])
                servers.append(dns.nameserver.Do53Nameserver(ip, port))
            resolver.nameservers = servers
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.cache = None  # every poll asks the server; the TTL only sets the pace
        resolver.lifetime = self.timeout
        resolver.timeout = self.timeout
        self._resolver = resolver
        return resolver


def _additional_addresses(section: list[Any]) -> dict[str, list[str]]:
    """A/AAAA records of a response's additional section, by owner name."""
    found: dict[str, list[str]] = {}
    for rrset in section:
        if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            continue
        owner = rrset.name.to_text(omit_final_dot=True).lower()
        found.setdefault(owner, []).extend(r.address for r in rrset)
    return found
