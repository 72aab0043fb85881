"""Federated API documents: one OpenAPI and one AsyncAPI document for the whole gateway.

FARP.md §7: clients see one gateway, so they get one description of it. Each service's
own document describes paths as the service sees them; the federated one places every
operation at its *public* gateway path (mount strategy, rewrites) and keeps only the
methods the gateway actually routes to that service (conflict losers are left out).
Component names of different services collide (everyone has an ``Error``), so each
service's components are renamed ``<service>_<name>`` and every ``$ref`` (and the other
places that name components: security requirements, discriminator mappings, link
``operationId``s) is rewritten to match.

OpenAPI 3.0 documents are converted where 3.1 differs in meaning: ``nullable: true``
becomes a ``"null"`` member of ``type`` (and of ``enum``), boolean
``exclusiveMinimum``/``exclusiveMaximum`` become their numeric 3.1 form. Leaving them
would validate but silently change what the schemas accept.

AsyncAPI output is 3.0: 3.x inputs are merged as they are; 2.x inputs are converted
(``subscribe`` → ``send``, ``publish`` → ``receive``, messages moved onto channels).
Only channels the gateway routes (WebSocket/SSE) appear, at their public addresses.

Pure functions: same services in, same document out; nothing here touches the network.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.farp.canonical import canonical_json
from gateway.farp.routes import HTTP_OPERATIONS, FarpService, public_path

log = logging.getLogger("octopus.farp")

OPENAPI_SECTIONS = (
    "schemas",
    "responses",
    "parameters",
    "examples",
    "requestBodies",
    "headers",
    "securitySchemes",
    "links",
    "callbacks",
    "pathItems",
)
ASYNCAPI_SECTIONS = (
    "schemas",
    "servers",
    "channels",
    "operations",
    "messages",
    "securitySchemes",
    "serverVariables",
    "parameters",
    "correlationIds",
    "replies",
    "replyAddresses",
    "externalDocs",
    "tags",
    "operationTraits",
    "messageTraits",
    "serverBindings",
    "channelBindings",
    "operationBindings",
    "messageBindings",
)
# JSON Schema keywords whose values are schemas (maps of, lists of, or one schema).
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_ONE = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "not",
        "contains",
        "if",
        "then",
        "else",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
# Values that are data, not document structure: copied verbatim, never rewritten. Outside
# schemas ``examples`` maps to Example Objects (which may be ``$ref``s) and ``default``
# names the default Response, so those two are data only inside schemas.
_LITERALS = frozenset({"example", "value"})
_SCHEMA_LITERALS = frozenset({"example", "examples", "default", "enum", "const"})
_ASYNCAPI_LITERALS = frozenset({"example", "examples", "enum", "const", "value"})
_BAD_NAME = re.compile(r"[^A-Za-z0-9._-]")
_PARAM = re.compile(r"\{[^}/]+\}")


def sanitize_name(name: str) -> str:
    """A component name OpenAPI accepts (``^[a-zA-Z0-9.\\-_]+$``)."""
    return _BAD_NAME.sub("_", name) or "_"


def _path_key(path: str) -> str:
    """A path with parameter names erased: ``/a/{id}`` and ``/a/{user_id}`` are one path."""
    return _PARAM.sub("{}", path)


def _pointer_escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _pointer_unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


class _Claims:
    """Names already taken in the federated document, so that none is given twice."""

    def __init__(self) -> None:
        self._taken: dict[str, set[str]] = {}

    def claim(self, space: str, wanted: str) -> str:
        taken = self._taken.setdefault(space, set())
        name = wanted
        counter = 2
        while name in taken:
            name = f"{wanted}_{counter}"
            counter += 1
        taken.add(name)
        return name


def _lead(service: FarpService) -> Any:
    return service.manifests[0] if service.manifests else None


def _owners(
    entries: list[tuple[FarpService, Mapping[str, Any]]],
) -> list[str]:
    """The component prefix of each service.

    Usually the service name. Instances of one service mounted separately (the
    ``instance`` strategy) are separate entries; they share the prefix, and so one
    set of components, when their components are identical, and are told apart by
    their upstream name when not.
    """
    by_name: dict[str, set[bytes]] = {}
    for service, document in entries:
        by_name.setdefault(service.name, set()).add(
            canonical_json(document.get("components") or {})
        )
    return [
        sanitize_name(service.name if len(by_name[service.name]) == 1 else service.upstream_name)
        for service, _ in entries
    ]


# --- OpenAPI ---------------------------------------------------------------------------


class _OpenApiService:
    """Rewrites one service's OpenAPI document into the federated one."""

    def __init__(
        self,
        service: FarpService,
        source: Mapping[str, Any],
        prefix: str,
        components: dict[tuple[str, str], str],
        operation_ids: dict[str, str],
    ) -> None:
        self.service = service
        self.source = source
        self.prefix = prefix
        self.components = components  # (section, name) -> federated name
        self.operation_ids = operation_ids  # source operationId -> federated one
        self.paths: dict[str, str] = {}  # source path -> public path
        self.legacy = str(source.get("openapi", "")).startswith("3.0")

    # --- references ----------------------------------------------------------------

    def ref(self, ref: str) -> str:
        if not ref.startswith("#/"):
            return ref  # external documents are not federated; left as they are
        parts = ref[2:].split("/")
        if parts[0] == "components" and len(parts) >= 3:
            name = _pointer_unescape(parts[2])
            final = self.components.get((parts[1], name))
            if final is None:
                final = f"{self.prefix}_{sanitize_name(name)}"
            return "#/" + "/".join(["components", parts[1], _pointer_escape(final), *parts[3:]])
        if parts[0] == "paths" and len(parts) >= 2:
            public = self.paths.get(_pointer_unescape(parts[1]))
            if public is not None:
                return "#/" + "/".join(["paths", _pointer_escape(public), *parts[2:]])
        return ref

    def component_name(self, section: str, name: str) -> str:
        return self.components.get((section, name)) or f"{self.prefix}_{sanitize_name(name)}"

    def security(self, requirements: Any) -> Any:
        """Security requirements name security schemes: rename them like components."""
        if not isinstance(requirements, list):
            return copy.deepcopy(requirements)
        return [
            {self.component_name("securitySchemes", k): copy.deepcopy(v) for k, v in r.items()}
            if isinstance(r, Mapping)
            else r
            for r in requirements
        ]

    # --- walking -------------------------------------------------------------------

    def walk(self, value: Any) -> Any:
        """A rewritten copy of any document part that is not a schema."""
        if isinstance(value, list):
            return [self.walk(v) for v in value]
        if not isinstance(value, Mapping):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                out[key] = self.ref(item)
            elif key == "schema" and isinstance(item, Mapping | bool):
                out[key] = self.schema(item)
            elif key == "links" and isinstance(item, Mapping):
                out[key] = {k: self.link(v) for k, v in item.items()}
            elif key == "callbacks" and isinstance(item, Mapping):
                out[key] = {k: self.callback(v) for k, v in item.items()}
            elif key in _LITERALS or key.startswith("x-"):
                out[key] = copy.deepcopy(item)
            else:
                out[key] = self.walk(item)
        return out

    def schema(self, value: Any) -> Any:
        """A rewritten copy of a Schema Object (3.0 schemas also converted to 3.1)."""
        if not isinstance(value, Mapping):
            return copy.deepcopy(value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                out[key] = self.ref(item)
            elif key in _SCHEMA_MAPS and isinstance(item, Mapping):
                out[key] = {k: self.schema(v) for k, v in item.items()}
            elif key in _SCHEMA_LISTS and isinstance(item, list):
                out[key] = [self.schema(v) for v in item]
            elif key in _SCHEMA_ONE:
                if isinstance(item, list):
                    out[key] = [self.schema(v) for v in item]
                else:
                    out[key] = self.schema(item)
            elif key == "discriminator" and isinstance(item, Mapping):
                out[key] = self.discriminator(item)
            elif key in _SCHEMA_LITERALS or key.startswith("x-"):
                out[key] = copy.deepcopy(item)
            else:
                out[key] = self.walk(item)
        return _schema_to_31(out) if self.legacy else out

    def discriminator(self, value: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(copy.deepcopy(value))
        mapping = value.get("mapping")
        if isinstance(mapping, Mapping):
            out["mapping"] = {k: self._mapping_target(v) for k, v in mapping.items()}
        return out

    def _mapping_target(self, target: Any) -> Any:
        """A discriminator target: a reference, or (3.1) a bare schema name."""
        if not isinstance(target, str):
            return target
        if target.startswith("#"):
            return self.ref(target)
        if "/" not in target:
            return self.component_name("schemas", target)
        return target

    def link(self, value: Any) -> Any:
        out = self.walk(value)
        if isinstance(out, dict):
            operation_id = out.get("operationId")
            if isinstance(operation_id, str):
                out["operationId"] = self.operation_ids.get(operation_id, operation_id)
            operation_ref = out.get("operationRef")
            if isinstance(operation_ref, str):
                out["operationRef"] = self.ref(operation_ref)
        return out

    def callback(self, value: Any) -> Any:
        if not isinstance(value, Mapping) or "$ref" in value:
            return self.walk(value)
        return {expression: self.path_item(item) for expression, item in value.items()}

    def path_item(self, item: Any, methods: Iterable[str] | None = None) -> Any:
        """A Path Item with its operations rewritten; ``methods`` limits which are kept."""
        if not isinstance(item, Mapping):
            return item
        if "$ref" in item:
            return self.walk(item)
        kept = set(HTTP_OPERATIONS if methods is None else methods)
        shared = item.get("parameters") if isinstance(item.get("parameters"), list) else []
        out: dict[str, Any] = {}
        for key, value in item.items():
            if key in HTTP_OPERATIONS:
                if key in kept and isinstance(value, Mapping):
                    out[key] = self.operation(value, shared)
            elif key not in ("servers", "parameters"):
                out[key] = self.walk(value)
        return out

    def operation(self, operation: Mapping[str, Any], shared: list[Any]) -> dict[str, Any]:
        """An operation with its path-level parameters folded in (two services' paths may
        meet in one federated path item, so path-level parameters cannot stay shared)."""
        out = self.walk({k: v for k, v in operation.items() if k not in ("servers", "security")})
        own = operation.get("parameters") if isinstance(operation.get("parameters"), list) else []
        if shared:
            overridden = {self._parameter_key(p) for p in own}
            inherited = [p for p in shared if self._parameter_key(p) not in overridden]
            out["parameters"] = self.walk(inherited) + out.get("parameters", [])
        security = operation.get("security", self.source.get("security"))
        if security is not None:
            out["security"] = self.security(security)
        operation_id = out.get("operationId")
        if isinstance(operation_id, str):
            out["operationId"] = self.operation_ids.get(operation_id, operation_id)
        return out

    def _parameter_key(self, parameter: Any) -> Any:
        """(name, in) of a parameter, following a local ``$ref``."""
        if isinstance(parameter, Mapping) and isinstance(parameter.get("$ref"), str):
            ref = parameter["$ref"]
            prefix = "#/components/parameters/"
            if ref.startswith(prefix):
                target = (self.source.get("components") or {}).get("parameters", {})
                found = target.get(_pointer_unescape(ref[len(prefix) :]))
                if isinstance(found, Mapping):
                    return (found.get("name"), found.get("in"))
            return ref
        if isinstance(parameter, Mapping):
            return (parameter.get("name"), parameter.get("in"))
        return None

    def component(self, section: str, value: Any) -> Any:
        if section == "schemas":
            return self.schema(value)
        if section == "links":
            return self.link(value)
        if section == "callbacks":
            return self.callback(value)
        if section == "pathItems":
            return self.path_item(value)
        return self.walk(value)


def _schema_to_31(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 equivalent of a 3.0 Schema Object's own keywords."""
    nullable = schema.pop("nullable", None)
    if nullable is True:
        kind = schema.get("type")
        # 3.0.3: nullable only has an effect next to an explicit type.
        if isinstance(kind, str):
            schema["type"] = [kind, "null"]
        elif isinstance(kind, list) and "null" not in kind:
            schema["type"] = [*kind, "null"]
        enum = schema.get("enum")
        if isinstance(kind, str | list) and isinstance(enum, list) and None not in enum:
            schema["enum"] = [*enum, None]
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = schema.get(exclusive)
        if isinstance(flag, bool):
            del schema[exclusive]
            if flag and bound in schema:
                schema[exclusive] = schema.pop(bound)
    return schema


def _operation_ids(value: Any, found: list[str]) -> list[str]:
    """Every operationId of a document (paths, callbacks, webhooks, pathItems)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in HTTP_OPERATIONS and isinstance(item, Mapping):
                operation_id = item.get("operationId")
                if isinstance(operation_id, str) and operation_id not in found:
                    found.append(operation_id)
            if key not in _SCHEMA_LITERALS:
                _operation_ids(item, found)
    elif isinstance(value, list):
        for item in value:
            _operation_ids(item, found)
    return found


def _routed_methods(service: FarpService) -> dict[str, tuple[set[str], str | None]]:
    """Public path key → (methods the gateway routes to this service, host pattern)."""
    routed: dict[str, tuple[set[str], str | None]] = {}
    for route in service.routes:
        if route.kind != "http":
            continue
        methods, _host = routed.setdefault(_path_key(route.public_path), (set(), route.host))
        methods.update(m.lower() for m in route.methods)
    return routed


def _info_version(services: list[FarpService], kind: str) -> str:
    """Changes whenever a federated service's document does: clients can cache on it."""
    digest = hashlib.sha256()
    for service in services:
        digest.update(service.upstream_name.encode())
        digest.update(canonical_json(service.documents.get(kind)))
    return digest.hexdigest()[:12]


def federate_openapi(
    services: Iterable[FarpService], *, title: str = "Octopus gateway"
) -> dict[str, Any]:
    """One OpenAPI 3.1 document for every service that published an OpenAPI schema."""
    entries = [
        (service, service.documents["openapi"])
        for service in sorted(services, key=lambda s: (s.name, s.upstream_name))
        if isinstance(service.documents.get("openapi"), Mapping) and _lead(service) is not None
    ]
    prefixes = _owners(entries)
    claims = _Claims()
    shared_components: dict[str, dict[tuple[str, str], str]] = {}
    components: dict[str, dict[str, Any]] = {}
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, dict[str, Any]] = {}
    webhooks: dict[str, Any] = {}
    listed: list[dict[str, Any]] = []

    for (service, source), prefix in zip(entries, prefixes, strict=True):
        source_components = source.get("components")
        source_components = source_components if isinstance(source_components, Mapping) else {}
        first_of_prefix = prefix not in shared_components
        if first_of_prefix:
            names = {}
            for section in OPENAPI_SECTIONS:
                for name in _mapping(source_components.get(section)):
                    names[(section, name)] = claims.claim(
                        f"components.{section}", f"{prefix}_{sanitize_name(name)}"
                    )
            shared_components[prefix] = names
        operation_ids = {
            operation_id: claims.claim("operationId", f"{prefix}_{operation_id}")
            for operation_id in _operation_ids(source, [])
        }
        rewriter = _OpenApiService(
            service, source, prefix, shared_components[prefix], operation_ids
        )
        lead = _lead(service)
        source_paths = _mapping(source.get("paths"))
        for path in source_paths:
            if isinstance(path, str) and path.startswith("/"):
                rewriter.paths[path] = public_path(lead, path)

        if first_of_prefix:
            for section in OPENAPI_SECTIONS:
                for name, value in _mapping(source_components.get(section)).items():
                    final = rewriter.components[(section, name)]
                    components.setdefault(section, {})[final] = rewriter.component(section, value)

        # The service's own tag descriptions first: they beat the generated ones.
        for tag in source.get("tags") or []:
            if isinstance(tag, Mapping) and isinstance(tag.get("name"), str):
                tags.setdefault(tag["name"], rewriter.walk(tag))
        routed = _routed_methods(service)
        for path, item in source_paths.items():
            public = rewriter.paths.get(path)
            if public is None or not isinstance(item, Mapping):
                continue
            if "$ref" in item:
                item = _local_path_item(source, item["$ref"])
                if item is None:
                    continue
            methods, host = routed.get(_path_key(public), (set(), None))
            rewritten = rewriter.path_item(item, methods)
            operations = {m: op for m, op in rewritten.items() if m in HTTP_OPERATIONS}
            if not operations:
                continue
            for operation in operations.values():
                if not operation.get("tags"):
                    operation["tags"] = [service.name]
                    tags.setdefault(
                        service.name,
                        {"name": service.name, "description": f"Service {service.name}"},
                    )
                operation["x-octopus-service"] = service.name
                if host:
                    operation["x-octopus-host"] = host
            target = paths.setdefault(public, {})
            for key, value in rewritten.items():
                if key in HTTP_OPERATIONS and key in target:
                    # Only possible for routes told apart by host (subdomain strategy).
                    log.info(
                        "federated OpenAPI: %s %s already described, %s's left out",
                        key.upper(),
                        public,
                        service.name,
                    )
                    continue
                target.setdefault(key, value)

        for name, item in _mapping(source.get("webhooks")).items():
            webhook = claims.claim("webhooks", f"{prefix}_{name}")
            webhooks[webhook] = rewriter.path_item(item)
        listed.append(
            {
                "name": service.name,
                "upstream": service.upstream_name,
                "version": service.version,
                "openapi": str(source.get("openapi", "")),
            }
        )

    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": _info_version([s for s, _ in entries], "openapi"),
            "description": "Every API published to this gateway through FARP, at its "
            "public gateway path.",
        },
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
    }
    if webhooks:
        document["webhooks"] = webhooks
    if components:
        document["components"] = {
            section: dict(sorted(components[section].items()))
            for section in OPENAPI_SECTIONS
            if components.get(section)
        }
    if tags:
        document["tags"] = list(tags.values())
    document["x-octopus-services"] = listed
    return document


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _local_path_item(source: Mapping[str, Any], ref: Any) -> Mapping[str, Any] | None:
    prefix = "#/components/pathItems/"
    if isinstance(ref, str) and ref.startswith(prefix):
        found = _mapping(_mapping(source.get("components")).get("pathItems")).get(
            _pointer_unescape(ref[len(prefix) :])
        )
        if isinstance(found, Mapping) and "$ref" not in found:
            return found
    return None


