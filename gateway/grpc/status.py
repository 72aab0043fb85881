"""Mapping between gRPC status codes and HTTP statuses.

Two directions, two purposes:

* gRPC → HTTP (:func:`http_status`): gRPC calls are counted in the same
  ``octopus_requests_total{status}`` series as HTTP requests, so each code gets the HTTP
  status a dashboard reader would expect (the ``google.rpc.Code`` mapping: NOT_FOUND →
  404, UNAVAILABLE → 503, client cancellation → 499 as nginx counts it).
* HTTP → gRPC (:func:`grpc_code`): a plugin answers in HTTP terms (401 from an auth
  plugin, 429 from the rate limiter); a gRPC client needs a status code instead.
"""

from __future__ import annotations

import grpc

_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_FROM_HTTP: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status a gRPC outcome is counted as in metrics."""
    return _TO_HTTP.get(code, 500)


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC status for a plugin's HTTP answer: unmapped 4xx → FAILED_PRECONDITION
    (the request was refused as it is), anything else → INTERNAL."""
    code = _FROM_HTTP.get(status)
    if code is not None:
        return code
    if 400 <= status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def code_number(code: grpc.StatusCode) -> int:
    """The wire number of a status code (``grpc-status`` header value)."""
    return int(code.value[0])


def code_from_number(number: int) -> grpc.StatusCode:
    return _BY_VALUE.get(number, grpc.StatusCode.UNKNOWN)
