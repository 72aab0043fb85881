"""Recognising gRPC-Web requests without importing grpcio.

``GatewayApp.handle_http`` calls :func:`is_grpc_web` on every POST, so this module stays
free of heavy imports: a gateway that never sees gRPC-Web never loads grpcio for it.
"""

from __future__ import annotations

from collections.abc import Sequence

GRPC_WEB = b"application/grpc-web"
GRPC_WEB_TEXT = b"application/grpc-web-text"


def grpc_web_content_type(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The request's gRPC-Web content type (lower-cased, without parameters), or None.

    Matches ``application/grpc-web``, ``application/grpc-web+proto``,
    ``application/grpc-web-text`` and ``application/grpc-web-text+proto`` (any ``+suffix``).
    """
    for name, value in headers:
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind if kind.startswith(GRPC_WEB) else None
    return None


def is_grpc_web(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a request is gRPC-Web (its content type starts with ``application/grpc-web``)."""
    return grpc_web_content_type(headers) is not None


def is_text(content_type: bytes) -> bool:
    """``application/grpc-web-text[+proto]``: the body is base64 both ways."""
    return content_type.startswith(GRPC_WEB_TEXT)
