"""Serving a GraphQL route: read the (small) request, apply the policy, then forward it
or, on the combined endpoint, split it across the services.

Why the body is buffered here although the proxy never buffers (DESIGN §2.4): the
policy needs the whole document before anything reaches the upstream, and GraphQL
requests are small. ``graphql.max_body_size`` (1 MiB by default) bounds the buffer;
beyond it the answer is 413. The buffered body is then handed to the ordinary proxy
through a ``receive`` that replays it, so retries, timeouts, headers and streaming of
the response are exactly those of any other route.

What is checked: POST bodies in JSON (``{query, variables, operationName,
extensions}``, or a JSON array of them: a batch), ``application/graphql`` bodies (the
query text), and GET ``?query=``. A GET without ``query`` or ``extensions`` (a GraphiQL
page, a health probe) and methods other than GET/HEAD/POST are forwarded unchecked, as
they carry no operation. ``multipart/form-data`` (file uploads) is refused with 415:
its operations could not be checked without parsing the upload.

Refusals use GraphQL's error shape, ``{"errors": [{"message", "extensions": {"code"}}]}``,
with HTTP 400 for policy violations (413/415/405 where those fit), so a GraphQL client
shows them like any other GraphQL error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from gateway.graphql.policy import (
    Checked,
    GraphQLPolicy,
    GraphQLRequest,
    PersistedQueryCache,
    PolicyViolation,
    check_request,
)
from gateway.graphql.routing import GraphQLRoute
from gateway.graphql.stitch import StitchedSchema, StitchedService, UpstreamFailed
from gateway.proxy.http import HttpProxy, Outcome, ResponseAborted
from gateway.routing.table import Route
from gateway.types import Message, Receive, Scope, Send

__all__ = ["GraphQLHandler"]

#: A sub-operation's answer larger than this is treated as a failure of that service.
MAX_SUB_RESPONSE = 16 * 1024 * 1024
_JSON = b"application/json"
#: Request headers not copied to stitched sub-requests: the gateway writes its own body,
#: and must be able to read the answer (no compression).
_NOT_COPIED = frozenset(
    {b"content-length", b"transfer-encoding", b"content-type", b"accept", b"accept-encoding"}
)


class GraphQLHandler:
    """The GraphQL part of the data plane (one per ``GatewayApp``)."""

    def __init__(
        self,
        proxy: HttpProxy,
        *,
        observe_upstream: Callable[[str, int | str], None] | None = None,
    ) -> None:
        self.proxy = proxy
        self.persisted = PersistedQueryCache()
        self.observe_upstream = observe_upstream

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        upstream_path: bytes,
        request_id: str,
    ) -> Outcome:
        """Check the request against the route's policy, then forward or stitch it."""
        graphql: GraphQLRoute = route.graphql
        policy = graphql.policy
        stitched = graphql.stitched
        method = scope["method"]
        body: bytes | None = None
        try:
            if method in ("GET", "HEAD"):
                params = dict(
                    parse_qsl(
                        scope.get("query_string", b"").decode("utf-8", "replace"),
                        keep_blank_values=True,
                    )
                )
                if "query" not in params and "extensions" not in params:
                    if stitched is None:
                        return await self.proxy.forward(
                            scope, receive, send, route, upstream_path, request_id
                        )
                    raise PolicyViolation("BAD_REQUEST", "the request has no query")
                requests = [GraphQLRequest.from_query_params(params)]
            elif method == "POST":
                read = await _read_body(scope, receive, policy.max_body_size)
                if isinstance(read, Outcome):
                    if read.status == 413:
                        await _send_errors(
                            send,
                            413,
                            [_error("PAYLOAD_TOO_LARGE", _too_large(policy))],
                            request_id,
                            close=True,
                        )
                    return read
                body = read
                requests = _parse_post(scope, body)
            else:
                if stitched is not None:
                    raise PolicyViolation("BAD_REQUEST", f"{method} is not a GraphQL request", 405)
                return await self.proxy.forward(
                    scope, receive, send, route, upstream_path, request_id
                )
            checked = [check_request(policy, request, self.persisted) for request in requests]
            if stitched is not None:
                return await self._stitch(
                    scope, send, stitched, requests, checked, method, request_id
                )
        except PolicyViolation as exc:
            await _send_errors(send, exc.status, [exc.error()], request_id)
            return Outcome(exc.status)
        forwarded = _replay(body, receive) if body is not None else receive
        return await self.proxy.forward(scope, forwarded, send, route, upstream_path, request_id)

    async def _stitch(
        self,
        scope: Scope,
        send: Send,
        stitched: StitchedSchema,
        requests: list[GraphQLRequest],
        checked: list[Checked],
        method: str,
        request_id: str,
    ) -> Outcome:
        if len(requests) != 1:
            raise PolicyViolation(
                "BAD_REQUEST", "batched operations are not supported on the combined endpoint"
            )
        request, result = requests[0], checked[0]
        if result.document is None:
            # Allow-listed hash the gateway has never seen the text of: it cannot split
            # an operation it cannot read, so it asks for the text as APQ does.
            raise PolicyViolation("PERSISTED_QUERY_NOT_FOUND", "PersistedQueryNotFound", 200)

        async def post(service: StitchedService, payload: dict[str, Any]) -> Mapping[str, Any]:
            return await self._post(scope, service, payload, request_id)

        response = await stitched.execute(
            result.document,
            request.operation_name,
            request.variables,
            post,
            allow_mutation=method == "POST",
        )
        await _send_json(send, 200, response, request_id)
        return Outcome(200)

    async def _post(
        self, scope: Scope, service: StitchedService, payload: dict[str, Any], request_id: str
    ) -> Mapping[str, Any]:
        """POST one sub-operation to a service through the gateway's own proxy path."""
        route: Route = service.target
        if route.upstream is None:
            raise UpstreamFailed("upstream not available")
        data = json.dumps(payload, separators=(",", ":")).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in _NOT_COPIED]
        headers += [
            (b"content-type", _JSON),
            (b"accept", b"application/graphql-response+json, application/json"),
            (b"content-length", str(len(data)).encode()),
        ]
        path = service.path.encode()
        sub_scope = {
            **scope,
            "method": "POST",
            "headers": headers,
            "query_string": b"",
            "http_version": "1.1",
            "path": service.path,
            "raw_path": path,
        }
        capture = _Capture()
        try:
            outcome = await self.proxy.forward(
                sub_scope, _replay(data, None), capture, route, path, request_id
            )
        except ResponseAborted as exc:
            raise UpstreamFailed(str(exc)) from None
        if self.observe_upstream is not None:
            self.observe_upstream(
                service.upstream_name,
                outcome.upstream_status if outcome.upstream_status is not None else "error",
            )
        try:
            answer = json.loads(bytes(capture.body))
        except ValueError:
            answer = None
        if outcome.upstream_status is None:
            reason = answer.get("message") if isinstance(answer, dict) else None
            raise UpstreamFailed(f"{outcome.status} {reason or 'gateway error'}")
        if not isinstance(answer, dict) or not ("data" in answer or "errors" in answer):
            raise UpstreamFailed(f"answered {outcome.status} without a GraphQL response")
        return answer


