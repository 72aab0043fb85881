"""Header rules of a forwarding proxy (RFC 9110 §7.6, RFC 7239).

- Hop-by-hop headers, and every header the ``Connection`` header names, stop here.
- The client's ``X-Forwarded-*``/``Forwarded`` values are kept (and appended to) only
  when the peer is a trusted proxy; otherwise they are replaced, so a client cannot
  spoof its address to the upstream.
- Everything else passes in order, repeats included.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Request headers the gateway rewrites itself, on top of the hop-by-hop ones.
_REQUEST_OWNED: frozenset[bytes] = HOP_BY_HOP | {
    b"host",
    b"expect",  # the gateway answers 100-continue itself (the ASGI server does)
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"forwarded",
    b"x-request-id",
}
#: With tracing on, the client's trace context is replaced by the gateway's span.
_REQUEST_OWNED_TRACED: frozenset[bytes] = _REQUEST_OWNED | {b"traceparent", b"tracestate"}

VIA_VALUE = b"1.1 octopus"
#: ``Connection`` values that name no other header (the common case: skip the parse).
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
_TOKEN = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


class TrustedProxies:
    """The set of peers whose forwarding headers are believed; lookups are cached."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, ip: str) -> bool:
        if not self._networks:
            return False
        known = self._cache.get(ip)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            verdict = False
        else:
            verdict = any(address in network for network in self._networks)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[ip] = verdict
        return verdict


def connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (they are hop-by-hop for this hop only)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"close")
    tokens.discard(b"keep-alive")
    return frozenset(tokens)


def _forwarded_node(ip: str) -> str:
    return f'"[{ip}]"' if ":" in ip else ip


def build_request_head(
    method: bytes,
    target: bytes,
    host_header: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client_ip: str,
    scheme: str,
    request_id: bytes,
    trusted: bool,
    body_framing: bytes | None,
    trace_headers: Sequence[tuple[bytes, bytes]] | None = None,
    te_trailers: bool = False,
) -> bytes:
    """The bytes of the upstream request line and headers.

    ``body_framing`` is the ``content-length``/``transfer-encoding`` header line to send
    (without CRLF) or None for a request without a body. ``trace_headers`` (tracing on
    only) are the gateway span's ``traceparent``/``tracestate``; they replace the
    client's.
    """
    owned = _REQUEST_OWNED if trace_headers is None else _REQUEST_OWNED_TRACED
    parts: list[bytes] = [
        method,
        b" ",
        target,
        b" HTTP/1.1\r\nhost: ",
        host_header,
        b"\r\n",
    ]
    append = parts.append
    prior_for: bytes | None = None
    prior_forwarded: bytes | None = None
    client_proto: bytes | None = None
    client_host: bytes | None = None
    original_host = b""
    named: frozenset[bytes] | None = None
    for name, value in headers:
        if name in owned or name == b"content-length":
            if name == b"host":
                original_host = value
            elif name == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                named = connection_tokens(headers)
            elif trusted:
                if name == b"x-forwarded-for":
                    prior_for = value if prior_for is None else prior_for + b", " + value
                elif name == b"forwarded":
                    prior_forwarded = (
                        value if prior_forwarded is None else prior_forwarded + b", " + value
                    )
                elif name == b"x-forwarded-proto":
                    client_proto = value
                elif name == b"x-forwarded-host":
                    client_host = value
            continue
        append(name)
        append(b": ")
        append(value)
        append(b"\r\n")
    if named:
        parts = _drop_named(parts, named)
        append = parts.append
    ip = client_ip.encode()
    proto = client_proto or scheme.encode()
    fwd_host = client_host or original_host
    append(b"x-forwarded-for: ")
    append(prior_for + b", " + ip if prior_for else ip)
    append(b"\r\nx-forwarded-proto: ")
    append(proto)
    if fwd_host:
        append(b"\r\nx-forwarded-host: ")
        append(fwd_host)
    node = f"for={_forwarded_node(client_ip)};proto={scheme}".encode()
    if original_host:
        node += b";host=" + _quote_if_needed(original_host)
    append(b"\r\nforwarded: ")
    append(prior_forwarded + b", " + node if prior_forwarded else node)
    append(b"\r\nx-request-id: ")
    append(request_id)
    append(b"\r\nvia: ")
    append(VIA_VALUE)
    append(b"\r\n")
    if trace_headers:
        for name, value in trace_headers:
            append(name)
            append(b": ")
            append(value)
            append(b"\r\n")
    if te_trailers:  # the gateway can relay trailers, so it asks for them
        append(b"te: trailers\r\n")
    if body_framing is not None:
        append(body_framing)
        append(b"\r\n")
    append(b"\r\n")
    return b"".join(parts)


def _quote_if_needed(value: bytes) -> bytes:
    """RFC 7239 values with ':' or other non-token characters must be quoted."""
    if _TOKEN.fullmatch(value):
        return value
    return b'"' + value.replace(b'"', b"").replace(b"\\", b"") + b'"'


def _drop_named(parts: list[bytes], named: frozenset[bytes]) -> list[bytes]:
    """Remove header lines whose names the client's ``Connection`` header listed."""
    kept = parts[:6]
    index = 6
    while index < len(parts):
        name = parts[index]
        if name.lower() not in named:
            kept.extend(parts[index : index + 4])
        index += 4
    return kept


def filter_response_headers(
    headers: Sequence[tuple[bytes, bytes]], request_id: bytes, *, keep_date: bool = True
) -> list[tuple[bytes, bytes]]:
    """Upstream response headers minus hop-by-hop ones, plus ``Via`` and ``X-Request-ID``.

    The gateway's request id is the one the client gets (an upstream's own is dropped),
    so the id a client quotes is the one in the gateway's logs. ``keep_date=False`` drops
    the upstream's ``Date`` for servers that write their own (uvicorn, hypercorn).
    """
    out: list[tuple[bytes, bytes]] = []
    named: frozenset[bytes] | None = None
    for name, value in headers:
        if name in HOP_BY_HOP:
            if name == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                named = connection_tokens(headers)
            continue
        if name == b"x-request-id" or (name == b"date" and not keep_date):
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n not in named]
    out.append((b"via", VIA_VALUE))
    out.append((b"x-request-id", request_id))
    return out
