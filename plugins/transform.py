"""Request/response header transforms and an upstream path template.

Why a plugin and not route keys: the same edits (drop an internal header, rename a
legacy one, pin an API version) usually apply to a group of routes, and a plugin entry
is reusable by name from each route's ``plugins:`` list or from ``middleware:``.

Header edits run in a fixed order, whatever the order of the keys in the config:
``remove`` → ``rename`` → ``add`` → ``append``.

- ``remove: [NAME]``: drop every field of that name.
- ``rename: {OLD: NEW}``: every ``OLD`` field becomes ``NEW`` (same values, same place);
  existing ``NEW`` fields are dropped first so the renamed value is the only one. No
  ``OLD``, no change.
- ``add: {NAME: VALUE}``: set the header: existing fields of that name are replaced.
- ``append: {NAME: VALUE}``: add one more field, keeping existing ones.

``path: "/v2/{rest}"`` replaces the path sent upstream (the query string is kept) by
the template filled with the route's parameters: ``{name}`` is a parameter of the
route's ``match.path``; a ``{rest:path}`` parameter keeps its slashes, others are
percent-encoded as one segment. It replaces the route's own ``strip_prefix`` /
``rewrite`` / ``add_prefix`` result (through ``ctx.upstream_path``). A template naming a
parameter the route does not have is answered 500 (``misconfigured``), never forwarded
to a wrong path.

Framing headers (``Content-Length``, ``Transfer-Encoding``) and ``Host`` cannot be
edited: changing them here would desynchronise the message from its body or bypass the
proxy's own ``Host`` handling.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, field_validator

from plugins._http import is_token
from plugins.api import Headers, Plugin, PluginMetadata, RequestContext, Response

log = logging.getLogger("octopus.plugins.transform")

PROTECTED = frozenset({"content-length", "transfer-encoding", "host"})
_PARAM = re.compile(r"(/)?\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")
_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):path\}")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_SEGMENT_SAFE = ":@!$&'()*+,;=-._~"
_PATH_SAFE = "/" + _SEGMENT_SAFE


def _name(value: str) -> str:
    if not is_token(value):
        raise ValueError(f"{value!r} is not a header name")
    lowered = value.lower()
    if lowered in PROTECTED:
        raise ValueError(f"{value} cannot be transformed (framing/Host are the proxy's)")
    return lowered


def _value(name: str, value: str) -> str:
    if _BAD_VALUE.search(value):
        raise ValueError(f"the value of {name} contains CR, LF or NUL")
    return value


class HeaderEdits(BaseModel):
    """Edits for one direction (``request`` or ``response``)."""

    model_config = ConfigDict(extra="forbid")

    add: dict[str, str] = {}
    append: dict[str, str] = {}
    remove: list[str] = []
    rename: dict[str, str] = {}

    @field_validator("add", "append")
    @classmethod
    def _values(cls, values: dict[str, str]) -> dict[str, str]:
        return {_name(name): _value(name, value) for name, value in values.items()}

    @field_validator("remove")
    @classmethod
    def _names(cls, values: list[str]) -> list[str]:
        return [_name(name) for name in values]

    @field_validator("rename")
    @classmethod
    def _renames(cls, values: dict[str, str]) -> dict[str, str]:
        return {_name(old): _name(new) for old, new in values.items()}

    @property
    def empty(self) -> bool:
        return not (self.add or self.append or self.remove or self.rename)

    def apply(self, headers: Headers) -> None:
        """Edit ``headers`` (lower-case names) in place, in the documented order."""
        if self.remove:
            drop = {name.encode("latin-1") for name in self.remove}
            headers[:] = [(h, v) for h, v in headers if h not in drop]
        for old, new in self.rename.items():
            old_b, new_b = old.encode("latin-1"), new.encode("latin-1")
            if any(h == old_b for h, _ in headers):
                headers[:] = [(new_b if h == old_b else h, v) for h, v in headers if h != new_b]
        for name, value in self.add.items():
            key = name.encode("latin-1")
            headers[:] = [(h, v) for h, v in headers if h != key]
            headers.append((key, value.encode("latin-1")))
        for name, value in self.append.items():
            headers.append((name.encode("latin-1"), value.encode("latin-1")))


class TransformConfig(BaseModel):
    """``transform`` plugin options."""

    model_config = ConfigDict(extra="forbid")

    request: HeaderEdits = HeaderEdits()
    response: HeaderEdits = HeaderEdits()
    #: Upstream path template, e.g. ``/v2/{rest}``; null keeps the route's path.
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/'")
        if any(c in value for c in " ?#\r\n\x00"):
            raise ValueError(f"{value!r} must be a path (no spaces, query or fragment)")
        stripped = _PARAM.sub("", value)
        if "{" in stripped or "}" in stripped:
            raise ValueError(f"{value!r} has a malformed {{parameter}}")
        return value


class TransformPlugin(Plugin):
    """Edits headers both ways and can rewrite the upstream path (see the module doc)."""

    metadata = PluginMetadata(
        name="transform",
        version="1.0.0",
        description="Adds, removes and renames headers; rewrites the upstream path.",
    )
    Config = TransformConfig
    config: TransformConfig

    def configure(self, config: BaseModel) -> None:
        super().configure(config)
        #: Route template → its ``{x:path}`` parameter names, learned per route once.
        self._path_params: dict[str, frozenset[str]] = {}

    async def on_request(self, ctx: RequestContext) -> Response | None:
        c = self.config
        if not c.request.empty:
            c.request.apply(ctx.request_headers)
        if c.path is not None:
            filled = self._fill(ctx)
            if filled is None:
                return Response.error(
                    500,
                    "misconfigured",
                    f"transform path {c.path!r} uses a parameter route "
                    f"{ctx.route_name!r} does not define",
                    ctx.request_id,
                )
            ctx.upstream_path = filled
        return None

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        if not self.config.response.empty:
            self.config.response.apply(response.headers)

    def _fill(self, ctx: RequestContext) -> str | None:
        template = self.config.path
        assert template is not None
        path_params = self._path_params.get(ctx.route_path)
        if path_params is None:
            path_params = frozenset(_PATH_PARAM.findall(ctx.route_path))
            self._path_params[ctx.route_path] = path_params
        missing: list[str] = []

        def replace(found: re.Match[str]) -> str:
            slash, name = found.group(1) or "", found.group(2)
            if name not in ctx.params:
                missing.append(name)
                return ""
            value = ctx.params[name] or ""
            is_path = name in path_params or found.group(3) is not None
            if is_path and not value:
                return ""  # /files/{rest} with nothing in rest is /files, not /files/
            return slash + quote(value, safe=_PATH_SAFE if is_path else _SEGMENT_SAFE)

        filled = _PARAM.sub(replace, template)
        if missing:
            log.error(
                "transform path template uses an unknown parameter",
                extra={"route": ctx.route_name, "parameter": missing[0], "template": template},
            )
            return None
        return filled or "/"


PLUGIN = TransformPlugin
