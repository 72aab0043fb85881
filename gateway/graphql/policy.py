"""GraphQL request policy: limits checked on the parsed document before any upstream sees it.

Why at the gateway: a GraphQL endpoint accepts arbitrary programs. A ten-line query can
nest a list field twenty levels deep, repeat one expensive field under hundreds of
aliases, or spread a fragment into itself, and the upstream pays for it in CPU before
it can say no. The gateway parses the document once (graphql-core's ``parse``, which
needs no schema), measures its shape and refuses what is out of bounds with GraphQL's
own error shape, so clients see the same kind of error whoever answers.

Measured, over every operation in the document (a document's other operations are not
executed, but a client can pick any of them, so the largest counts):

- depth: nesting of fields, fragments expanded (``{ a { b } }`` is 2);
- aliases: aliased fields, counted once per place a fragment is spread (alias bombs
  usually hide in fragments);
- complexity: the number of fields that would be resolved, fragments expanded; with
  ``list_multipliers`` a field's ``first``/``last``/``limit`` argument multiplies the
  cost of its sub-selection (``users(first: 100) { id }`` costs 1 + 100);
- introspection: any ``__schema`` or ``__type`` field (``__typename`` is harmless). Their
  sub-selections count as one field of depth 1: what they can return is bounded by the
  schema, and tools' introspection queries nest ``ofType`` ten levels deep.

Fragments are measured once each (memoised), so a "billion laughs" of nested fragment
spreads costs linear time to measure, and a fragment that spreads itself is refused
(the cycle guard) instead of recursing forever.

Persisted queries: Apollo's APQ sends ``extensions.persistedQuery.sha256Hash`` (the
SHA-256 of the query text) and, once the server knows it, no query text at all. The
gateway keeps the texts it has already checked (a bounded cache), so a hash-only
request is checked like the full one; an unknown hash gets ``PersistedQueryNotFound``
and the client resends the text. An ``allow_list`` of hashes names trusted operations:
they skip the limits, and with ``only`` they are the only operations that may run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSyntaxError,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableNode,
    parse,
)

__all__ = [
    "GraphQLPolicy",
    "GraphQLRequest",
    "PersistedQueryCache",
    "PolicyViolation",
    "QueryShape",
    "check_request",
    "measure",
    "parse_query",
    "query_hash",
]

#: Most tokens a document may have. A legitimate operation has hundreds; without a cap
#: a 1 MiB body of ``{a{a{a...`` costs the parser far more than the body's size suggests.
MAX_TOKENS = 50_000
#: Arguments whose integer value multiplies a list field's sub-selection cost.
LIST_ARGUMENTS = ("first", "last", "limit")
INTROSPECTION_FIELDS = frozenset({"__schema", "__type"})

_PARSE_TAKES_MAX_TOKENS = "max_tokens" in inspect.signature(parse).parameters


@dataclass(frozen=True, slots=True)
class GraphQLPolicy:
    """The limits of one GraphQL route (``None``: that check is off)."""

    max_depth: int | None = 15
    max_aliases: int | None = 30
    max_complexity: int | None = 1000
    introspection: bool = True
    list_multipliers: bool = False
    #: SHA-256 (lower-case hex) of query texts that are trusted: they skip the limits.
    allow_list: frozenset[str] = frozenset()
    #: Only allow-listed queries may run.
    allow_list_only: bool = False
    #: Request bodies are buffered to be checked; larger ones get 413.
    max_body_size: int = 1024 * 1024


class PolicyViolation(Exception):
    """A request the policy refuses; ``code`` goes in ``extensions.code``."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int = 400,
        extensions: Mapping[str, Any] | None = None,
        locations: list[dict[str, int]] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.extensions = dict(extensions or {})
        self.locations = locations

    def error(self) -> dict[str, Any]:
        """The entry of the ``errors`` list."""
        entry: dict[str, Any] = {"message": self.message}
        if self.locations:
            entry["locations"] = self.locations
        entry["extensions"] = {"code": self.code, **self.extensions}
        return entry


