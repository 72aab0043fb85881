"""gRPC metadata at the gateway: which keys cross it, and in what shape.

Metadata is HTTP/2 headers, so the forwarding rules of an HTTP proxy mostly apply, with
gRPC's own additions:

* pseudo headers (``:authority``...), hop-by-hop headers, ``content-type``, ``te`` and
  ``user-agent`` belong to each connection and are written by the gRPC library on each
  hop;
* ``grpc-*`` keys are reserved for the protocol (``grpc-timeout``, ``grpc-encoding``,
  ``grpc-status``...): the library sets them from the call itself (the deadline, the
  status), and setting them by hand is refused or ignored. A deadline travels as the
  upstream call's timeout, a status as the status;
* ``x-forwarded-for``/``forwarded`` are believed only from trusted proxies (as for HTTP)
  and ``x-request-id`` is the gateway's (the client's when it sent a sane one).

Plugins see metadata as HTTP headers (``(bytes, bytes)`` pairs, what
``RequestContext.request_headers`` holds); ``-bin`` values stay raw bytes there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.proxy.headers import HOP_BY_HOP

#: One metadata entry as grpcio takes it: ``-bin`` keys carry bytes, others str.
Metadatum = tuple[str, str | bytes]

_CONNECTION_OWNED: frozenset[str] = frozenset(
    name.decode() for name in HOP_BY_HOP | {b"host", b"content-type", b"content-length", b"te"}
) | {"user-agent"}
#: Request keys about the client's connection: believed only from trusted proxies.
_FORWARDING = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
    }
)
#: gRPC metadata keys: lower-case ``0-9 a-z - _ .`` (the spec's grammar).
_VALID_KEY = re.compile(r"^[0-9a-z_.\-]+$")
#: Printable ASCII, what a non-binary value may hold.
_VALID_VALUE = re.compile(r"^[\x20-\x7e]*$")


def reserved(key: str) -> bool:
    """Keys that never cross the gateway as metadata (see the module doc)."""
    return key.startswith((":", "grpc-")) or key in _CONNECTION_OWNED


def is_binary(key: str) -> bool:
    return key.endswith("-bin")


def valid_entry(key: str, value: str | bytes) -> bool:
    """Whether grpcio accepts this entry (an invalid one would fail the whole call)."""
    if not _VALID_KEY.match(key):
        return False
    if is_binary(key):
        return True
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return bool(_VALID_VALUE.match(text))


def to_headers(metadata: Iterable[Any]) -> list[tuple[bytes, bytes]]:
    """grpcio metadata (pairs or ``_Metadatum``) → HTTP-style header pairs for plugins."""
    headers = []
    for key, value in metadata:
        raw = value if isinstance(value, bytes) else str(value).encode("latin-1")
        headers.append((str(key).lower().encode("latin-1"), raw))
    return headers


def to_metadata(headers: Iterable[tuple[bytes, bytes]]) -> list[Metadatum]:
    """HTTP-style header pairs → grpcio metadata, reserved and invalid entries dropped."""
    out: list[Metadatum] = []
    for name, value in headers:
        key = name.decode("latin-1").lower()
        if reserved(key):
            continue
        entry: str | bytes = value if is_binary(key) else value.decode("latin-1")
        if valid_entry(key, entry):
            out.append((key, entry))
    return out


def request_metadata(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client_ip: str,
    request_id: str,
    trusted: bool,
) -> list[Metadatum]:
    """What goes upstream: the client's metadata minus reserved keys, plus forwarding.

    ``x-forwarded-for`` gets the client's address appended to what a trusted proxy
    said, or replaces what an untrusted client claimed (whose other ``x-forwarded-*``
    and ``forwarded`` values are dropped); ``x-request-id`` is ``request_id``.
    """
    forwarded_for = [
        value.decode("latin-1") for name, value in headers if name == b"x-forwarded-for"
    ]
    out = [
        (key, value)
        for key, value in to_metadata(headers)
        if key != "x-request-id"
        and key != "x-forwarded-for"
        and (trusted or key not in _FORWARDING)
    ]
    chain = ", ".join([*forwarded_for, client_ip] if trusted else [client_ip])
    if client_ip:
        out.append(("x-forwarded-for", chain))
    out.append(("x-request-id", request_id))
    return out


def response_metadata(metadata: Iterable[Any] | None) -> list[Metadatum]:
    """Upstream initial or trailing metadata as the client gets it (reserved keys dropped)."""
    if not metadata:
        return []
    out: list[Metadatum] = []
    for key, value in metadata:
        key = str(key).lower()
        if not reserved(key) and valid_entry(key, value):
            out.append((key, value))
    return out


def peer_address(peer: str | None) -> str:
    """The client IP from grpcio's ``context.peer()`` (``ipv4:1.2.3.4:5``,
    ``ipv6:[::1]:5``, ``unix:/path``)."""
    if not peer:
        return ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0]
        return host[1:-1] if host.startswith("[") else host
    return ""


def peer_port(peer: str | None) -> int:
    if not peer or not peer.startswith(("ipv4:", "ipv6:")):
        return 0
    tail = peer.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0