# --- AsyncAPI --------------------------------------------------------------------------


class _AsyncApiService:
    """Rewrites one service's AsyncAPI document (2.x or 3.x) into the federated 3.0 one."""

    def __init__(self, prefix: str, channels: dict[str, str], operations: dict[str, str]):
        self.prefix = prefix
        self.channels = channels  # source channel id -> federated id
        self.operations = operations  # source operation id -> federated id

    def name(self, source: str) -> str:
        return f"{self.prefix}_{sanitize_name(source)}"

    def ref(self, ref: str) -> str:
        if not ref.startswith("#/"):
            return ref
        parts = ref[2:].split("/")
        if len(parts) < 2:
            return ref
        source = _pointer_unescape(parts[1])
        if parts[0] == "components" and len(parts) >= 3:
            final = self.name(_pointer_unescape(parts[2]))
            return "#/" + "/".join(["components", parts[1], _pointer_escape(final), *parts[3:]])
        if parts[0] == "channels":
            final = self.channels.get(source, self.name(source))
        elif parts[0] == "operations":
            final = self.operations.get(source, self.name(source))
        else:
            return ref
        return "#/" + "/".join([parts[0], _pointer_escape(final), *parts[2:]])

    def walk(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.walk(v) for v in value]
        if not isinstance(value, Mapping):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                out[key] = self.ref(item)
            elif key in _ASYNCAPI_LITERALS or key.startswith("x-"):
                out[key] = copy.deepcopy(item)
            else:
                out[key] = self.walk(item)
        return out


