"""The FARP manifest: lenient parsing, strict validation (FARP.md §1-2, §4).

Lenient: unknown fields and ``x-*`` extensions are kept and ignored, ``null`` stands
for an absent optional object, ``capabilities`` may be the string ``"[rest websocket]"``.
Strict: a missing ``service_name``/``instance_id``/``endpoints.health``, a major version
other than 1, a bad schema location, a malformed hash or a checksum that does not
match rejects the manifest with an error naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gateway.farp.canonical import manifest_checksum

SCHEMA_TYPES = frozenset(
    {"openapi", "asyncapi", "grpc", "graphql", "orpc", "thrift", "avro", "custom"}
)
LOCATION_TYPES = frozenset({"http", "registry", "inline"})
STRATEGIES = frozenset({"root", "instance", "service", "versioned", "custom", "subdomain"})
SERVING_STATUSES = frozenset({"", "healthy", "degraded"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


class ManifestError(ValueError):
    """A manifest that must be rejected; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str, *, who: str = "") -> None:
        self.field = field_name
        self.who = who
        prefix = f"manifest {who}: " if who else "manifest: "
        super().__init__(f"{prefix}{field_name}: {message}")


@dataclass(frozen=True)
class SchemaDescriptor:
    """Where a schema lives and what it must hash to."""

    type: str
    spec_version: str
    location_type: str
    url: str | None
    registry_path: str | None
    headers: dict[str, str]
    inline_schema: Any
    hash: str
    size: int | None
    content_type: str | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class InstanceInfo:
    address: str | None
    weight: int
    status: str
    role: str | None
    region: str | None
    zone: str | None
    labels: dict[str, str]


