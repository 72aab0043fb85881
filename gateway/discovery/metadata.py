"""Manifests for instances that carry only FARP metadata (FARP.md §5).

Registries without a value store (DNS TXT records; Consul ``Meta``, Eureka ``metadata``
and Kubernetes annotations likewise) publish ``farp.*`` string pairs instead of the
manifest. :func:`resolve_manifest` does what §5 asks of a gateway:

1. ``farp.enabled`` must be ``"true"``; otherwise the instance is a plain upstream and
   gets no generated routes (None).
2. Fetch ``farp.manifest`` (an absolute URL, or a path relative to
   ``http://{address}``). When neither it nor any other ``farp.*`` URL is given, the default
   ``/_farp/manifest`` is tried (the push API of §6 uses the same default);
   with only ``farp.graphql`` there is nothing to fetch.
3. When that fails, synthesize a manifest from the individual schema URLs:
   ``farp.openapi`` (or ``farp.openapi.path``) and ``farp.asyncapi`` are fetched and
   described as ``http`` schemas with their real hashes, so the watcher verifies and
   caches them like any other. ``farp.graphql`` names the GraphQL *endpoint* (as
   ``endpoints.graphql`` does in a manifest), not a document: it becomes
   ``endpoints.graphql`` plus the ``graphql`` capability, which is what makes it
   routable. ``farp.grpc.reflection`` becomes ``endpoints.grpc_reflection``.
   ``farp.capabilities`` is parsed leniently (``[rest websocket]``, ``rest,websocket``,
   a JSON list). A synthesized manifest mounts with the ``service`` strategy: the
   instances of one DNS name are replicas of one service and should share one pool
   (``instance`` would put each one under its ``host:port``).

The fallback is all or nothing: if any listed schema cannot be fetched the answer is
None, so the caller keeps the instance's last good manifest instead of publishing a
manifest that silently lost the routes of one schema.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx

from gateway.discovery.base import DiscoveredInstance
from gateway.farp.publish import http_schema, make_manifest
from gateway.farp.schemas import SchemaError, parse_document

log = logging.getLogger("octopus.discovery.metadata")

DEFAULT_MANIFEST_PATH = "/_farp/manifest"
#: Keys that name a schema document, by schema type (first present wins).
SCHEMA_KEYS: dict[str, tuple[str, ...]] = {
    "openapi": ("farp.openapi", "farp.openapi.path"),
    "asyncapi": ("farp.asyncapi",),
}
#: The last failure logged per instance key: failures are logged when they change, not
#: on every rebuild that asks again. Bounded so that churn cannot grow it forever.
_last_failure: dict[str, str] = {}
_MAX_REMEMBERED = 4096


class _FetchError(Exception):
    pass


def is_enabled(metadata: dict[str, str]) -> bool:
    """Whether the instance takes part in FARP (``farp.enabled: "true"``)."""
    return str(metadata.get("farp.enabled", "")).strip().lower() == "true"


def parse_capabilities(raw: str | None) -> list[str]:
    """``"[rest websocket]"`` (the Go publisher's ``fmt`` output), ``"rest,websocket"``
    or a JSON list; unknown shapes give what can be salvaged, never an error."""
    if not raw:
        return []
    text = raw.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            pass
        else:
            if isinstance(parsed, list):
                return [str(item).strip() for item in parsed if str(item).strip()]
    return [part for part in re.split(r"[\s,;\[\]\"']+", text) if part]


def _absolute(reference: str, base: str | None) -> str | None:
    """``reference`` as a URL: as is when absolute, else relative to the instance."""
    reference = reference.strip()
    if reference.startswith(("http://", "https://")):
        return reference
    if base is None:
        return None
    return base + "/" + reference.lstrip("/")


def _path_of(reference: str) -> str:
    """The path part of a URL or path (``endpoints.*`` hold paths)."""
    if reference.startswith(("http://", "https://")):
        path = httpx.URL(reference).raw_path.decode("ascii")
        return path or "/"
    return "/" + reference.lstrip("/")


async def _fetch(client: httpx.AsyncClient, url: str, timeout: float) -> Any:
    try:
        response = await client.get(url, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise _FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise _FetchError(f"GET {url} answered {response.status_code}")
    try:
        return parse_document(response.content)
    except (SchemaError, UnicodeDecodeError) as exc:
        raise _FetchError(f"GET {url}: {exc}") from None


async def resolve_manifest(
    instance: DiscoveredInstance, client: httpx.AsyncClient, timeout: float = 5.0
) -> dict[str, Any] | None:
    """The manifest of an instance known only by its ``farp.*`` metadata, or None (not
    a FARP instance, or nothing could be fetched). See the module docstring."""
    metadata = instance.metadata
    if not is_enabled(metadata):
        return None
    base = f"http://{instance.address}" if instance.address else None
    has_schema_keys = any(metadata.get(k) for keys in SCHEMA_KEYS.values() for k in keys)
    reference = metadata.get("farp.manifest") or (
        None if has_schema_keys or metadata.get("farp.graphql") else DEFAULT_MANIFEST_PATH
    )
    reasons: list[str] = []
    if reference:
        url = _absolute(reference, base)
        if url is None:
            reasons.append(f"relative manifest URL {reference!r} but no instance address")
        else:
            try:
                document = await _fetch(client, url, timeout)
            except _FetchError as exc:
                reasons.append(str(exc))
            else:
                if isinstance(document, dict):
                    _succeeded(instance)
                    return document
                reasons.append(f"GET {url}: the manifest is not a JSON object")
    try:
        manifest = await _synthesize(instance, client, base, timeout)
    except _FetchError as exc:
        reasons.append(str(exc))
        manifest = None
    if manifest is None:
        _failed(instance, "; ".join(reasons) or "no farp.manifest and no schema URLs")
        return None
    _succeeded(instance)
    return manifest


async def _synthesize(
    instance: DiscoveredInstance, client: httpx.AsyncClient, base: str | None, timeout: float
) -> dict[str, Any] | None:
    """A manifest built from the individual schema keys; None when there are none."""
    metadata = instance.metadata
    schemas = []
    endpoints: dict[str, Any] = {}
    derived: list[str] = []
    for kind, keys in SCHEMA_KEYS.items():
        reference = next((metadata[k] for k in keys if metadata.get(k)), None)
        if not reference:
            continue
        url = _absolute(reference, base)
        if url is None:
            raise _FetchError(f"relative {kind} URL {reference!r} but no instance address")
        document = await _fetch(client, url, timeout)
        if not isinstance(document, dict):
            raise _FetchError(f"GET {url}: the {kind} document is not a JSON object")
        schemas.append(http_schema(kind, document, url))
        endpoints[kind] = _path_of(reference)
        if kind == "openapi":
            derived.append("rest")
    graphql = metadata.get("farp.graphql")
    if graphql:
        endpoints["graphql"] = _path_of(graphql)
        derived.append("graphql")
    if str(metadata.get("farp.grpc.reflection", "")).strip().lower() == "true":
        endpoints["grpc_reflection"] = True
    if not schemas and not graphql:
        return None
    capabilities = parse_capabilities(metadata.get("farp.capabilities"))
    capabilities += [c for c in derived if c not in capabilities]
    manifest = make_manifest(
        instance.service_name or instance.key,
        instance.instance_id or instance.address or instance.key,
        instance.address,
        schemas,
        health=metadata.get("farp.health") or "/health",
        routing={"strategy": "service"},
        capabilities=capabilities,
    )
    manifest["endpoints"].update(endpoints)
    return manifest


def _failed(instance: DiscoveredInstance, reason: str) -> None:
    if _last_failure.get(instance.key) == reason:
        return
    if len(_last_failure) >= _MAX_REMEMBERED:
        _last_failure.clear()
    _last_failure[instance.key] = reason
    log.warning("no manifest for a FARP instance", extra={"source": instance.key, "reason": reason})


def _succeeded(instance: DiscoveredInstance) -> None:
    _last_failure.pop(instance.key, None)
