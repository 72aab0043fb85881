"""The plugin API: what a plugin author writes against. Small and stable on purpose.

A plugin is a class with ``metadata``, an optional pydantic ``Config`` model, async
``start``/``stop``, and the hooks it needs (modelled on Envoy's HTTP filters):

- ``on_request(ctx)``: runs before the upstream is called, in chain order. Return a
  :class:`Response` to answer directly (401, 429, a cached body, a CORS preflight);
  return None to continue. Edit ``ctx.request_headers`` to change what goes upstream.
- ``on_response(ctx, response)``: runs in reverse chain order when the response head is
  known (from the upstream or from a plugin's direct answer); edit
  ``response.headers`` / ``response.status``.
- ``response_body_filter(ctx, response)``: return a :class:`BodyFilter` to transform
  the body chunk by chunk as it streams (compression). Nothing is buffered unless the
  filter buffers.
- ``wants_response_body(ctx, response)``: return True to receive the whole body in
  ``on_response_body`` (cache); the body is buffered up to the size the plugin allows.
- ``on_websocket_connect(ctx)``: like ``on_request`` for WebSocket upgrades (the default
  calls ``on_request``, so an auth plugin protects WebSockets without extra code).
- ``on_error(ctx, error)``: told when the request failed inside the gateway.
- ``wrap(app)``: full control, raw ASGI; return a new app wrapping ``app``.

Plugins are loaded by name (built-ins), from the ``octopus.plugins`` entry point group,
from a module (``module: pkg.mod`` or ``pkg.mod:Class``) or from a file (``path:``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

Headers = list[tuple[bytes, bytes]]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


@dataclass(frozen=True)
class PluginMetadata:
    """Who a plugin is. ``version`` is semver; it labels ``octopus_plugin_loaded``."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    #: Auth plugins fail closed: an exception inside them denies the request.
    kind: str = "generic"  # "auth" | "generic"


class EmptyConfig(BaseModel):
    """The config model of a plugin that takes no options."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class RequestContext:
    """One request as plugins see it. ``state`` carries data between hooks/plugins."""

    scope: MutableMapping[str, Any]
    method: str
    path: str
    query_string: bytes
    request_headers: Headers
    client_ip: str
    request_id: str
    route_name: str
    route_path: str
    params: dict[str, str]
    upstream: str
    websocket: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    #: The route's FARP auth hints (``.public``, ``.scopes``) when the gateway trusts
    #: them (``farp.trust_auth_hints``), else None. Auth plugins opt in with
    #: ``trust_farp_hints``.
    route_auth: Any = None
    #: Set by a request hook to choose the path sent upstream (percent-encoded, without
    #: the query, which is kept). None: the route's own (``strip_prefix``/``rewrite``...).
    upstream_path: str | None = None

    def header(self, name: str) -> str | None:
        """The first request header named ``name`` (case-insensitive), decoded."""
        key = name.lower().encode("latin-1")
        for header, value in self.request_headers:
            if header == key:
                return value.decode("latin-1")
        return None

    def header_values(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for h, v in self.request_headers if h == key]

    def set_header(self, name: str, value: str) -> None:
        """Replace (or add) a request header sent upstream."""
        self.remove_header(name)
        self.request_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))

    def remove_header(self, name: str) -> None:
        key = name.lower().encode("latin-1")
        self.request_headers[:] = [(h, v) for h, v in self.request_headers if h != key]

    def query(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True))

    def remove_query_param(self, name: str) -> None:
        """Drop every ``name=...`` from the query string sent upstream (others keep their
        exact encoding)."""
        from urllib.parse import unquote_plus

        kept = [
            part
            for part in self.query_string.split(b"&")
            if part and unquote_plus(part.split(b"=", 1)[0].decode("latin-1")) != name
        ]
        self.query_string = b"&".join(kept)


@dataclass
class Response:
    """A response a plugin answers with, or the response head ``on_response`` may edit."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def json(cls, status: int, document: Any, headers: Headers | None = None) -> Response:
        import json

        body = json.dumps(document, separators=(",", ":")).encode()
        out = [(b"content-type", b"application/json")]
        out.extend(headers or [])
        return cls(status, out, body)

    @classmethod
    def error(
        cls, status: int, code: str, message: str, request_id: str, headers: Headers | None = None
    ) -> Response:
        """The gateway's JSON error shape."""
        return cls.json(
            status, {"error": code, "message": message, "request_id": request_id}, headers
        )

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for header, value in self.headers:
            if header == key:
                return value.decode("latin-1")
        return None

    def set_header(self, name: str, value: str) -> None:
        self.remove_header(name)
        self.headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))

    def add_header(self, name: str, value: str) -> None:
        self.headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))

    def remove_header(self, name: str) -> None:
        key = name.lower().encode("latin-1")
        self.headers[:] = [(h, v) for h, v in self.headers if h != key]


class BodyFilter:
    """Transforms a response body as it streams: ``feed`` each chunk, then ``finish``."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""


class Plugin:
    """Base class of every plugin. Override what you need; defaults do nothing."""

    metadata: ClassVar[PluginMetadata] = PluginMetadata(name="unnamed")
    Config: ClassVar[type[BaseModel]] = EmptyConfig

    def __init__(self) -> None:
        self.config: Any = None
        #: Behaviour when a hook raises: "closed" answers 503, "open" skips the plugin.
        #: Auth plugins are always closed; others default to open unless configured.
        self.failure_mode = "closed" if self.metadata.kind == "auth" else "open"

    def configure(self, config: BaseModel) -> None:
        """Receive the validated config (an instance of ``Config``)."""
        self.config = config

    async def start(self) -> None:
        """Open connections, start background tasks."""

    async def stop(self) -> None:
        """Release what ``start`` acquired."""

    async def on_request(self, ctx: RequestContext) -> Response | None:
        return None

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        return None

    def response_body_filter(self, ctx: RequestContext, response: Response) -> BodyFilter | None:
        return None

    def wants_response_body(self, ctx: RequestContext, response: Response) -> bool:
        return False

    async def on_response_body(self, ctx: RequestContext, response: Response, body: bytes) -> None:
        return None

    async def on_websocket_connect(self, ctx: RequestContext) -> Response | None:
        return await self.on_request(ctx)

    async def on_error(self, ctx: RequestContext, error: BaseException) -> None:
        return None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        return app

    # Hooks the chain looks for, so a plugin that overrides none costs nothing.
    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(Plugin, hook)