@dataclass(frozen=True)
class RoutingHints:
    strategy: str
    base_path: str | None
    subdomain: str | None
    rewrite: tuple[tuple[str, str], ...]
    strip_prefix: bool
    priority: int
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` keeps the document exactly as received."""

    version: str
    service_name: str
    service_version: str | None
    instance_id: str
    instance: InstanceInfo | None
    schemas: tuple[SchemaDescriptor, ...]
    capabilities: tuple[str, ...]
    endpoints: dict[str, Any]
    routing: RoutingHints
    route_table: tuple[dict[str, Any], ...]
    auth: dict[str, Any] | None
    updated_at: int
    checksum: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.service_name, self.instance_id)

    @property
    def health_path(self) -> str:
        return str(self.endpoints.get("health") or "")

    @property
    def serving(self) -> bool:
        """Whether this instance takes new requests (draining/stopping/unhealthy do not)."""
        return self.instance is None or self.instance.status in SERVING_STATUSES


def parse_manifest(doc: Any, *, address: str | None = None) -> Manifest:
    """Validate a manifest document; ``address`` fills ``instance.address`` when absent
    (the push API and discovery backends know where the instance is)."""
    if not isinstance(doc, dict):
        raise ManifestError("$", "a manifest must be a JSON object")
    who = f"{doc.get('service_name') or '?'}/{doc.get('instance_id') or '?'}"

    def fail(name: str, message: str) -> ManifestError:
        return ManifestError(name, message, who=who)

    version = doc.get("version")
    if not isinstance(version, str) or not version:
        raise fail("version", "required (a semver string such as 1.0.0)")
    found = _VERSION.match(version)
    if not found:
        raise fail("version", f"{version!r} is not a semver version")
    if found.group(1) != "1":
        raise fail("version", f"major version {found.group(1)} is not supported (only 1.x)")

    service_name = _required_string(doc, "service_name", fail)
    instance_id = _required_string(doc, "instance_id", fail)
    service_version = doc.get("service_version")
    if service_version is not None and not isinstance(service_version, str):
        raise fail("service_version", "must be a string")

    endpoints = doc.get("endpoints")
    if not isinstance(endpoints, dict):
        raise fail("endpoints", "required (an object with at least 'health')")
    health = endpoints.get("health")
    if not isinstance(health, str) or not health:
        raise fail("endpoints.health", "required")

    if "schemas" not in doc:
        raise fail("schemas", "required (may be an empty list)")
    raw_schemas = doc.get("schemas") or []
    if not isinstance(raw_schemas, list):
        raise fail("schemas", "must be a list")
    schemas = tuple(_parse_schema(i, s, fail) for i, s in enumerate(raw_schemas))

    updated_at = doc.get("updated_at")
    if isinstance(updated_at, bool) or not isinstance(updated_at, int | float):
        raise fail("updated_at", "required (unix seconds)")

    checksum = doc.get("checksum")
    if checksum is None:
        raise fail("checksum", 'required (64 hex characters, or "" when there are no schemas)')
    if not isinstance(checksum, str) or (checksum and not _HEX64.match(checksum)):
        raise fail("checksum", "must be 64 lower-case hex characters or empty")
    if checksum:
        expected = manifest_checksum([{"type": s.type, "hash": s.hash} for s in schemas])
        if checksum != expected:
            raise fail("checksum", f"does not match the schemas (expected {expected})")

    instance = _parse_instance(doc.get("instance"), fail, address)
    return Manifest(
        version=version,
        service_name=service_name,
        service_version=service_version,
        instance_id=instance_id,
        instance=instance,
        schemas=schemas,
        capabilities=_parse_capabilities(doc.get("capabilities")),
        endpoints=endpoints,
        routing=_parse_routing(doc.get("routing"), fail),
        route_table=_parse_route_table(doc.get("route_table"), fail),
        auth=doc.get("auth") if isinstance(doc.get("auth"), dict) else None,
        updated_at=int(updated_at),
        checksum=checksum,
        raw=doc,
    )


def _required_string(doc: dict[str, Any], name: str, fail: Any) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value.strip():
        raise fail(name, "required")
    return value


def _parse_schema(index: int, raw: Any, fail: Any) -> SchemaDescriptor:
    where = f"schemas[{index}]"
    if not isinstance(raw, dict):
        raise fail(where, "must be an object")
    kind = raw.get("type")
    if kind not in SCHEMA_TYPES:
        raise fail(f"{where}.type", f"must be one of {', '.join(sorted(SCHEMA_TYPES))}")
    location = raw.get("location")
    if not isinstance(location, dict):
        raise fail(f"{where}.location", "required (an object with 'type')")
    location_type = location.get("type")
    if location_type not in LOCATION_TYPES:
        raise fail(f"{where}.location.type", "must be http, registry or inline")
    url = location.get("url")
    registry_path = location.get("registry_path")
    if location_type == "http" and (not isinstance(url, str) or not url):
        raise fail(f"{where}.location.url", "required for an http location")
    if location_type == "registry" and (not isinstance(registry_path, str) or not registry_path):
        raise fail(f"{where}.location.registry_path", "required for a registry location")
    inline = raw.get("inline_schema")
    if location_type == "inline" and inline is None:
        raise fail(f"{where}.inline_schema", "required for an inline location")
    digest = raw.get("hash")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise fail(f"{where}.hash", "must be the 64 hex characters of a SHA-256")
    headers = location.get("headers") or {}
    if not isinstance(headers, dict):
        raise fail(f"{where}.location.headers", "must be an object")
    size = raw.get("size")
    return SchemaDescriptor(
        type=kind,
        spec_version=str(raw.get("spec_version") or ""),
        location_type=location_type,
        url=url if isinstance(url, str) else None,
        registry_path=registry_path if isinstance(registry_path, str) else None,
        headers={str(k): str(v) for k, v in headers.items()},
        inline_schema=inline,
        hash=digest,
        size=size if isinstance(size, int) else None,
        content_type=raw.get("content_type"),
        raw=raw,
    )


def _parse_instance(raw: Any, fail: Any, address: str | None) -> InstanceInfo | None:
    if raw is None:
        if address is None:
            return None
        raw = {}
    if not isinstance(raw, dict):
        raise fail("instance", "must be an object")
    own = raw.get("address")
    # Required when the manifest has an instance object, unless discovery knows the address.
    if ("address" in raw or address is None) and (not isinstance(own, str) or not own):
        raise fail("instance.address", "required when 'instance' is present (host:port)")
    found = own or address
    if found is not None and ":" not in str(found):
        raise fail("instance.address", f"{found!r} must be host:port")
    weight = raw.get("weight")
    if weight is None or weight == 0:
        weight = 100
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise fail("instance.weight", "must be an integer from 0 to 100")
    labels = raw.get("labels") or {}
    return InstanceInfo(
        address=str(found) if found else None,
        weight=weight,
        status=str(raw.get("status") or "").lower(),
        role=raw.get("role"),
        region=raw.get("region"),
        zone=raw.get("zone"),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
    )


def _parse_capabilities(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):  # "[rest websocket]" or "rest,websocket" from discovery metadata
        return tuple(p for p in re.split(r"[\s,\[\]]+", raw) if p)
    if isinstance(raw, list):
        return tuple(str(p) for p in raw)
    return ()


def _parse_routing(raw: Any, fail: Any) -> RoutingHints:
    raw = raw if isinstance(raw, dict) else {}
    strategy = str(raw.get("strategy") or "instance")
    if strategy not in STRATEGIES:
        raise fail("routing.strategy", f"must be one of {', '.join(sorted(STRATEGIES))}")
    for name in ("base_path", "subdomain"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise fail(f"routing.{name}", "must be a string")
    if strategy == "custom" and not raw.get("base_path"):
        raise fail("routing.base_path", "required for the custom strategy")
    if strategy == "subdomain" and not raw.get("subdomain"):
        raise fail("routing.subdomain", "required for the subdomain strategy")
    tags = raw.get("tags") or []
    if not isinstance(tags, list):
        raise fail("routing.tags", "must be a list of strings")
    rules = []
    for index, rule in enumerate(raw.get("rewrite") or []):
        if not isinstance(rule, dict) or not isinstance(rule.get("pattern"), str):
            raise fail(f"routing.rewrite[{index}]", "must be {pattern, replacement}")
        try:
            re.compile(rule["pattern"])
        except re.error as exc:
            raise fail(f"routing.rewrite[{index}].pattern", f"invalid regex: {exc}") from None
        rules.append((rule["pattern"], str(rule.get("replacement") or "")))
    priority = raw.get("priority")
    if priority is None:
        priority = 50
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 100:
        raise fail("routing.priority", "must be an integer from 0 to 100")
    strip = raw.get("strip_prefix")
    return RoutingHints(
        strategy=strategy,
        base_path=raw.get("base_path"),
        subdomain=raw.get("subdomain"),
        rewrite=tuple(rules),
        # Absent means strip: the upstream then sees the paths of its own OpenAPI document.
        strip_prefix=True if strip is None else bool(strip),
        priority=priority,
        tags=tuple(str(t) for t in tags),
    )


def _parse_route_table(raw: Any, fail: Any) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise fail("route_table", "must be a list")
    entries = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise fail(f"route_table[{index}].path", "required")
        if not entry["path"].startswith("/"):
            raise fail(f"route_table[{index}].path", "must start with '/'")
        entries.append(entry)
    return tuple(entries)


def semver_key(version: str | None) -> tuple[int, int, int]:
    """Sortable (major, minor, patch); unparseable versions sort lowest."""
    if not version:
        return (-1, -1, -1)
    found = _VERSION.match(version)
    if not found:
        return (-1, -1, -1)
    return (int(found.group(1)), int(found.group(2)), int(found.group(3) or 0))
