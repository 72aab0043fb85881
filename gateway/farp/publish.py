"""Building manifests the way a publishing service does: hashes, sizes and checksum.

Used by the demo service, by tests, and by anyone who wants to publish from Python.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.farp.canonical import manifest_checksum, schema_hash, schema_size


def _spec_version(kind: str, document: Any) -> str:
    return str(document.get(kind, "")) if isinstance(document, dict) else ""


def inline_schema(kind: str, document: Any, spec_version: str = "") -> dict[str, Any]:
    """A schema descriptor carrying ``document`` inline."""
    return {
        "type": kind,
        "spec_version": spec_version or _spec_version(kind, document),
        "location": {"type": "inline"},
        "content_type": "application/json",
        "inline_schema": document,
        "hash": schema_hash(document),
        "size": schema_size(document),
    }


def http_schema(
    kind: str, document: Any, url: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """A descriptor for ``document`` served at ``url``."""
    location: dict[str, Any] = {"type": "http", "url": url}
    if headers:
        location["headers"] = headers
    return {
        "type": kind,
        "spec_version": _spec_version(kind, document),
        "location": location,
        "content_type": "application/json",
        "hash": schema_hash(document),
        "size": schema_size(document),
    }


def make_manifest(
    service_name: str,
    instance_id: str,
    address: str | None,
    schemas: list[dict[str, Any]] | None = None,
    *,
    service_version: str = "v1.0.0",
    health: str = "/health",
    routing: dict[str, Any] | None = None,
    capabilities: list[str] | None = None,
    weight: int | None = None,
    status: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A complete, valid manifest with its checksum."""
    schemas = schemas or []
    manifest: dict[str, Any] = {
        "version": "1.0.0",
        "service_name": service_name,
        "service_version": service_version,
        "instance_id": instance_id,
        "schemas": schemas,
        "capabilities": capabilities or ["rest"],
        "endpoints": {"health": health},
        "updated_at": int(time.time()),
        "checksum": manifest_checksum(schemas),
    }
    if address is not None:
        instance: dict[str, Any] = {"address": address}
        if weight is not None:
            instance["weight"] = weight
        if status is not None:
            instance["status"] = status
        manifest["instance"] = instance
    if routing is not None:
        manifest["routing"] = routing
    manifest.update(extra)
    return manifest
