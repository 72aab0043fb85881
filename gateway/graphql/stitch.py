"""One GraphQL endpoint over several services: root fields stitched, operations split.

Why: with several FARP services publishing GraphQL schemas, clients would otherwise
need one endpoint per service and could not ask for data of two services in one query.
The combined endpoint serves a schema whose ``Query`` and ``Mutation`` root fields are
the union of the services' root fields; each root field belongs to exactly one service.

Build time (pure, no network; the routing table builder calls it):

- each service's schema comes from its ``graphql`` schema descriptor: SDL text (a JSON
  string) or an introspection result (``{"__schema": ...}``, optionally under ``data``);
- services are ranked as FARP ranks route conflicts: higher ``routing.priority``, then
  higher ``service_version`` (semver), then the earlier registration;
- named types are merged by name. Two services defining one type differently is a
  conflict: the higher-ranked definition is kept and the other service's root fields
  that can reach that type are dropped (they would return data the combined schema
  describes wrongly);
- a root field claimed by two services is a conflict too: the higher-ranked service
  keeps it. Every conflict is logged and listed with ``"kind": "graphql"`` next to the
  route conflicts (``/_/routes``).

Request time: the operation is validated against the combined schema, its root
selections are split by owning service (root fragments are inlined, since the services
may name their root types differently), and each service receives a sub-operation with
only its root fields plus the fragments and variables those use, POSTed to its own
GraphQL endpoint through the gateway's upstream pool (balancing, breakers, timeouts).
The answers' ``data`` objects are merged in the order of the original query; errors are
concatenated (their ``path`` starts at a root field, so it stays right). ``__typename``
and introspection at the root are answered by the gateway from the combined schema.

Limits: queries may span services, a mutation may target one service (running
mutations of several services serially across them has no transaction to offer);
subscriptions are not stitched; types are not merged field by field (no federation
``@key`` entities).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLEnumType,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    GraphQLUnionType,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionNode,
    SelectionSetNode,
    Visitor,
    build_client_schema,
    build_schema,
    execute_sync,
    get_named_type,
    get_operation_ast,
    is_introspection_type,
    is_specified_directive,
    is_specified_scalar_type,
    print_ast,
    print_type,
    validate,
    validate_schema,
    visit,
)
from graphql.utilities.print_schema import print_directive  # not top-level before 3.3

from gateway.farp.manifest import semver_key
from gateway.graphql.policy import PolicyViolation

__all__ = [
    "ServiceInput",
    "StitchedSchema",
    "StitchedService",
    "UpstreamFailed",
    "load_schema",
    "merge_schemas",
]

log = logging.getLogger("octopus.graphql")

ROOTS = (("query", "Query"), ("mutation", "Mutation"))
_CACHE_SIZE = 16


class UpstreamFailed(Exception):
    """A service's sub-operation got no usable GraphQL answer."""


