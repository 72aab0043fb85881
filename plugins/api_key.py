"""``api-key``: static API keys in a header (``X-API-Key``) or a query parameter.

Keys are configured as SHA-256 hex digests (``hash``), so the gateway's config, its
backups and its logs never hold a usable credential; ``key`` (plaintext) is accepted
for development, and is hashed on load. A presented key is hashed and compared with
every configured digest in constant time (``hmac.compare_digest``, no early exit), so
the answer time says nothing about which key came close.

Before the request goes upstream the key is removed (``hide_credentials``, on by
default: an upstream that never sees keys cannot leak them) and the key's ``name`` is
sent as ``forward_header`` (``X-Consumer``). A client-supplied ``X-Consumer`` is always
dropped, so the upstream can trust it. ``ctx.state["auth"]`` gets
``{"plugin", "consumer", "scopes", "metadata"}``.

Query-string keys are off unless ``query_param`` is set: URLs end up in access logs,
browser histories and ``Referer`` headers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from pydantic import field_validator, model_validator

from plugins._auth import AuthConfig, AuthPlugin, check_header_name, quoted
from plugins.api import PluginMetadata, RequestContext, Response
from settings.fields import ConfigModel

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class ApiKeyEntry(ConfigModel):
    """One consumer's key: ``hash`` (preferred) or ``key``, exactly one."""

    #: SHA-256 of the key, hex (``printf %s KEY | sha256sum``).
    hash: str | None = None
    #: The key itself. Works, but prefer ``hash``: plaintext keys in config leak.
    key: str | None = None
    #: Who the key belongs to; forwarded upstream in ``forward_header``.
    name: str
    scopes: list[str] = []
    #: Free-form data about the consumer, for later plugins (``ctx.state["auth"]``).
    metadata: dict[str, Any] = {}

    @field_validator("hash")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_HEX.fullmatch(value):
            # Never echo it: it may be a plaintext key pasted into the wrong field.
            raise ValueError("must be a SHA-256 digest: 64 hex characters")
        return value.lower() if value is not None else None

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        if not value or not value.isprintable():
            raise ValueError("must be a non-empty printable name (it becomes a header value)")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("must be latin-1 text (it becomes a header value)") from None
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeyEntry:
        if (self.hash is None) == (self.key is None):
            raise ValueError("give exactly one of hash (preferred) or key")
        if self.key is not None and not self.key:
            raise ValueError("key must not be empty")
        return self

    def digest(self) -> bytes:
        if self.hash is not None:
            return bytes.fromhex(self.hash)
        assert self.key is not None
        return hashlib.sha256(self.key.encode()).digest()


class ApiKeyConfig(AuthConfig):
    """``api-key`` options."""

    #: Header carrying the key.
    header: str = "X-API-Key"
    #: Query parameter carrying the key; unset (the default) means header only.
    query_param: str | None = None
    keys: list[ApiKeyEntry]
    #: Scopes a key must have (all of them).
    required_scopes: list[str] = []
    #: Header the key's ``name`` is sent upstream in; empty to send nothing.
    forward_header: str | None = "X-Consumer"
    #: Remove the key (header and query parameter) before going upstream.
    hide_credentials: bool = True

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        return check_header_name(value)

    @field_validator("forward_header")
    @classmethod
    def _forward(cls, value: str | None) -> str | None:
        return check_header_name(value) if value else None

    @field_validator("query_param")
    @classmethod
    def _param(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be empty (leave it unset for header-only keys)")
        return value

    @field_validator("keys")
    @classmethod
    def _distinct(cls, value: list[ApiKeyEntry]) -> list[ApiKeyEntry]:
        digests = [entry.digest() for entry in value]
        if len(set(digests)) != len(digests):
            raise ValueError("the same key is configured twice")
        return value


@dataclass(frozen=True)
class Consumer:
    digest: bytes
    name: str
    scopes: frozenset[str]
    metadata: dict[str, Any]


class ApiKeyPlugin(AuthPlugin):
    metadata = PluginMetadata(
        name="api-key",
        version="1.0.0",
        description="Static API keys (stored as SHA-256 digests) in a header or query.",
        kind="auth",
    )
    Config = ApiKeyConfig
    config: ApiKeyConfig

    def configure(self, config: Any) -> None:
        super().configure(config)
        cfg: ApiKeyConfig = config
        self.consumers = [
            Consumer(e.digest(), e.name, frozenset(e.scopes), dict(e.metadata)) for e in cfg.keys
        ]
        self._challenge = f'ApiKey realm="{quoted(cfg.realm)}"'
        self._header_key = cfg.header.lower().encode()

    def owned_headers(self) -> Iterable[str]:
        return [self.config.forward_header] if self.config.forward_header else []

    def find(self, presented: bytes) -> Consumer | None:
        """The consumer whose digest matches, comparing against all of them."""
        digest = hashlib.sha256(presented).digest()
        found: Consumer | None = None
        for consumer in self.consumers:
            if hmac.compare_digest(digest, consumer.digest):
                found = consumer
        return found

    def presented(self, ctx: RequestContext) -> list[bytes]:
        """Every key the request carries, as bytes (header values, then query values)."""
        wanted = self._header_key
        values = [value.strip() for name, value in ctx.request_headers if name == wanted]
        param = self.config.query_param
        if param is not None and ctx.query_string:
            pairs = parse_qsl(ctx.query_string.decode("latin-1"), keep_blank_values=True)
            values += [value.encode() for name, value in pairs if name == param]
        return values

    async def on_request(self, ctx: RequestContext) -> Response | None:
        self.strip_owned_headers(ctx)
        if self.is_public(ctx):
            return None
        values = self.presented(ctx)
        if not values or not values[0]:
            return self.unauthorized(ctx, "missing API key", self._challenge)
        if len(set(values)) > 1:
            return self.unauthorized(ctx, "more than one API key given", self._challenge)
        consumer = self.find(values[0])
        if consumer is None:
            return self.unauthorized(ctx, "invalid API key", self._challenge)
        missing = [
            s
            for s in self.required_scopes(ctx, self.config.required_scopes)
            if s not in consumer.scopes
        ]
        if missing:
            return self.forbidden(ctx, "API key lacks scope " + " ".join(missing))
        if self.config.hide_credentials:
            ctx.remove_header(self.config.header)
            if self.config.query_param is not None:
                ctx.remove_query_param(self.config.query_param)
        if self.config.forward_header:
            ctx.set_header(self.config.forward_header, consumer.name)
        self.record(ctx, consumer.name, consumer.scopes, metadata=consumer.metadata)
        return None


PLUGIN = ApiKeyPlugin