@dataclass(slots=True)
class GraphQLRequest:
    """One GraphQL-over-HTTP request (of a batch, possibly)."""

    query: str | None
    operation_name: str | None = None
    variables: dict[str, Any] | None = None
    extensions: dict[str, Any] | None = None

    @property
    def persisted_hash(self) -> str | None:
        """``extensions.persistedQuery.sha256Hash`` (Apollo APQ), lower-cased."""
        persisted = (self.extensions or {}).get("persistedQuery")
        if isinstance(persisted, Mapping):
            digest = persisted.get("sha256Hash")
            if isinstance(digest, str) and digest:
                return digest.lower()
        return None

    @classmethod
    def from_json(cls, payload: Any) -> GraphQLRequest:
        """From the JSON object of a POST body (``{query, variables, operationName,
        extensions}``).

        Raises:
            PolicyViolation: the object does not have that shape.
        """
        if not isinstance(payload, Mapping):
            raise PolicyViolation("BAD_REQUEST", "the request body must be a JSON object")
        query = payload.get("query")
        name = payload.get("operationName")
        variables = payload.get("variables")
        extensions = payload.get("extensions")
        if query is not None and not isinstance(query, str):
            raise PolicyViolation("BAD_REQUEST", "query must be a string")
        if name is not None and not isinstance(name, str):
            raise PolicyViolation("BAD_REQUEST", "operationName must be a string")
        if variables is not None and not isinstance(variables, Mapping):
            raise PolicyViolation("BAD_REQUEST", "variables must be an object")
        if extensions is not None and not isinstance(extensions, Mapping):
            raise PolicyViolation("BAD_REQUEST", "extensions must be an object")
        return cls(
            query,
            name,
            dict(variables) if variables is not None else None,
            dict(extensions) if extensions is not None else None,
        )

    @classmethod
    def from_query_params(cls, params: Mapping[str, str]) -> GraphQLRequest:
        """From GET parameters, where ``variables`` and ``extensions`` are JSON text.

        Raises:
            PolicyViolation: ``variables`` or ``extensions`` is not a JSON object.
        """
        decoded: dict[str, Any] = {}
        for key in ("variables", "extensions"):
            text = params.get(key)
            if text:
                try:
                    decoded[key] = json.loads(text)
                except ValueError:
                    raise PolicyViolation("BAD_REQUEST", f"{key} is not valid JSON") from None
        return cls.from_json(
            {
                "query": params.get("query"),
                "operationName": params.get("operationName") or None,
                **decoded,
            }
        )


@dataclass(frozen=True, slots=True)
class QueryShape:
    """What ``measure`` found."""

    depth: int
    aliases: int
    complexity: int
    introspection: bool


@dataclass(slots=True)
class _Tally:
    depth: int = 0
    aliases: int = 0
    complexity: int = 0
    introspection: bool = False


@dataclass
class _Walker:
    fragments: dict[str, FragmentDefinitionNode]
    variables: Mapping[str, Any]
    list_multipliers: bool
    memo: dict[str, _Tally] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)

    def selection_set(self, node: SelectionSetNode | None) -> _Tally:
        tally = _Tally()
        if node is None:
            return tally
        for selection in node.selections:
            if isinstance(selection, FieldNode):
                if selection.name.value in INTROSPECTION_FIELDS:
                    # Bounded by the schema itself; tools nest ``ofType`` ~10 levels.
                    tally.depth = max(tally.depth, 1)
                    tally.complexity += 1
                    tally.introspection = True
                    continue
                inner = self.selection_set(selection.selection_set)
                tally.depth = max(tally.depth, 1 + inner.depth)
                tally.aliases += inner.aliases + (1 if selection.alias is not None else 0)
                multiplier = self._multiplier(selection) if inner.complexity else 1
                tally.complexity += 1 + multiplier * inner.complexity
                tally.introspection |= inner.introspection
                continue
            if isinstance(selection, InlineFragmentNode):
                inner = self.selection_set(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode):
                inner = self.fragment(selection.name.value)
            else:  # pragma: no cover - the AST has no other selection kinds
                continue
            tally.depth = max(tally.depth, inner.depth)
            tally.aliases += inner.aliases
            tally.complexity += inner.complexity
            tally.introspection |= inner.introspection
        return tally

    def fragment(self, name: str) -> _Tally:
        known = self.memo.get(name)
        if known is not None:
            return known
        if name in self.active:
            raise PolicyViolation(
                "GRAPHQL_VALIDATION_FAILED", f'fragment "{name}" spreads itself (a cycle)'
            )
        definition = self.fragments.get(name)
        if definition is None:
            raise PolicyViolation("GRAPHQL_VALIDATION_FAILED", f'unknown fragment "{name}"')
        self.active.add(name)
        try:
            tally = self.selection_set(definition.selection_set)
        finally:
            self.active.discard(name)
        self.memo[name] = tally
        return tally

    def _multiplier(self, node: FieldNode) -> int:
        if not self.list_multipliers:
            return 1
        for argument in node.arguments or ():
            if argument.name.value not in LIST_ARGUMENTS:
                continue
            value = argument.value
            if isinstance(value, IntValueNode):
                return max(int(value.value), 1)
            if isinstance(value, VariableNode):
                given = self.variables.get(value.name.value)
                if isinstance(given, int) and not isinstance(given, bool):
                    return max(given, 1)
        return 1


def parse_query(query: str) -> DocumentNode:
    """Parse a document (no schema needed), with the token cap.

    Raises:
        PolicyViolation: ``GRAPHQL_PARSE_FAILED`` with the parser's message and location.
    """
    try:
        if _PARSE_TAKES_MAX_TOKENS:
            return parse(query, max_tokens=MAX_TOKENS)
        return parse(query)  # pragma: no cover - graphql-core without max_tokens
    except GraphQLSyntaxError as exc:
        raise PolicyViolation(
            "GRAPHQL_PARSE_FAILED", exc.message, locations=_locations(exc)
        ) from None
    except GraphQLError as exc:  # e.g. the token limit
        raise PolicyViolation("GRAPHQL_PARSE_FAILED", exc.message) from None
    except RecursionError:
        raise PolicyViolation("GRAPHQL_PARSE_FAILED", "the document is nested too deeply") from None