@dataclass(frozen=True)
class ServiceInput:
    """What stitching needs to know about one service (no routes, no sockets)."""

    name: str
    upstream_name: str
    document: Any  # SDL text or an introspection result
    priority: int = 50
    version: str | None = None
    first_seen: float = 0.0

    def rank(self) -> tuple[Any, ...]:
        """Sort key, best first: priority, then semver, then earlier registration."""
        return (-self.priority, tuple(-x for x in semver_key(self.version)), self.first_seen)

    @property
    def document_key(self) -> str:
        if isinstance(self.document, str):
            return self.document
        return json.dumps(self.document, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class MergedSchema:
    """The build-time result: the combined schema and which upstream owns each root field."""

    schema: GraphQLSchema
    #: "query" / "mutation" -> root field name -> owning upstream name
    owners: Mapping[str, Mapping[str, str]]
    conflicts: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class StitchedService:
    """Where one service's sub-operations go. ``target`` is whatever the request-time
    ``post`` callable needs (the handler passes a Route)."""

    name: str
    upstream_name: str
    path: str
    target: Any = None


@dataclass(frozen=True)
class StitchedSchema:
    """The combined schema bound to the services that serve it."""

    merged: MergedSchema
    services: Mapping[str, StitchedService]  # by upstream name

    @property
    def schema(self) -> GraphQLSchema:
        return self.merged.schema

    async def execute(
        self,
        document: DocumentNode,
        operation_name: str | None,
        variables: Mapping[str, Any] | None,
        post: Callable[[StitchedService, dict[str, Any]], Awaitable[Mapping[str, Any]]],
        *,
        allow_mutation: bool = True,
    ) -> dict[str, Any]:
        """Run one operation across the services; the GraphQL response object.

        Raises:
            PolicyViolation: the operation is invalid for the combined schema, or asks
                for something the combined endpoint does not do (several services in
                one mutation, subscriptions).
        """
        errors = validate(self.schema, document)
        if errors:
            first = errors[0]
            raise PolicyViolation(
                "GRAPHQL_VALIDATION_FAILED",
                first.message,
                locations=[{"line": at.line, "column": at.column} for at in first.locations or ()],
                extensions={"more": [e.message for e in errors[1:5]]} if errors[1:] else None,
            )
        operation = get_operation_ast(document, operation_name)
        if operation is None:
            raise PolicyViolation(
                "BAD_REQUEST",
                f'unknown operation "{operation_name}"'
                if operation_name
                else "the document has several operations: name one in operationName",
            )
        kind = operation.operation
        if kind == OperationType.SUBSCRIPTION:
            raise PolicyViolation(
                "OPERATION_NOT_SUPPORTED",
                "subscriptions are not served by the combined GraphQL endpoint",
            )
        if kind == OperationType.MUTATION and not allow_mutation:
            raise PolicyViolation("OPERATION_NOT_SUPPORTED", "mutations need POST", 405)
        root = "mutation" if kind == OperationType.MUTATION else "query"
        fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }
        owners = self.merged.owners.get(root, {})
        parts = _split(operation.selection_set.selections, fragments, owners)
        remote = [key for key in parts if key is not None]
        if root == "mutation" and len(remote) > 1:
            raise PolicyViolation(
                "MUTATION_SPANS_SERVICES",
                "a mutation on the combined endpoint may target one service at a time "
                f"(this one targets {', '.join(sorted(remote))})",
            )
        order = _response_keys(operation.selection_set.selections, fragments)
        data: dict[str, Any] = {}
        errors_out: list[dict[str, Any]] = []
        local = parts.get(None)
        if local:
            result = execute_sync(
                self.schema,
                _sub_document(operation, local, fragments),
                variable_values=dict(variables or {}),
                operation_name=operation_name,
            )
            data.update(result.data or {})
            errors_out.extend(e.formatted for e in result.errors or ())
        services = [self.services[key] for key in remote]
        bodies = []
        for service in services:
            sub = _sub_document(operation, parts[service.upstream_name], fragments)
            used = {d.variable.name.value for d in sub.definitions[0].variable_definitions or ()}
            body: dict[str, Any] = {"query": print_ast(sub)}
            if variables and used:
                body["variables"] = {k: v for k, v in variables.items() if k in used}
            if operation.name is not None:
                body["operationName"] = operation.name.value
            bodies.append(body)
        answers = await asyncio.gather(
            *(post(service, body) for service, body in zip(services, bodies, strict=True)),
            return_exceptions=True,
        )
        for service, answer in zip(services, answers, strict=True):
            keys = _response_keys(parts[service.upstream_name], fragments)
            if isinstance(answer, BaseException):
                if not isinstance(answer, UpstreamFailed):
                    log.error(
                        "stitched sub-operation failed",
                        exc_info=answer,
                        extra={"service": service.name},
                    )
                reason = str(answer) if isinstance(answer, UpstreamFailed) else "internal error"
                for key in keys:
                    data[key] = None
                    errors_out.append(
                        {
                            "message": f"service {service.name!r} failed: {reason}",
                            "path": [key],
                            "extensions": {"code": "UPSTREAM_ERROR", "service": service.name},
                        }
                    )
                continue
            sub_data = answer.get("data")
            if isinstance(sub_data, Mapping):
                data.update(sub_data)
            else:
                for key in keys:
                    data.setdefault(key, None)
            for error in answer.get("errors") or ():
                if isinstance(error, Mapping):
                    errors_out.append(_tag(error, service.name))
        ordered = {key: data[key] for key in order if key in data}
        ordered.update((k, v) for k, v in data.items() if k not in ordered)
        response: dict[str, Any] = {"data": ordered}
        if errors_out:
            response["errors"] = errors_out
        return response


