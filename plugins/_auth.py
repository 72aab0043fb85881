"""What the built-in auth plugins (``jwt-auth``, ``api-key``, ``basic-auth``) share.

Three things must behave identically across them, so they live here once:

- ``public_routes``: path globs that skip authentication. ``*`` and ``?`` stay inside
  one path segment and ``**`` crosses segments, so ``/public/*`` does not quietly open
  ``/public/admin/delete``; a trailing ``/**`` also matches the prefix itself.
- Identity headers the plugin forwards upstream (``X-Consumer``, claim headers) are
  removed from the client's request first, on every request, public routes included:
  an upstream must be able to trust them.
- Refusals use the gateway's JSON error shape, with the ``WWW-Authenticate``
  challenge of the scheme.

After a successful check a plugin records who the caller is in ``ctx.state["auth"]``
(``{"plugin", "consumer", "scopes", ...}``) so later plugins (rate limits keyed by
consumer, audit sinks) need not parse credentials again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import field_validator

from plugins.api import Plugin, RequestContext, Response
from settings.fields import ConfigModel

#: RFC 9110 ``token``: what a header name may contain.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Characters a challenge's quoted-string must not carry: quotes, backslashes, and
#: anything outside printable ASCII (token fields such as ``alg`` are client input).
_UNSAFE_QUOTED = re.compile(r'[^\x20-\x7e]|["\\]')


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A path glob as an anchored regex (``*``/``?`` within a segment, ``**`` across)."""
    if not pattern.startswith("/"):
        raise ValueError(f"{pattern!r} must start with '/'")
    tail = ""
    if pattern.endswith("/**"):
        pattern, tail = pattern[:-3], "(?:/.*)?"
    out: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out) + tail)


def check_header_name(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid header name")
    return value


def quoted(value: str) -> str:
    """``value`` made safe for a quoted-string parameter of a challenge (and bounded)."""
    return _UNSAFE_QUOTED.sub("", value)[:200]


def safe_header_value(value: str) -> str | None:
    """``value`` if it can travel as a header value unchanged, else None (no CR/LF/NUL)."""
    if any(ord(c) < 0x20 and c != "\t" for c in value) or "\x7f" in value:
        return None
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return None
    return value


class AuthConfig(ConfigModel):
    """Keys every auth plugin takes."""

    #: Realm named in the ``WWW-Authenticate`` challenge.
    realm: str = "octopus"
    #: Request paths that skip authentication (globs on the path, see the module doc).
    public_routes: list[str] = []
    #: Honour the FARP manifest's auth hints (public routes, required scopes) that the
    #: gateway passes on when ``farp.trust_auth_hints`` is on.
    trust_farp_hints: bool = False

    @field_validator("public_routes")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        for pattern in value:
            compile_glob(pattern)
        return value


class AuthPlugin(Plugin):
    """Base of the built-in auth plugins: public routes, header hygiene, refusals."""

    config: Any

    def configure(self, config: Any) -> None:
        super().configure(config)
        self._public = [compile_glob(p) for p in config.public_routes]
        #: Lower-cased names of headers this plugin alone may set upstream.
        self._owned_headers: list[bytes] = [h.lower().encode() for h in self.owned_headers()]

    def owned_headers(self) -> Iterable[str]:
        """Headers the plugin forwards upstream; client copies are always removed."""
        return ()

    def strip_owned_headers(self, ctx: RequestContext) -> None:
        owned = self._owned_headers
        if owned and any(name in owned for name, _ in ctx.request_headers):
            ctx.request_headers[:] = [(n, v) for n, v in ctx.request_headers if n not in owned]

    def is_public(self, ctx: RequestContext) -> bool:
        hints = ctx.route_auth if self.config.trust_farp_hints else None
        if hints is not None and hints.public:
            return True
        return any(pattern.fullmatch(ctx.path) for pattern in self._public)

    def required_scopes(self, ctx: RequestContext, configured: Iterable[str]) -> list[str]:
        """The configured scopes plus those the route's FARP hints require (if trusted)."""
        scopes = list(configured)
        hints = ctx.route_auth if self.config.trust_farp_hints else None
        if hints is not None:
            scopes.extend(s for s in hints.scopes if s not in scopes)
        return scopes

    def record(
        self, ctx: RequestContext, consumer: str | None, scopes: Iterable[str], **extra: Any
    ):
        """Tell later plugins who the caller is."""
        ctx.state["auth"] = {
            "plugin": self.metadata.name,
            "consumer": consumer,
            "scopes": sorted(set(scopes)),
            **extra,
        }

    def unauthorized(self, ctx: RequestContext, message: str, challenge: str) -> Response:
        return Response.error(
            401,
            "unauthorized",
            message,
            ctx.request_id,
            headers=[(b"www-authenticate", challenge.encode("latin-1"))],
        )

    def forbidden(
        self, ctx: RequestContext, message: str, challenge: str | None = None
    ) -> Response:
        headers = [(b"www-authenticate", challenge.encode("latin-1"))] if challenge else None
        return Response.error(403, "forbidden", message, ctx.request_id, headers=headers)
