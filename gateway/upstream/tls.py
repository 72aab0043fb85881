"""TLS client contexts for HTTPS upstreams: verification on unless config turns it off."""

from __future__ import annotations

import ssl
from functools import lru_cache


@lru_cache(maxsize=64)
def client_context(
    verify: bool = True, ca: str | None = None, alpn: tuple[str, ...] = ()
) -> ssl.SSLContext:
    """A cached client context; one per (verify, ca, alpn) so pools share it."""
    context = ssl.create_default_context(cafile=ca) if verify else ssl._create_unverified_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context
