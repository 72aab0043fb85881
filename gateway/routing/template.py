"""Path templates: ``/users/{id}`` (one segment) and a trailing ``/files/{rest:path}``.

A template is compiled once, when the routing table is built, into a regex and a
specificity key; requests only run the regex.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}$")

_INLINE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

STATIC, PARAM, REST = 2, 1, 0


class TemplateError(ValueError):
    """A path template that cannot be compiled."""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled path template."""

    template: str
    regex: re.Pattern[str] | None  # None when the template is fully static
    specificity: tuple[int, ...]  # one entry per segment: 2 static, 1 param, 0 rest
    literal_prefix: str  # the text before the first "{", used by strip_prefix
    first_segment: str | None  # the first segment when it is static (index key)

    @property
    def is_static(self) -> bool:
        return self.regex is None

    def match(self, path: str) -> dict[str, str] | None:
        """The parameters if ``path`` matches, else None."""
        if self.regex is None:
            return {} if path == self.template else None
        found = self.regex.fullmatch(path)
        return found.groupdict() if found else None


def compile_template(template: str) -> PathTemplate:
    """Compile ``template``; raise TemplateError naming what is wrong."""
    if not template.startswith("/"):
        raise TemplateError(f"path template {template!r} must start with '/'")
    segments = template.split("/")[1:]
    pattern: list[str] = []
    specificity: list[int] = []
    names: set[str] = set()
    for index, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            pattern.append("/" + re.escape(segment))
            specificity.append(STATIC)
            continue
        found = _PARAM.match(segment)
        if not found and _INLINE.search(segment) and ":" not in segment:
            # A parameter inside literal text, as OpenAPI allows: /files/{name}.json
            pattern.append("/" + _inline_segment(segment, template, names))
            specificity.append(PARAM)
            continue
        if not found:
            raise TemplateError(
                f"path template {template!r}: segment {segment!r} must be literal text, "
                "'{name}' or a final '{name:path}'"
            )
        name, kind = found.group(1), found.group(2)
        if name in names:
            raise TemplateError(f"path template {template!r}: parameter {name!r} repeats")
        names.add(name)
        if kind == "path":
            if index != len(segments) - 1:
                raise TemplateError(
                    f"path template {template!r}: '{{{name}:path}}' must be the last segment"
                )
            # The rest may be empty: /files/{rest:path} matches /files/ and /files.
            pattern.append(f"(?:/(?P<{name}>.*))?")
            specificity.append(REST)
        else:
            pattern.append(f"/(?P<{name}>[^/]+)")
            specificity.append(PARAM)
    brace = template.find("{")
    literal_prefix = template if brace < 0 else template[:brace]
    first = segments[0] if segments and specificity[0] == STATIC else None
    regex = None if all(s == STATIC for s in specificity) else re.compile("".join(pattern))
    return PathTemplate(template, regex, tuple(specificity), literal_prefix, first)


def _inline_segment(segment: str, template: str, names: set[str]) -> str:
    out: list[str] = []
    position = 0
    for found in _INLINE.finditer(segment):
        out.append(re.escape(segment[position : found.start()]))
        name = found.group(1)
        if name in names:
            raise TemplateError(f"path template {template!r}: parameter {name!r} repeats")
        names.add(name)
        out.append(f"(?P<{name}>[^/]+?)")
        position = found.end()
    rest = segment[position:]
    if "{" in rest or "}" in rest:
        raise TemplateError(f"path template {template!r}: unbalanced braces in {segment!r}")
    out.append(re.escape(rest))
    return "".join(out)


def fill_template(template: str, params: dict[str, str | None]) -> str:
    """``template`` with its parameters replaced by ``params`` (percent-encoded).

    A ``{rest:path}`` that matched nothing (``/files`` for ``/files/{rest:path}``) takes
    its leading slash with it.
    """

    def replace(found: re.Match[str]) -> str:
        slash, name, kind = found.group(1) or "", found.group(2), found.group(3)
        value = params.get(name)
        if value is None and kind:
            return ""
        safe = "/:@!$&'()*+,;=-._~" if kind else ":@!$&'()*+,;=-._~"
        return slash + quote(value or "", safe=safe)

    return _ANY_PARAM.sub(replace, template) or "/"


_ANY_PARAM = re.compile(r"(/)?\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")