def _parse_post(scope: Scope, body: bytes) -> list[GraphQLRequest]:
    content_type = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.split(b";", 1)[0].strip().lower()
            break
    if content_type.startswith(b"multipart/"):
        raise PolicyViolation(
            "UNSUPPORTED_MEDIA_TYPE",
            "multipart GraphQL requests (file uploads) are not supported by the gateway",
            415,
        )
    if content_type == b"application/graphql":
        return [GraphQLRequest(body.decode("utf-8", "replace"))]
    try:
        payload = json.loads(body)
    except ValueError:
        raise PolicyViolation("BAD_REQUEST", "the request body is not valid JSON") from None
    if isinstance(payload, list):
        if not payload:
            raise PolicyViolation("BAD_REQUEST", "an empty batch")
        return [GraphQLRequest.from_json(item) for item in payload]
    return [GraphQLRequest.from_json(payload)]


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | Outcome:
    """The whole request body, or the Outcome to report (413 too large, 499 client gone)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.strip().isdigit() and int(value) > limit:
            return Outcome(413)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return Outcome(499)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return Outcome(413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive | None) -> Receive:
    """A ``receive`` that hands over ``body`` once, then waits for the client's own
    messages (the proxy watches for a disconnect while the response streams); with no
    client ``receive`` it waits forever (the proxy cancels that wait when it is done)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is not None:
            return await receive()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover

    return replay


class _Capture:
    """A ``send`` that keeps a sub-request's response instead of sending it."""

    def __init__(self) -> None:
        self.status = 0
        self.body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")
            if len(self.body) > MAX_SUB_RESPONSE:
                raise UpstreamFailed(f"answer larger than {MAX_SUB_RESPONSE} bytes")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"message": message, "extensions": {"code": code}}


def _too_large(policy: GraphQLPolicy) -> str:
    return f"GraphQL request body exceeds the limit of {policy.max_body_size} bytes"


async def _send_errors(
    send: Send,
    status: int,
    errors: list[dict[str, Any]],
    request_id: str,
    *,
    close: bool = False,
) -> None:
    """A refusal; ``extensions.request_id`` lets a client quote the request, as the
    gateway's other error answers do."""
    document = {"errors": errors, "extensions": {"request_id": request_id}}
    await _send_json(send, status, document, request_id, close=close)


async def _send_json(
    send: Send, status: int, document: dict[str, Any], request_id: str, *, close: bool = False
) -> None:
    body = json.dumps(document, separators=(",", ":")).encode()
    headers = [
        (b"content-type", _JSON),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