def measure(
    document: DocumentNode,
    variables: Mapping[str, Any] | None = None,
    *,
    list_multipliers: bool = False,
) -> QueryShape:
    """Depth, aliases, complexity and introspection use over all operations of ``document``.

    Raises:
        PolicyViolation: a fragment cycle or an unknown fragment (the document could never
            be valid, and measuring it would not end).
    """
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    walker = _Walker(fragments, variables or {}, list_multipliers)
    total = _Tally()
    try:
        for definition in document.definitions:
            if isinstance(definition, OperationDefinitionNode):
                tally = walker.selection_set(definition.selection_set)
                total.depth = max(total.depth, tally.depth)
                total.aliases = max(total.aliases, tally.aliases)
                total.complexity = max(total.complexity, tally.complexity)
                total.introspection |= tally.introspection
    except RecursionError:
        raise PolicyViolation("GRAPHQL_PARSE_FAILED", "the document is nested too deeply") from None
    return QueryShape(total.depth, total.aliases, total.complexity, total.introspection)


def enforce(policy: GraphQLPolicy, shape: QueryShape) -> None:
    """Refuse a shape that exceeds ``policy`` (the first limit exceeded is reported).

    Raises:
        PolicyViolation: with ``extensions`` naming the limit and the measured value.
    """
    if not policy.introspection and shape.introspection:
        raise PolicyViolation(
            "INTROSPECTION_DISABLED", "GraphQL introspection is disabled on this endpoint"
        )
    checks = (
        ("MAX_DEPTH_EXCEEDED", "depth", policy.max_depth, shape.depth),
        ("MAX_ALIASES_EXCEEDED", "aliases", policy.max_aliases, shape.aliases),
        ("MAX_COMPLEXITY_EXCEEDED", "complexity", policy.max_complexity, shape.complexity),
    )
    for code, what, limit, actual in checks:
        if limit is not None and actual > limit:
            raise PolicyViolation(
                code,
                f"query {what} {actual} exceeds the limit of {limit}",
                extensions={"limit": limit, "actual": actual},
            )


def query_hash(query: str) -> str:
    """SHA-256 of the query text as Apollo APQ computes it (UTF-8, lower-case hex)."""
    return hashlib.sha256(query.encode("utf-8")).hexdigest()


class PersistedQueryCache:
    """Query texts the gateway has seen with their APQ hash and let through (LRU).

    Per process: with several workers a client may be asked for the text once per
    worker, which APQ clients handle (they resend it).
    """

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._texts: OrderedDict[str, str] = OrderedDict()

    def get(self, digest: str) -> str | None:
        text = self._texts.get(digest)
        if text is not None:
            self._texts.move_to_end(digest)
        return text

    def put(self, digest: str, text: str) -> None:
        self._texts[digest] = text
        self._texts.move_to_end(digest)
        while len(self._texts) > self.size:
            self._texts.popitem(last=False)


@dataclass(slots=True)
class Checked:
    """A request that passed: its document (None when the text is unknown to the
    gateway but allow-listed, or a GET without a query) and whether it is trusted."""

    document: DocumentNode | None
    query: str | None
    trusted: bool


def check_request(
    policy: GraphQLPolicy, request: GraphQLRequest, cache: PersistedQueryCache
) -> Checked:
    """Apply ``policy`` to one request, resolving APQ hashes through ``cache``.

    Raises:
        PolicyViolation: what to answer instead of forwarding.
    """
    digest = request.persisted_hash
    query = request.query
    if query is not None and digest is not None and query_hash(query) != digest:
        raise PolicyViolation("PERSISTED_QUERY_HASH_MISMATCH", "provided sha does not match query")
    if digest is None and query is not None:
        digest = query_hash(query)
    if policy.allow_list_only and (digest is None or digest not in policy.allow_list):
        raise PolicyViolation(
            "PERSISTED_QUERY_NOT_ALLOWED",
            "only allow-listed (persisted) queries may run on this endpoint",
        )
    trusted = digest is not None and digest in policy.allow_list
    if query is None:
        if digest is None:
            raise PolicyViolation("BAD_REQUEST", "the request has no query")
        query = cache.get(digest)
        if query is None:
            if trusted:
                return Checked(None, None, True)  # the upstream knows it; we trust it
            # Apollo clients react to this message by resending with the query text.
            raise PolicyViolation("PERSISTED_QUERY_NOT_FOUND", "PersistedQueryNotFound", 200)
    document = parse_query(query)
    if not trusted:
        enforce(
            policy,
            measure(document, request.variables, list_multipliers=policy.list_multipliers),
        )
    if request.persisted_hash is not None:
        cache.put(request.persisted_hash, query)
    return Checked(document, query, trusted)


def _locations(error: GraphQLError) -> list[dict[str, int]] | None:
    if not error.locations:
        return None
    return [{"line": loc.line, "column": loc.column} for loc in error.locations]
