"""CORS (Fetch standard, "CORS protocol") answered at the gateway.

Why at the gateway: every service behind it would otherwise re-implement the same
policy, and preflights (``OPTIONS`` with ``Access-Control-Request-Method``) would cost an
upstream round trip each. The plugin owns CORS on the routes it runs on:

- A **preflight** is ``OPTIONS`` + ``Origin`` + ``Access-Control-Request-Method``. Only
  those are answered here (204 with the ``Access-Control-Allow-*`` headers). A plain
  ``OPTIONS`` (no ``Origin`` or no request method) is an ordinary request and goes
  upstream. A preflight that is not allowed (origin, method or a requested header) is
  answered **403** with the gateway's JSON error and no CORS headers, so the browser
  blocks the real request and the operator sees why in the body.
- An **actual request** from an allowed origin gets ``Access-Control-Allow-Origin``
  (the origin itself, or ``*`` when every origin is allowed and credentials are off),
  ``Access-Control-Allow-Credentials: true`` when enabled, and
  ``Access-Control-Expose-Headers`` when configured. A disallowed origin gets no CORS
  headers at all. ``Access-Control-*`` headers the upstream set are replaced: two
  policies answering the same request would leave the browser with duplicate,
  conflicting headers, which it rejects.
- ``*`` is never sent together with credentials (the Fetch standard forbids it): with
  ``allow_credentials`` the request's origin is reflected instead.
- ``Vary: Origin`` is added to every response whose CORS headers depend on the origin
  (everything except "all origins, no credentials"), including responses to requests
  without an ``Origin``, so a shared cache cannot hand one origin's answer to another.

Engine note: a preflight for a path whose routes do not list ``OPTIONS`` would be a 405;
the engine offers it to the global middleware chain first, so ``middleware: [cors]``
answers preflights for GET-only routes. Put ``cors`` before auth plugins: browsers never
send credentials on a preflight.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from plugins._http import append_vary, is_token, split_list
from plugins.api import Plugin, PluginMetadata, RequestContext, Response

DEFAULT_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]

# ``scheme://host[:port]``; ``host`` may be ``*.suffix`` only in patterns.
_ORIGIN = re.compile(
    r"^(?:(?P<scheme>[a-z][a-z0-9+.\-]*)://)?"
    r"(?P<host>\*\.[a-z0-9\-._~%!$&'()+,;=]+|[a-z0-9\-._~%!$&'()+,;=]+|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)
_STATE_KEY = "cors.preflight"


class CorsConfig(BaseModel):
    """``cors`` plugin options; every key is optional."""

    model_config = ConfigDict(extra="forbid")

    #: Exact origins (``https://app.example.com``), ``*`` (any), ``null``, or suffix
    #: patterns ``*.example.com`` / ``https://*.example.com`` (subdomains at any depth,
    #: not the apex; without a scheme any scheme matches; without a port, none).
    allow_origins: list[str] = ["*"]
    #: Methods a preflight may ask for; ``*`` allows any (the asked method is echoed).
    allow_methods: list[str] = DEFAULT_METHODS
    #: Request headers a preflight may ask for (case-insensitive); ``*`` allows any and
    #: echoes the asked list back, which works with credentials too (a literal ``*``
    #: would not: browsers read it as a header name when credentials are on).
    allow_headers: list[str] = ["*"]
    allow_credentials: bool = False
    #: Response headers scripts may read besides the CORS-safelisted ones.
    expose_headers: list[str] = []
    #: How long browsers may cache a preflight answer (seconds or ``10m``); null omits it.
    max_age: int | None = Field(default=600, ge=0)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        out = []
        for value in values:
            text = value.strip().lower()
            if text in ("*", "null"):
                out.append(text)
                continue
            found = _ORIGIN.match(text)
            if found is None:
                raise ValueError(
                    f"{value!r} is not an origin: use scheme://host[:port] (no path or "
                    "trailing slash), '*', or a pattern like '*.example.com'"
                )
            if not found.group("scheme") and not found.group("host").startswith("*."):
                raise ValueError(f"{value!r} needs a scheme, e.g. 'https://{value}'")
            out.append(text)
        return out

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, values: list[str]) -> list[str]:
        for value in values:
            if value != "*" and not is_token(value):
                raise ValueError(f"{value!r} is not an HTTP method")
        return [value.upper() for value in values]

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _headers(cls, values: list[str]) -> list[str]:
        for value in values:
            if value != "*" and not is_token(value):
                raise ValueError(f"{value!r} is not a header name")
        return values

    @field_validator("max_age", mode="before")
    @classmethod
    def _max_age(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            from settings.units import parse_duration

            return int(parse_duration(value))
        return value


class _OriginPolicy:
    """Which origins are allowed, compiled once: a set lookup for exact origins."""

    def __init__(self, entries: list[str]) -> None:
        self.any = "*" in entries
        self.exact = {entry for entry in entries if "*" not in entry}
        self.patterns: list[tuple[str | None, str, str | None]] = []
        for entry in entries:
            if entry != "*" and "*" in entry:
                found = _ORIGIN.match(entry)
                assert found is not None  # validated by the config model
                self.patterns.append(
                    (found.group("scheme"), found.group("host")[1:], found.group("port"))
                )

    def allows(self, origin: str, *, credentials: bool) -> bool:
        origin = origin.lower()
        if origin in self.exact:
            return True
        if self.any:
            # Reflecting "null" (sandboxed iframes, file://) with credentials would hand
            # cookies to any sandboxed page; it must be listed explicitly for that.
            return not (credentials and origin == "null")
        if not self.patterns:
            return False
        found = _ORIGIN.match(origin)
        if found is None or not found.group("scheme") or found.group("host").startswith("*"):
            return False
        scheme, host, port = found.group("scheme"), found.group("host"), found.group("port")
        for want_scheme, suffix, want_port in self.patterns:
            if (
                host.endswith(suffix)
                and len(host) > len(suffix)
                and (want_scheme is None or want_scheme == scheme)
                and want_port == port
            ):
                return True
        return False


class CorsPlugin(Plugin):
    """Answers CORS preflights and decorates actual responses (see the module doc)."""

    metadata = PluginMetadata(
        name="cors",
        version="1.0.0",
        description="Cross-origin resource sharing: preflights answered at the gateway.",
    )
    Config = CorsConfig
    config: CorsConfig

    _CORS_PREFIX: ClassVar[bytes] = b"access-control-"

    def configure(self, config: BaseModel) -> None:
        super().configure(config)
        c = self.config
        self.origins = _OriginPolicy(c.allow_origins)
        self.any_method = "*" in c.allow_methods
        self.methods = frozenset(c.allow_methods)
        self.methods_value = ", ".join(m for m in c.allow_methods if m != "*")
        self.any_header = "*" in c.allow_headers
        self.headers = frozenset(h.lower() for h in c.allow_headers)
        self.expose_value = ", ".join(c.expose_headers)
        #: Whether the answer changes with the origin (and so needs ``Vary: Origin``).
        self.depends_on_origin = c.allow_credentials or not self.origins.any

    async def on_request(self, ctx: RequestContext) -> Response | None:
        if ctx.method != "OPTIONS":
            return None
        origin = _client_header(ctx, b"origin")
        requested = _client_header(ctx, b"access-control-request-method")
        if origin is None or requested is None:
            return None  # a plain OPTIONS: the upstream answers it
        ctx.state[_STATE_KEY] = True
        vary = ["Access-Control-Request-Method", "Access-Control-Request-Headers"]
        if self.depends_on_origin:
            vary.insert(0, "Origin")
        c = self.config
        if not self.origins.allows(origin, credentials=c.allow_credentials):
            return self._refuse(ctx, vary, f"origin {origin} is not allowed")
        method = requested.strip()
        if not self.any_method and method.upper() not in self.methods:
            return self._refuse(ctx, vary, f"method {method} is not allowed")
        asked = split_list(_client_header(ctx, b"access-control-request-headers") or "")
        if not self.any_header:
            refused = [name for name in asked if name.lower() not in self.headers]
            if refused:
                return self._refuse(ctx, vary, f"header {refused[0]} is not allowed")
        answer = Response(204)
        self._allow_origin(answer, origin)
        answer.add_header(
            "access-control-allow-methods", method if self.any_method else self.methods_value
        )
        if asked:
            answer.add_header("access-control-allow-headers", ", ".join(asked))
        if c.max_age is not None:
            answer.add_header("access-control-max-age", str(c.max_age))
        append_vary(answer, *vary)
        return answer

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        if ctx.state.get(_STATE_KEY):
            return  # our own preflight answer (or refusal) is complete as it is
        response.headers[:] = [
            (name, value)
            for name, value in response.headers
            if not name.startswith(self._CORS_PREFIX)
        ]
        if self.depends_on_origin:
            append_vary(response, "Origin")
        origin = _client_header(ctx, b"origin")
        if origin is None or not self.origins.allows(
            origin, credentials=self.config.allow_credentials
        ):
            return
        self._allow_origin(response, origin)
        if self.expose_value:
            response.add_header("access-control-expose-headers", self.expose_value)

    def _allow_origin(self, response: Response, origin: str) -> None:
        if self.config.allow_credentials:
            response.add_header("access-control-allow-origin", origin)
            response.add_header("access-control-allow-credentials", "true")
        elif self.origins.any:
            response.add_header("access-control-allow-origin", "*")
        else:
            response.add_header("access-control-allow-origin", origin)

    @staticmethod
    def _refuse(ctx: RequestContext, vary: list[str], why: str) -> Response:
        answer = Response.error(
            403, "cors_rejected", f"CORS preflight refused: {why}", ctx.request_id
        )
        append_vary(answer, *vary)
        return answer


def _client_header(ctx: RequestContext, name: bytes) -> str | None:
    """A header as the client sent it: earlier plugins may have edited what goes upstream
    (``ctx.request_headers``), but CORS answers the browser, not the upstream."""
    for header, value in ctx.scope.get("headers", ()):
        if header == name:
            return value.decode("latin-1")
    return None


PLUGIN = CorsPlugin
