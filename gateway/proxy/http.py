"""Forwarding one HTTP request to its upstream and streaming the answer back.

The request body goes upstream chunk by chunk as the client sends it; the response
goes to the client chunk by chunk as the upstream sends it. Nothing buffers a whole
body. Retries happen only while nothing irreversible has happened: the connection
could not be made, or a reused keep-alive connection died before answering a request
whose body was not consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from time import monotonic
from typing import TYPE_CHECKING, Any

from gateway.errors import send_error
from gateway.proxy.headers import TrustedProxies, build_request_head, filter_response_headers
from gateway.routing.table import Route
from gateway.types import Receive, Scope, Send
from gateway.upstream.errors import (
    ConnectFailed,
    NoEndpoint,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from gateway.upstream.http1 import H1Connection
from gateway.upstream.retry_budget import RetryBudget, backoff_delay
from gateway.upstream.upstream import Endpoint, Upstream

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is on
    from gateway.observability.tracing import ClientSpan, Tracing

log = logging.getLogger("octopus.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: Bodies up to this size are read before connecting, so the request can be replayed.
REPLAYABLE_BODY = 64 * 1024
_MAX_REQUEST_ID = 200
_BODILESS_STATUSES = frozenset({204, 304})
# Request ids: a random per-process prefix and a counter. Unique without a syscall per
# request (os.urandom is one, and shows up at ~6% of a proxied request).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


class ResponseAborted(Exception):
    """The upstream failed after the response started: the client connection must drop.

    Raised out of the ASGI app on purpose: the server then closes the connection, which
    is the only honest way to tell an HTTP/1.1 client that a body is incomplete.
    """


class BadRequest(Exception):
    """A request the gateway refuses before contacting any upstream."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Outcome:
    """What happened, for metrics and the access log."""

    status: int
    upstream_status: int | None = None
    endpoint: Endpoint | None = None