def load_schema(document: Any) -> GraphQLSchema:
    """A schema from SDL text or an introspection result.

    Raises:
        ValueError: the document is neither, or does not build.
    """
    try:
        if isinstance(document, str):
            return build_schema(document)
        if isinstance(document, Mapping):
            data = document.get("data", document)
            if isinstance(data, Mapping) and isinstance(data.get("__schema"), Mapping):
                return build_client_schema(dict(data))  # type: ignore[arg-type]
            sdl = document.get("sdl")
            if isinstance(sdl, str):
                return build_schema(sdl)
    except Exception as exc:
        raise ValueError(f"not a valid GraphQL schema: {exc}") from None
    raise ValueError("expected SDL text or an introspection result ({'__schema': ...})")


_schemas: OrderedDict[str, GraphQLSchema | ValueError] = OrderedDict()
_merged: OrderedDict[tuple[Any, ...], MergedSchema | None] = OrderedDict()
#: Several gateways may share a process (tests, mounted apps), each building tables on
#: its own event loop thread.
_cache_lock = threading.Lock()


def _cached_schema(service: ServiceInput) -> GraphQLSchema:
    key = service.document_key
    with _cache_lock:
        found = _schemas.get(key)
        if found is not None:
            _schemas.move_to_end(key)
    if found is None:
        try:
            found = load_schema(service.document)
        except ValueError as exc:
            found = exc
        with _cache_lock:
            _schemas[key] = found
            while len(_schemas) > _CACHE_SIZE * 4:
                _schemas.popitem(last=False)
    if isinstance(found, ValueError):
        raise found
    return found


def merge_schemas(services: Sequence[ServiceInput], path: str) -> MergedSchema | None:
    """The combined schema of ``services`` (cached: rebuilds happen on every discovery
    change, schemas rarely change); None when fewer than two schemas load."""
    key = (path, *((s.upstream_name, s.name, s.rank(), s.document_key) for s in services))
    with _cache_lock:
        if key in _merged:
            _merged.move_to_end(key)
            return _merged[key]
    merged = _merge(services, path)
    with _cache_lock:
        _merged[key] = merged
        while len(_merged) > _CACHE_SIZE:
            _merged.popitem(last=False)
    return merged


def _merge(services: Sequence[ServiceInput], path: str) -> MergedSchema | None:
    loaded: list[tuple[ServiceInput, GraphQLSchema]] = []
    for service in sorted(services, key=ServiceInput.rank):
        try:
            loaded.append((service, _cached_schema(service)))
        except ValueError as exc:
            log.warning(
                "GraphQL schema left out of the combined endpoint",
                extra={"service": service.name, "reason": str(exc)},
            )
    if len(loaded) < 2:
        return None
    conflicts: list[dict[str, Any]] = []

    # Named types: the best-ranked definition wins; others that differ are conflicts.
    chosen: dict[str, tuple[ServiceInput, GraphQLNamedType]] = {}
    contested: dict[str, list[ServiceInput]] = {}
    for service, schema in loaded:
        roots = _root_names(schema)
        for name, named in schema.type_map.items():
            if name in roots or is_introspection_type(named) or is_specified_scalar_type(named):
                continue
            if name not in chosen:
                chosen[name] = (service, named)
            elif _signature(named) != _signature(chosen[name][1]):
                contested.setdefault(name, []).append(service)
    dropped: dict[str, set[str]] = {}  # upstream -> type names it may not reach
    for name, losers in contested.items():
        winner = chosen[name][0]
        for loser in losers:
            dropped.setdefault(loser.upstream_name, set()).add(name)
        conflicts.append(
            _conflict(path, winner, losers, type=name, reason=_reason(winner, losers[0]))
        )

    # Root fields: the best-ranked service that can serve a field owns it.
    owners: dict[str, dict[str, str]] = {}
    fields: dict[str, dict[str, Any]] = {}
    claims: dict[tuple[str, str], list[ServiceInput]] = {}
    for root, _ in ROOTS:
        for service, schema in loaded:
            root_type = _root_type(schema, root)
            if root_type is None:
                continue
            banned = dropped.get(service.upstream_name, set())
            reach = _Reach(schema)
            for name, definition in root_type.fields.items():
                if banned and reach.of_field(definition) & banned:
                    log.warning(
                        "GraphQL root field dropped: it reaches a conflicting type",
                        extra={"service": service.name, "field": f"{root}.{name}"},
                    )
                    continue
                claims.setdefault((root, name), []).append(service)
                if name not in owners.setdefault(root, {}):
                    owners[root][name] = service.upstream_name
                    fields.setdefault(root, {})[name] = definition
    for (root, name), claimants in claims.items():
        if len(claimants) < 2:
            continue
        winner, losers = claimants[0], claimants[1:]
        label = f"{dict(ROOTS)[root]}.{name}"
        conflicts.append(
            _conflict(path, winner, losers, field=label, reason=_reason(winner, losers[0]))
        )
    for conflict in conflicts:
        log.warning("GraphQL conflict", extra={"conflict": conflict})
    if not fields.get("query"):
        log.warning("combined GraphQL schema has no query fields; not served")
        return None

    parts = [
        print_type(GraphQLObjectType(type_name, dict(fields[root])))
        for root, type_name in ROOTS
        if fields.get(root)
    ]
    parts += [print_type(named) for _, named in chosen.values()]
    seen_directives: set[str] = set()
    for _, schema in loaded:
        for directive in schema.directives:
            if not is_specified_directive(directive) and directive.name not in seen_directives:
                seen_directives.add(directive.name)
                parts.append(print_directive(directive))
    sdl = "\n\n".join(parts)
    try:
        combined = build_schema(sdl)
    except Exception as exc:
        log.error("combined GraphQL schema does not build; not served", extra={"reason": str(exc)})
        return None
    problems = validate_schema(combined)
    if problems:
        log.error(
            "combined GraphQL schema is invalid; not served",
            extra={"reason": "; ".join(p.message for p in problems[:5])},
        )
        return None
    return MergedSchema(combined, owners, tuple(conflicts))


