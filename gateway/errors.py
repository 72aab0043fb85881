"""Data-plane error answers.

Every error a client can see is a small JSON object with a stable ``error`` code, a
human ``message`` and the ``request_id`` the client can quote; never a traceback.
"""

from __future__ import annotations

import json

from gateway.types import Send

_REASONS: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def error_code(status: int) -> str:
    """The stable machine-readable code for an HTTP error status."""
    return _REASONS.get(status, "error")


def error_body(status: int, message: str, request_id: str, code: str | None = None) -> bytes:
    """The JSON bytes of an error answer."""
    doc = {"error": code or error_code(status), "message": message, "request_id": request_id}
    return json.dumps(doc, separators=(",", ":")).encode()


async def send_error(
    send: Send,
    status: int,
    message: str,
    request_id: str,
    *,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with a JSON error (the response must not have started yet)."""
    body = error_body(status, message, request_id, code)
    out = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if headers:
        out.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GatewayError(Exception):
    """An error with the HTTP status the client should see."""

    status = 502

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self)