class HttpProxy:
    """Forwards HTTP requests that matched a route."""

    def __init__(
        self,
        *,
        max_body_size: int,
        trusted_proxies: TrustedProxies,
        tracing: Tracing | None = None,
        keep_date: bool = False,
    ) -> None:
        self.max_body_size = max_body_size
        #: Pass the upstream's ``Date`` on: only for servers that write none (granian).
        self.keep_date = keep_date
        self.trusted = trusted_proxies
        #: None when tracing is off: then the only cost is one check per attempt.
        self.tracing = tracing

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        upstream_path: bytes,
        request_id: str,
    ) -> Outcome:
        method: str = scope["method"]
        headers = scope["headers"]
        try:
            content_length, chunked = self._body_framing(headers, scope)
        except BadRequest as exc:
            # RFC 9112 §6.1: after a framing conflict the connection cannot be trusted to
            # be in sync with the client, so it must close after the answer.
            await send_error(
                send, exc.status, str(exc), request_id, headers=[(b"connection", b"close")]
            )
            return Outcome(exc.status)
        if content_length is not None and content_length > self.max_body_size:
            await send_error(
                send,
                413,
                f"request body of {content_length} bytes exceeds the limit of "
                f"{self.max_body_size} bytes",
                request_id,
                headers=[(b"connection", b"close")],
            )
            return Outcome(413)

        upstream = route.upstream
        assert upstream is not None
        policy = upstream.policy
        timeout = route.timeout if route.timeout is not None else policy.timeout
        retries = route.retries if route.retries is not None else policy.retries
        deadline = monotonic() + timeout if timeout is not None else None

        # Small bodies are read first so that a failed connect can be retried.
        has_body = chunked or (content_length is not None and content_length > 0)
        body: bytes | None = b""
        more_body = False
        if has_body:
            first = await receive()
            if first["type"] == "http.disconnect":
                return Outcome(499)
            body = first.get("body", b"")
            more_body = first.get("more_body", False)
            if len(body) > self.max_body_size:
                await self._too_large(send, request_id)
                return Outcome(413)

        query = scope.get("query_string", b"")
        target = upstream_path + b"?" + query if query else upstream_path
        client = scope.get("client")
        client_ip = client[0] if client else "unknown"
        if more_body:
            framing = b"transfer-encoding: chunked"
            streaming = True
        elif has_body:
            framing = b"content-length: " + str(len(body)).encode()
            streaming = False
        elif content_length == 0:
            # Keep what the client declared: a POST/PUT without any length gets 411 from
            # some upstreams.
            framing = b"content-length: 0"
            streaming = False
        else:
            framing = None
            streaming = False
        rid = request_id.encode()
        trusted = bool(self.trusted) and self.trusted.trusts(client_ip)
        scheme = scope.get("scheme", "http")
        method_bytes = method.encode()
        replayable = not streaming  # the whole body is in hand
        idempotent = method in IDEMPOTENT or route.retry_non_idempotent
        budget = upstream.budget
        budget.record_request()
        key = upstream.balancer.key_for(client_ip, headers) if upstream.uses_key else None
        # Trailers reach the client only from an HTTP/2 upstream, through an ASGI server
        # that can send them, to a client that asked for them (``TE: trailers``).
        relay_trailers = "http.response.trailers" in (scope.get("extensions") or {}) and any(
            name == b"te" and b"trailers" in value.lower() for name, value in headers
        )
        tried: list[Endpoint] = []
        attempts = 1 + max(retries, 0)
        last_error: UpstreamError | None = None
        granted: float | None = None  # backoff of a retry already taken from the budget
        status_retries = bool(policy.retry_statuses) and replayable and idempotent
        for attempt in range(attempts):
            if attempt:
                delay = (
                    granted if granted is not None else _retry_delay(budget, attempt - 1, deadline)
                )
                if delay is None:
                    break
                granted = None
                await asyncio.sleep(delay)
            try:
                endpoint = _pick(upstream, tried, key)
            except UpstreamError as exc:
                if last_error is None:
                    last_error = exc
                break
            tried.append(endpoint)
            status_retry = (
                partial(_retry_delay, budget, attempt, deadline)
                if status_retries and attempt + 1 < attempts
                else None
            )
            span: ClientSpan | None = None
            if self.tracing is not None:
                address = endpoint.address
                span = self.tracing.start_client_span(
                    method, upstream.name, address.host, address.port, attempt
                )
            head = build_request_head(
                method_bytes,
                target,
                endpoint.host_header,
                headers,
                client_ip=client_ip,
                scheme=scheme,
                request_id=rid,
                trusted=trusted,
                body_framing=framing,
                trace_headers=None if span is None else span.header_lines(),
                te_trailers=relay_trailers and endpoint.address.scheme in _H2_SCHEMES,
            )
            try:
                outcome = await self._exchange(
                    scope,
                    receive,
                    send,
                    upstream,
                    endpoint,
                    head,
                    body,
                    streaming,
                    more_body,
                    deadline,
                    request_id,
                    retry_status=status_retry,
                    replay_ok=replayable and idempotent,
                    relay_trailers=relay_trailers,
                )
            except _Retry as retry:
                if span is not None:
                    span.finish(error=retry.error)
                last_error = retry.error
                granted = retry.delay
                log.debug("retrying %s %s after %s", method, route.name, retry.error)
                continue
            except BaseException as exc:
                if span is not None:
                    span.finish(error=exc)
                raise
            if span is not None:
                span.finish(outcome.upstream_status, outcome.status)
            return outcome
        assert last_error is not None
        if isinstance(last_error, UpstreamStatus):
            # A retry was granted for this status, then no endpoint could take it: the
            # upstream's answer was already dropped, so there is none to relay.
            last_error = UpstreamError(f"upstream answered {last_error.upstream_status}")
        log.info(
            "upstream request failed",
            extra={"request_id": request_id, "upstream": upstream.name, "reason": str(last_error)},
        )
        await send_error(send, last_error.status, last_error.public_message, request_id)
        return Outcome(last_error.status, endpoint=tried[-1] if tried else None)

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: Upstream,
        endpoint: Endpoint,
        head: bytes,
        body: bytes,
        streaming: bool,
        more_body: bool,
        deadline: float | None,
        request_id: str,
        *,
        retry_status: Callable[[], float | None] | None,
        replay_ok: bool,
        relay_trailers: bool = False,
    ) -> Outcome:
        policy = upstream.policy
        method = scope["method"]
        pool = endpoint.pool
        connect_timeout = _remaining(deadline, policy.connect_timeout)
        try:
            conn, reused = await pool.acquire(connect_timeout)
        except ConnectFailed as exc:
            upstream.record(endpoint, False)
            raise _Retry(exc) from None
        except UpstreamError as exc:
            _release_probe(endpoint)
            log.info("upstream unavailable", extra={"request_id": request_id, "reason": str(exc)})
            await send_error(send, exc.status, exc.public_message, request_id)
            return Outcome(exc.status, endpoint=endpoint)

        endpoint.in_flight += 1
        started = monotonic()
        verdict: bool | None = None  # the attempt's result for breaker and outlier detection
        try:
            outcome = await self._run(
                scope,
                receive,
                send,
                conn,
                method,
                head,
                body,
                streaming,
                more_body,
                deadline,
                policy.read_timeout,
                request_id,
                reused,
                endpoint,
                retry_status=retry_status,
                retry_statuses=policy.retry_statuses,
                replay_ok=replay_ok,
                relay_trailers=relay_trailers,
            )
            if outcome.upstream_status is not None:
                verdict = outcome.upstream_status < 500
            elif outcome.status in (502, 504):
                verdict = False
            return outcome
        except _Retry as retry:
            if isinstance(retry.error, UpstreamStatus) or not reused:
                verdict = False
            raise
        except ResponseAborted:
            verdict = False
            raise
        finally:
            endpoint.in_flight -= 1
            endpoint.latency.observe((monotonic() - started) * 1000.0)
            pool.release(conn)
            if verdict is None:
                _release_probe(endpoint)
            else:
                upstream.record(endpoint, verdict)

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        conn: H1Connection,
        method: str,
        head: bytes,
        body: bytes,
        streaming: bool,
        more_body: bool,
        deadline: float | None,
        read_timeout: float | None,
        request_id: str,
        reused: bool,
        endpoint: Endpoint,
        *,
        retry_status: Callable[[], float | None] | None = None,
        retry_statuses: frozenset[int] = frozenset(),
        replay_ok: bool = False,
        relay_trailers: bool = False,
    ) -> Outcome:
        head_only = method == "HEAD"
        if streaming:
            conn.start(head, head_only=head_only)
            if body:
                conn.write_chunk(body)
            sent = len(body)
            outcome = await self._stream_body(receive, send, conn, sent, more_body, request_id)
            if outcome is not None:
                return outcome
        else:
            conn.start(head + body if body else head, head_only=head_only)

        try:
            status, upstream_headers = await conn.read_head(_remaining(deadline, None))
        except UpstreamError as exc:
            if (
                not conn.received_any
                and not isinstance(exc, UpstreamTimeout)
                and (replay_ok or (reused and not streaming and method in IDEMPOTENT))
            ):
                # Reset before any response byte (often a keep-alive connection the upstream
                # had just closed): the request can go to another endpoint.
                raise _Retry(exc) from None
            conn.abort()
            log.info("upstream failed", extra={"request_id": request_id, "reason": str(exc)})
            await send_error(send, exc.status, exc.public_message, request_id)
            return Outcome(exc.status, endpoint=endpoint)
        if retry_status is not None and status in retry_statuses:
            # Decide before dropping the answer: when no retry is allowed (budget spent,
            # deadline too close) the client gets the upstream's own response.
            delay = retry_status()
            if delay is not None:
                conn.abort()
                raise _Retry(UpstreamStatus(status), delay)

        rid = request_id.encode()
        response_headers = filter_response_headers(upstream_headers, rid, keep_date=self.keep_date)
        if status in _BODILESS_STATUSES:
            # Never a body: a Content-Length here describes some other response (RFC 9110
            # §8.6), and the ASGI server would wait for that many bytes and fail.
            response_headers = [h for h in response_headers if h[0] != b"content-length"]
        start = {"type": "http.response.start", "status": status, "headers": response_headers}
        if relay_trailers:
            start["trailers"] = True
        if conn.complete or head_only:
            data, _ = await conn.read_body(read_timeout) if not head_only else (b"", False)
            await send(start)
            await send({"type": "http.response.body", "body": data, "more_body": False})
            if relay_trailers:
                await _send_trailers(send, conn)
            return Outcome(status, status, endpoint)

        await send(start)
        watcher = asyncio.ensure_future(_watch_disconnect(receive, conn))
        try:
            more = True
            while more:
                try:
                    data, more = await conn.read_body(read_timeout)
                except UpstreamError as exc:
                    if watcher.done():
                        return Outcome(499, status, endpoint)  # the client left first
                    raise ResponseAborted(f"upstream failed mid-response: {exc}") from None
                if data or not more:
                    await send({"type": "http.response.body", "body": data, "more_body": more})
            if relay_trailers:
                await _send_trailers(send, conn)
            return Outcome(status, status, endpoint)
        finally:
            watcher.cancel()

    async def _stream_body(
        self,
        receive: Receive,
        send: Send,
        conn: H1Connection,
        sent: int,
        more_body: bool,
        request_id: str,
    ) -> Outcome | None:
        """Send the rest of a streamed request body; an Outcome means: stop here."""
        limit = self.max_body_size
        while more_body:
            if conn.head_received or conn.closed:
                # The upstream answered (or hung up) before reading everything.
                conn.keep_alive = False
                return None
            message = await receive()
            if message["type"] == "http.disconnect":
                conn.abort()
                return Outcome(499)
            chunk = message.get("body", b"")
            more_body = message.get("more_body", False)
            sent += len(chunk)
            if sent > limit:
                conn.abort()
                await self._too_large(send, request_id)
                return Outcome(413)
            if chunk:
                conn.write_chunk(chunk)
            try:
                await conn.drain()
            except UpstreamError:
                conn.keep_alive = False
                return None  # read_head reports what the upstream said or why it failed
        conn.end_chunks()
        return None

    async def _too_large(self, send: Send, request_id: str) -> None:
        await send_error(
            send,
            413,
            f"request body exceeds the limit of {self.max_body_size} bytes",
            request_id,
            headers=[(b"connection", b"close")],
        )

    def _body_framing(
        self, headers: list[tuple[bytes, bytes]], scope: Scope
    ) -> tuple[int | None, bool]:
        """Content length and chunkedness; refuse the shapes used for request smuggling.

        A repeated Host is refused here too (RFC 9112 §3.2 requires a 400): the route was
        matched on the first one, and the upstream must not be told about another.
        """
        content_length: int | None = None
        transfer_encoding: bytes | None = None
        seen_host = False
        for name, value in headers:
            if name == b"host":
                if seen_host:
                    raise BadRequest(400, "more than one Host header")
                if not _HOST.fullmatch(value):
                    raise BadRequest(400, "invalid Host header")
                seen_host = True
            elif name == b"content-length":
                text = value.strip()
                if not text.isdigit():
                    raise BadRequest(400, "invalid Content-Length")
                length = int(text)
                if content_length is not None and content_length != length:
                    raise BadRequest(400, "conflicting Content-Length headers")
                content_length = length
            elif name == b"transfer-encoding":
                if transfer_encoding is not None:
                    raise BadRequest(400, "repeated Transfer-Encoding header")
                transfer_encoding = value
        if not seen_host and scope.get("http_version") == "1.1":
            raise BadRequest(400, "an HTTP/1.1 request needs a Host header")
        if transfer_encoding is not None:
            if content_length is not None:
                raise BadRequest(400, "both Content-Length and Transfer-Encoding are present")
            if transfer_encoding.strip().lower() != b"chunked":
                raise BadRequest(400, "unsupported Transfer-Encoding")
            if scope.get("http_version") == "1.0":
                raise BadRequest(400, "Transfer-Encoding is not allowed in HTTP/1.0")
            return None, True
        if content_length is None and scope.get("http_version") == "2":
            # HTTP/2 requests may carry a body without a length.
            return None, scope["method"] in ("POST", "PUT", "PATCH")
        return content_length, False


