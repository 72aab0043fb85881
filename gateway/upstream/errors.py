"""What can go wrong talking to an upstream, each with the status the client sees."""

from __future__ import annotations

from gateway.errors import GatewayError


class UpstreamError(GatewayError):
    """Base of upstream failures. ``retryable`` says whether another try is safe."""

    status = 502
    code = "bad_gateway"
    #: True when the upstream cannot have acted on the request (nothing was sent,
    #: or the connection died before any response byte on a reused connection).
    retryable = False


class ConnectFailed(UpstreamError):
    """The TCP/TLS connection could not be made (refused, unreachable, handshake)."""

    retryable = True


class ConnectionReset(UpstreamError):
    """The connection closed or reset before the response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent bytes that are not a valid HTTP/1.1 response."""


class UpstreamTimeout(UpstreamError):
    """No answer within the timeout."""

    status = 504
    code = "gateway_timeout"


class PoolTimeout(UpstreamTimeout):
    """Every connection to the endpoint stayed busy until the deadline."""


class NoEndpoint(UpstreamError):
    """The upstream has no endpoint that can take traffic."""

    status = 503
    code = "service_unavailable"
