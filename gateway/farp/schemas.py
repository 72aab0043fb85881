"""Fetching the schema documents a manifest points at, verified and cached by hash.

``http`` locations are fetched with timeouts, retries with backoff and the descriptor's
``location.headers``; JSON or YAML. ``registry`` locations are read from the discovery
backend's KV store. ``inline`` documents are the descriptor's own ``inline_schema``.
Every document is re-canonicalised and must hash to the descriptor's ``hash``; the
cache is keyed by that hash, so a failed fetch of an unchanged schema costs nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import yaml

from gateway.farp.canonical import schema_hash
from gateway.farp.manifest import SchemaDescriptor

KeyReader = Callable[[str], Awaitable[bytes | None]]


class SchemaError(Exception):
    """A schema that could not be fetched or did not verify; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _JsonCompatibleLoader(yaml.SafeLoader):
    """YAML 1.1 as JSON sees it: a bare ``2024-01-01`` stays a string (the safe loader
    would make it a date, which has no JSON form, so the document could not be hashed)."""


_JsonCompatibleLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_document(data: bytes | str) -> Any:
    """A JSON or YAML document."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.load(text, Loader=_JsonCompatibleLoader)
    except yaml.YAMLError as exc:
        raise SchemaError("parse", f"document is neither JSON nor YAML: {exc}") from None


class SchemaFetcher:
    """Fetches and caches schema documents by hash."""

    def __init__(
        self,
        *,
        ttl: float = 300.0,
        timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.2,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._client = client
        self._cache: dict[str, tuple[Any, float]] = {}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=True)
        return self._client

    async def fetch(
        self,
        descriptor: SchemaDescriptor,
        *,
        base_url: str | None = None,
        read_key: KeyReader | None = None,
    ) -> Any:
        """The verified document for ``descriptor``."""
        now = time.monotonic()
        cached = self._cache.get(descriptor.hash)
        if cached is not None:
            self._cache[descriptor.hash] = (cached[0], now)
            return cached[0]
        if descriptor.location_type == "inline":
            document = descriptor.inline_schema
        elif descriptor.location_type == "registry":
            document = await self._from_registry(descriptor, read_key)
        else:
            document = await self._from_http(descriptor, base_url)
        try:
            actual = schema_hash(document)
        except (TypeError, ValueError) as exc:
            message = f"{descriptor.type} schema is not JSON data: {exc}"
            raise SchemaError("parse", message) from None
        if actual != descriptor.hash:
            raise SchemaError(
                "hash_mismatch",
                f"{descriptor.type} schema hashes to {actual}, manifest says {descriptor.hash}",
            )
        self._cache[descriptor.hash] = (document, now)
        self._expire(now)
        return document

    def _expire(self, now: float) -> None:
        stale = [h for h, (_, used) in self._cache.items() if now - used > self.ttl]
        for digest in stale:
            del self._cache[digest]

    async def _from_registry(self, descriptor: SchemaDescriptor, read_key: KeyReader | None) -> Any:
        if read_key is None:
            raise SchemaError(
                "registry", "this discovery backend has no KV store for registry schemas"
            )
        data = await read_key(descriptor.registry_path or "")
        if data is None:
            raise SchemaError("registry", f"registry key {descriptor.registry_path!r} not found")
        return parse_document(data)

    async def _from_http(self, descriptor: SchemaDescriptor, base_url: str | None) -> Any:
        url = descriptor.url or ""
        if url.startswith("/") and base_url:
            url = base_url.rstrip("/") + url
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                response = await self._http().get(url, headers=descriptor.headers)
            except httpx.HTTPError as exc:
                last = exc
                continue
            if response.status_code >= 500:
                last = SchemaError("http_status", f"GET {url} answered {response.status_code}")
                continue
            if response.status_code != 200:
                raise SchemaError("http_status", f"GET {url} answered {response.status_code}")
            return parse_document(response.content)
        if isinstance(last, SchemaError):  # the server answered, with a 5xx every time
            raise last
        raise SchemaError("unreachable", f"GET {url} failed: {last}")