def _root_names(schema: GraphQLSchema) -> set[str]:
    return {
        t.name
        for t in (schema.query_type, schema.mutation_type, schema.subscription_type)
        if t is not None
    }


def _root_type(schema: GraphQLSchema, root: str) -> GraphQLObjectType | None:
    return schema.query_type if root == "query" else schema.mutation_type


def _signature(named: GraphQLNamedType) -> tuple[Any, ...]:
    """What makes two definitions of a type the same: structure, not descriptions or
    the order fields are written in."""

    def args(arguments: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(sorted((n, str(a.type), repr(a.default_value)) for n, a in arguments.items()))

    if isinstance(named, GraphQLObjectType | GraphQLInterfaceType):
        return (
            type(named).__name__,
            tuple(sorted(i.name for i in named.interfaces)),
            tuple(sorted((n, str(f.type), args(f.args)) for n, f in named.fields.items())),
        )
    if isinstance(named, GraphQLInputObjectType):
        return (
            "input",
            tuple(sorted((n, str(f.type), repr(f.default_value)) for n, f in named.fields.items())),
        )
    if isinstance(named, GraphQLEnumType):
        return ("enum", tuple(sorted(named.values)))
    if isinstance(named, GraphQLUnionType):
        return ("union", tuple(sorted(t.name for t in named.types)))
    if isinstance(named, GraphQLScalarType):
        return ("scalar",)
    return (type(named).__name__,)


@dataclass
class _Reach:
    """Named types reachable from a root field (arguments and result, transitively)."""

    schema: GraphQLSchema
    memo: dict[str, frozenset[str]] = field(default_factory=dict)

    def of_field(self, definition: Any) -> frozenset[str]:
        found: set[str] = set()
        for named in self._direct(definition):
            found |= self.of_type(named)
        return frozenset(found)

    def of_type(self, start: GraphQLNamedType) -> frozenset[str]:
        if start.name in self.memo:
            return self.memo[start.name]
        seen: set[str] = set()
        stack = [start]
        while stack:
            named = stack.pop()
            if named.name in seen:
                continue
            seen.add(named.name)
            if isinstance(named, GraphQLObjectType | GraphQLInterfaceType):
                stack.extend(named.interfaces)
                for definition in named.fields.values():
                    stack.extend(self._direct(definition))
                if isinstance(named, GraphQLInterfaceType):
                    stack.extend(self.schema.get_possible_types(named))
            elif isinstance(named, GraphQLInputObjectType):
                stack.extend(get_named_type(f.type) for f in named.fields.values())
            elif isinstance(named, GraphQLUnionType):
                stack.extend(named.types)
        result = frozenset(seen)
        self.memo[start.name] = result
        return result

    @staticmethod
    def _direct(definition: Any) -> list[GraphQLNamedType]:
        found = [get_named_type(definition.type)]
        found += [get_named_type(a.type) for a in getattr(definition, "args", {}).values()]
        return found


def _reason(winner: ServiceInput, runner_up: ServiceInput) -> str:
    if winner.priority != runner_up.priority:
        return "priority"
    if semver_key(winner.version) != semver_key(runner_up.version):
        return "service_version"
    return "first_registered"


def _conflict(
    path: str, winner: ServiceInput, losers: Iterable[ServiceInput], **details: str
) -> dict[str, Any]:
    """A conflict entry shaped like the route conflicts of ``/_/routes``."""
    return {
        "kind": "graphql",
        "method": "POST",
        "path": path,
        "host": None,
        **details,
        "winner": winner.upstream_name,
        "losers": [s.upstream_name for s in losers],
    }


# --- request time -------------------------------------------------------------------


def _split(
    selections: Iterable[SelectionNode],
    fragments: Mapping[str, FragmentDefinitionNode],
    owners: Mapping[str, str],
) -> dict[str | None, list[SelectionNode]]:
    """Root selections grouped by owning upstream (None: answered by the gateway).

    Root fragments become inline fragments without a type condition: the services'
    root types may have other names, and a root type condition is always true.
    """
    parts: dict[str | None, list[SelectionNode]] = {}
    for selection in selections:
        if isinstance(selection, FieldNode):
            name = selection.name.value
            key = None if name.startswith("__") else owners[name]
            parts.setdefault(key, []).append(selection)
            continue
        if isinstance(selection, InlineFragmentNode):
            inner_selections = selection.selection_set.selections
        elif isinstance(selection, FragmentSpreadNode):
            inner_selections = fragments[selection.name.value].selection_set.selections
        else:  # pragma: no cover
            continue
        for key, inner in _split(inner_selections, fragments, owners).items():
            parts.setdefault(key, []).append(
                InlineFragmentNode(
                    type_condition=None,
                    directives=tuple(selection.directives or ()),
                    selection_set=SelectionSetNode(selections=tuple(inner)),
                )
            )
    return parts


def _response_keys(
    selections: Iterable[SelectionNode], fragments: Mapping[str, FragmentDefinitionNode]
) -> list[str]:
    keys: list[str] = []
    for selection in selections:
        if isinstance(selection, FieldNode):
            key = (selection.alias or selection.name).value
            if key not in keys:
                keys.append(key)
            continue
        if isinstance(selection, InlineFragmentNode):
            inner = selection.selection_set.selections
        elif isinstance(selection, FragmentSpreadNode):
            inner = fragments[selection.name.value].selection_set.selections
        else:  # pragma: no cover
            continue
        keys += [k for k in _response_keys(inner, fragments) if k not in keys]
    return keys


class _Uses(Visitor):
    """Fragment spreads and variables a piece of a document refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.spreads: list[str] = []
        self.variables: set[str] = set()

    def enter_fragment_spread(self, node: FragmentSpreadNode, *_: Any) -> None:
        self.spreads.append(node.name.value)

    def enter_variable(self, node: Any, *_: Any) -> None:
        self.variables.add(node.name.value)


def _sub_document(
    operation: OperationDefinitionNode,
    selections: Sequence[SelectionNode],
    fragments: Mapping[str, FragmentDefinitionNode],
) -> DocumentNode:
    """``operation`` narrowed to ``selections``, with the fragments and variable
    definitions they use (unused ones would make the sub-operation invalid)."""
    uses = _Uses()
    selection_set = SelectionSetNode(selections=tuple(selections))
    visit(selection_set, uses)
    for directive in operation.directives or ():
        visit(directive, uses)
    needed: list[str] = []
    pending = list(uses.spreads)
    while pending:
        name = pending.pop(0)
        if name in needed or name not in fragments:
            continue
        needed.append(name)
        inner = _Uses()
        visit(fragments[name], inner)
        uses.variables |= inner.variables
        pending += inner.spreads
    variables = tuple(
        d for d in operation.variable_definitions or () if d.variable.name.value in uses.variables
    )
    narrowed = OperationDefinitionNode(
        operation=operation.operation,
        name=operation.name,
        variable_definitions=variables,
        directives=tuple(operation.directives or ()),
        selection_set=selection_set,
    )
    return DocumentNode(definitions=(narrowed, *(fragments[n] for n in needed)))


def _tag(error: Mapping[str, Any], service: str) -> dict[str, Any]:
    """A service's error with ``extensions.service`` naming where it came from."""
    tagged = dict(error)
    extensions = tagged.get("extensions")
    extensions = dict(extensions) if isinstance(extensions, Mapping) else {}
    extensions.setdefault("service", service)
    tagged["extensions"] = extensions
    return tagged