def _message_from_2(message: Mapping[str, Any]) -> dict[str, Any]:
    """An AsyncAPI 3.0 Message from a 2.x one (``messageId`` and ``schemaFormat`` go)."""
    return {k: v for k, v in message.items() if k not in ("messageId", "schemaFormat")}


def _parameter_from_2(parameter: Any) -> Any:
    """3.0 parameters are strings described by enum/default/examples, not schemas."""
    if not isinstance(parameter, Mapping) or "$ref" in parameter:
        return parameter
    out: dict[str, Any] = {
        k: v for k, v in parameter.items() if k in ("description", "location") or k[:2] == "x-"
    }
    schema = parameter.get("schema")
    if isinstance(schema, Mapping):
        for key in ("enum", "default", "examples"):
            if key in schema:
                out[key] = [str(v) for v in schema[key]] if key != "default" else str(schema[key])
        if "description" not in out and isinstance(schema.get("description"), str):
            out["description"] = schema["description"]
    return out


def _to_asyncapi_3(source: Mapping[str, Any]) -> dict[str, Any]:
    """A 2.x document in 3.0 shape (channels keyed by id, operations separate)."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for address, channel in _mapping(source.get("channels")).items():
        if not isinstance(channel, Mapping):
            continue
        channel_id = sanitize_name(address.strip("/")) or "root"
        converted: dict[str, Any] = {"address": address, "messages": {}}
        for key in ("description", "bindings", "title", "summary"):
            if key in channel:
                converted[key] = channel[key]
        if isinstance(channel.get("parameters"), Mapping):
            converted["parameters"] = {
                k: _parameter_from_2(v) for k, v in channel["parameters"].items()
            }
        for verb, action in (("subscribe", "send"), ("publish", "receive")):
            operation = channel.get(verb)
            if not isinstance(operation, Mapping):
                continue
            message = operation.get("message")
            listed = (
                message.get("oneOf")
                if isinstance(message, Mapping) and isinstance(message.get("oneOf"), list)
                else [message]
                if message is not None
                else []
            )
            refs = []
            for index, item in enumerate(listed):
                if not isinstance(item, Mapping):
                    continue
                ref = item.get("$ref")
                if isinstance(ref, str) and ref.startswith("#/components/messages/"):
                    key = _pointer_unescape(ref.rsplit("/", 1)[1])
                    converted["messages"][key] = {"$ref": ref}
                else:
                    key = str(item.get("messageId") or item.get("name") or f"{verb}{index}")
                    converted["messages"][key] = _message_from_2(item)
                refs.append({"$ref": f"#/channels/{channel_id}/messages/{_pointer_escape(key)}"})
            operation_id = str(operation.get("operationId") or f"{verb}_{channel_id}")
            op: dict[str, Any] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "messages": refs,
            }
            for key in ("summary", "description", "tags", "bindings", "externalDocs"):
                if key in operation:
                    op[key] = operation[key]
            if isinstance(operation.get("security"), list):
                op["security"] = [
                    {"$ref": f"#/components/securitySchemes/{_pointer_escape(name)}"}
                    for requirement in operation["security"]
                    if isinstance(requirement, Mapping)
                    for name in requirement
                ]
            operations[operation_id] = op
        channels[channel_id] = converted
    components = dict(_mapping(source.get("components")))
    if isinstance(components.get("messages"), Mapping):
        components["messages"] = {
            k: _message_from_2(v) if isinstance(v, Mapping) else v
            for k, v in components["messages"].items()
        }
    if isinstance(components.get("parameters"), Mapping):
        components["parameters"] = {
            k: _parameter_from_2(v) for k, v in components["parameters"].items()
        }
    return {"channels": channels, "operations": operations, "components": components}


def _routed_channels(service: FarpService) -> set[str]:
    return {_path_key(r.public_path) for r in service.routes if r.kind in ("websocket", "sse")}


def federate_asyncapi(
    services: Iterable[FarpService], *, title: str = "Octopus gateway"
) -> dict[str, Any]:
    """One AsyncAPI 3.0 document: the WebSocket/SSE channels of every service that
    published an AsyncAPI schema, at their public gateway addresses."""
    entries = [
        (service, service.documents["asyncapi"])
        for service in sorted(services, key=lambda s: (s.name, s.upstream_name))
        if isinstance(service.documents.get("asyncapi"), Mapping) and _lead(service) is not None
    ]
    prefixes = _owners(entries)
    claims = _Claims()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    components: dict[str, dict[str, Any]] = {}
    done_prefixes: set[str] = set()
    listed: list[dict[str, Any]] = []

    for (service, original), prefix in zip(entries, prefixes, strict=True):
        version = str(original.get("asyncapi", ""))
        source = original if version.startswith("3.") else _to_asyncapi_3(original)
        routed = _routed_channels(service)
        lead = _lead(service)
        source_channels = _mapping(source.get("channels"))
        channel_ids = {
            cid: claims.claim("channels", f"{prefix}_{sanitize_name(cid)}")
            for cid in source_channels
        }
        source_operations = _mapping(source.get("operations"))
        operation_ids = {
            oid: claims.claim("operations", f"{prefix}_{sanitize_name(oid)}")
            for oid in source_operations
        }
        rewriter = _AsyncApiService(prefix, channel_ids, operation_ids)
        kept: set[str] = set()
        for cid, channel in source_channels.items():
            if not isinstance(channel, Mapping):
                continue
            address = channel.get("address", cid)
            if not isinstance(address, str):
                continue
            public = public_path(lead, "/" + address.lstrip("/"))
            if _path_key(public) not in routed:
                continue
            out = rewriter.walk({k: v for k, v in channel.items() if k != "servers"})
            out["address"] = public
            channels[channel_ids[cid]] = out
            kept.add(cid)
        for oid, operation in source_operations.items():
            if not isinstance(operation, Mapping):
                continue
            channel_ref = _mapping(operation.get("channel")).get("$ref")
            target = (
                _pointer_unescape(channel_ref.split("/")[2])
                if isinstance(channel_ref, str) and channel_ref.startswith("#/channels/")
                else None
            )
            if target not in kept:
                continue
            out = rewriter.walk(operation)
            out["x-octopus-service"] = service.name
            operations[operation_ids[oid]] = out
        if prefix not in done_prefixes:
            done_prefixes.add(prefix)
            for section in ASYNCAPI_SECTIONS:
                for name, value in _mapping(
                    _mapping(source.get("components")).get(section)
                ).items():
                    components.setdefault(section, {})[rewriter.name(name)] = rewriter.walk(value)
        listed.append(
            {
                "name": service.name,
                "upstream": service.upstream_name,
                "version": service.version,
                "asyncapi": version,
            }
        )

    document: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": _info_version([s for s, _ in entries], "asyncapi"),
            "description": "Every WebSocket and SSE channel published to this gateway "
            "through FARP, at its public gateway address.",
        },
        "channels": dict(sorted(channels.items())),
        "operations": dict(sorted(operations.items())),
    }
    if components:
        document["components"] = {
            section: dict(sorted(components[section].items()))
            for section in ASYNCAPI_SECTIONS
            if components.get(section)
        }
    document["x-octopus-services"] = listed
    return document
