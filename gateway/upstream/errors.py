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
    #: What the client is told. The detail (addresses, TLS errors) goes to the log only:
    #: an error page must not map the internal network.
    public = "the upstream failed"

    @property
    def public_message(self) -> str:
        return self.public


class ConnectFailed(UpstreamError):
    """The TCP/TLS connection could not be made (refused, unreachable, handshake)."""

    retryable = True
    public = "could not connect to the upstream"


class ConnectionReset(UpstreamError):
    """The connection closed or reset before the response was complete."""

    public = "the upstream closed the connection"


class UpstreamProtocolError(UpstreamError):
    """The upstream sent bytes that are not a valid HTTP/1.1 response."""

    public = "the upstream sent an invalid response"


class UpstreamTimeout(UpstreamError):
    """No answer within the timeout."""

    status = 504
    code = "gateway_timeout"
    public = "the upstream did not answer in time"


class PoolTimeout(UpstreamTimeout):
    """Every connection to the endpoint stayed busy until the deadline."""

    public = "the upstream is saturated: no connection became free in time"


class NoEndpoint(UpstreamError):
    """The upstream has no endpoint that can take traffic."""

    status = 503
    code = "service_unavailable"

    @property
    def public_message(self) -> str:
        return str(self)  # names the upstream, never an address


class UpstreamStatus(UpstreamError):
    """The upstream answered with a status this route retries (502/503/504)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}", status)
        self.upstream_status = status