#: RFC 9112 §3.2 / RFC 3986 §3.2.2: a reg-name or IPv4 (letters, digits, ``-._~``, sub-
#: delims, %-escapes) or a bracketed IPv6 literal, then an optional port.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


class _Retry(Exception):
    """Internal: this attempt failed in a way that is safe to try again.

    ``delay`` is set when the retry was already granted (budget taken, backoff chosen).
    """

    def __init__(self, error: UpstreamError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay


def _retry_delay(budget: RetryBudget, retry: int, deadline: float | None) -> float | None:
    """The backoff before retry number ``retry`` (0: the first), taken from the budget;
    None when there is to be no retry.

    Retries are spent from a budget (at most ~20% extra load) and spaced with jittered
    backoff, so they cannot turn an outage into a storm; one that could not start before
    the deadline does not spend the budget.
    """
    delay = backoff_delay(retry)
    if deadline is not None and monotonic() + delay >= deadline:
        return None
    if not budget.try_acquire_retry():
        return None
    return delay


def _remaining(deadline: float | None, cap: float | None) -> float | None:
    if deadline is None:
        return cap
    left = max(deadline - monotonic(), 0.001)
    return left if cap is None else min(left, cap)


async def _watch_disconnect(receive: Receive, conn: H1Connection) -> None:
    """Close the upstream stream as soon as the client goes away mid-response."""
    with contextlib.suppress(Exception):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not conn.complete:
                    conn.abort()
                return


def make_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when it is sane, else a new random one."""
    for name, value in headers:
        if name == b"x-request-id":
            if (
                0 < len(value) <= _MAX_REQUEST_ID
                and value.isascii()
                and value.decode().isprintable()
            ):
                return value.decode("ascii")
            break
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _pick(upstream: Upstream, tried: list[Endpoint], key: str | None) -> Endpoint:
    """An endpoint whose breaker admits this attempt (taking a half-open probe slot)."""
    skipped: list[Endpoint] = []
    for _ in range(len(upstream.endpoints)):
        endpoint = upstream.pick((*tried, *skipped) if skipped else tried, key)
        breaker = endpoint.breaker
        if breaker is None or breaker.allow():
            return endpoint
        skipped.append(endpoint)
    raise NoEndpoint(f"upstream {upstream.name!r} has no available endpoint")


_H2_SCHEMES = frozenset({"h2c", "h2"})


async def _send_trailers(send: Send, conn: Any) -> None:
    """The upstream's trailers (an HTTP/2 stream keeps them), as ASGI trailers."""
    trailers = getattr(conn, "trailers", None) or []
    await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})


def _release_probe(endpoint: Endpoint) -> None:
    if endpoint.breaker is not None:
        endpoint.breaker.release_probe()
