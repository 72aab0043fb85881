"""Static routes: ``routes: [{name, match, upstream, ...}]``.

Everything that can be checked about one route on its own is checked here
(template syntax, regexes, methods, host patterns), so the routing table builder
can compile routes without its own error handling.  Checks that need the rest of
the config (unknown upstream, duplicate names, unknown plugins) live on
:class:`settings.models.Settings`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from settings.fields import ConfigModel, Duration, Int, NonNegativeInt, PositiveInt, Size

__all__ = [
    "HTTP_METHODS",
    "GraphQLRouteSettings",
    "MatchSettings",
    "PersistedQueriesSettings",
    "RewriteRule",
    "RouteSettings",
    "path_template_params",
]

HTTP_METHODS: tuple[str, ...] = (
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "CONNECT",
)

_PARAM = re.compile(r"\{([^{}:]*)(?::([^{}]*))?\}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_LABEL = r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?"
_HOST = re.compile(rf"(?:\*\.)?{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?(?::\d{{1,5}})?")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_GROUP_REF = re.compile(r"\$(\d+)")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def path_template_params(template: str) -> list[tuple[str, bool]]:
    """Validate a path template and return its parameters as ``(name, is_path)``.

    A template is an absolute path whose segments are literal text, ``{name}``
    (one segment) or, as the last segment only, ``{name:path}`` (the rest of the
    path).  A parameter must be a whole segment.

    Raises:
        ValueError: describing the first problem found.
    """
    if not template.startswith("/"):
        raise ValueError(f"path {template!r} must start with '/'")
    if template.count("{") != template.count("}"):
        raise ValueError(f"unbalanced braces in path template {template!r}")
    segments = template[1:].split("/")
    params: list[tuple[str, bool]] = []
    for index, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            continue
        match = _PARAM.fullmatch(segment)
        if match is None:
            raise ValueError(
                f"invalid segment {segment!r} in path template {template!r}: "
                "a parameter must be a whole segment, {name} or {name:path}"
            )
        name, kind = match.group(1), match.group(2)
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(
                f"invalid parameter name {name!r} in path template {template!r} "
                "(use letters, digits and _)"
            )
        if kind is not None and kind != "path":
            raise ValueError(
                f"unknown parameter type {kind!r} in {segment!r} (only ':path' is supported)"
            )
        if kind == "path" and index != len(segments) - 1:
            raise ValueError(f"{segment!r} must be the last segment of {template!r}")
        if any(name == seen for seen, _ in params):
            raise ValueError(f"parameter {name!r} appears twice in path template {template!r}")
        params.append((name, kind == "path"))
    return params


class MatchSettings(ConfigModel):
    """What a request must look like to take the route."""

    path: str
    #: Upper-cased; ``None`` means any method.
    methods: list[str] | None = None
    #: Exact host (``api.example.com``) or one-level-or-more wildcard (``*.example.com``),
    #: lower-cased.
    host: str | None = None
    #: Header name (lower-cased) → exact value.
    headers: dict[str, str] = Field(default_factory=dict)
    #: Query parameter → exact value.
    query: dict[str, str] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        path_template_params(path)
        return path

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, methods: list[str] | None) -> list[str] | None:
        if methods is None:
            return None
        if not methods:
            raise ValueError("empty list matches nothing (leave methods out to allow any)")
        upper = [method.upper() for method in methods]
        unknown = [method for method in upper if method not in HTTP_METHODS]
        if unknown:
            raise ValueError(
                f"unknown HTTP method(s) {', '.join(unknown)} (use {' '.join(HTTP_METHODS)})"
            )
        return list(dict.fromkeys(upper))

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str | None) -> str | None:
        if host is None:
            return None
        lowered = host.lower()
        if not _HOST.fullmatch(lowered):
            raise ValueError(
                f"invalid host {host!r} (use an exact host name or a wildcard like *.example.com)"
            )
        return lowered

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        bad = [name for name in headers if not _HEADER_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"invalid header name(s): {', '.join(map(repr, bad))}")
        return {name.lower(): value for name, value in headers.items()}


class RewriteRule(ConfigModel):
    """A regex substitution on the path sent upstream; ``$1`` refers to group 1."""

    pattern: str
    replacement: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return pattern

    @field_validator("replacement")
    @classmethod
    def _groups_exist(cls, replacement: str, info: ValidationInfo) -> str:
        pattern = info.data.get("pattern")
        if pattern is None:  # the pattern itself was invalid; that error suffices
            return replacement
        groups = re.compile(pattern).groups
        missing = sorted({int(n) for n in _GROUP_REF.findall(replacement) if int(n) > groups})
        if missing:
            raise ValueError(
                f"refers to group(s) {', '.join(f'${n}' for n in missing)} "
                f"but the pattern has {groups} group(s)"
            )
        return replacement


class WebSocketRouteSettings(ConfigModel):
    """Limits of proxied WebSocket sessions: no idle timeout unless set."""

    idle_timeout: Duration | None = None
    max_message_size: Size = 1024 * 1024


class PersistedQueriesSettings(ConfigModel):
    """Trusted GraphQL operations, by the SHA-256 of their query text (as Apollo APQ
    hashes it): they skip the limits, and with ``only`` nothing else may run."""

    allow_list: list[str] = Field(default_factory=list)
    only: bool = False

    @field_validator("allow_list")
    @classmethod
    def _sha256(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not _SHA256.fullmatch(v)]
        if bad:
            raise ValueError(f"not SHA-256 hex digests: {', '.join(map(repr, bad))}")
        return [v.lower() for v in values]


class GraphQLRouteSettings(ConfigModel):
    """A route's GraphQL policy (gateway extension); unset keys take the top-level
    ``graphql:`` values. Its presence makes the route a GraphQL route."""

    max_depth: PositiveInt | None = None
    max_aliases: NonNegativeInt | None = None
    max_complexity: PositiveInt | None = None
    introspection: bool | None = None
    list_multipliers: bool | None = None
    max_body_size: Size | None = None
    persisted_queries: PersistedQueriesSettings | None = None


class RouteSettings(ConfigModel):
    """One static route."""

    name: str
    match: MatchSettings
    upstream: str
    priority: Int = 0
    #: ``True`` strips the literal part of ``match.path`` before its first ``{``;
    #: a string strips exactly that prefix.
    strip_prefix: bool | str = False
    add_prefix: str | None = None
    rewrite: list[RewriteRule] = Field(default_factory=list)
    timeout: Duration | None = None
    retries: NonNegativeInt | None = None
    #: Let retries also repeat POST/PATCH on this route (gateway extension; off).
    retry_non_idempotent: bool = False
    #: WebSocket sessions on this route (gateway extension).
    websocket: WebSocketRouteSettings = Field(default_factory=lambda: WebSocketRouteSettings())
    #: Names of top-level ``plugins`` entries, run after the global ``middleware``.
    plugins: list[str] = Field(default_factory=list)
    #: Makes this a GraphQL route with these limits (gateway extension).
    graphql: GraphQLRouteSettings | None = None

    @field_validator("name", "upstream")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("strip_prefix", mode="plain")
    @classmethod
    def _check_strip_prefix(cls, value: Any) -> bool | str:
        # ``plain`` so a bad value gives one clear error instead of one per union member.
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.startswith("/") and "{" not in value:
            return value
        raise ValueError(
            f"must be true, false or a literal path prefix like '/api' (got {value!r})"
        )

    @field_validator("add_prefix")
    @classmethod
    def _check_add_prefix(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
        return value

    @property
    def prefix_to_strip(self) -> str | None:
        """The literal prefix removed from the request path, or ``None``.

        For ``strip_prefix: true`` and ``match.path: /strip/{rest:path}`` this is
        ``/strip``: the text before the first ``{`` without its trailing slash.
        """
        if self.strip_prefix is False:
            return None
        if isinstance(self.strip_prefix, str):
            return self.strip_prefix.rstrip("/") or None
        literal = self.match.path.split("{", 1)[0].rstrip("/")
        return literal or None
