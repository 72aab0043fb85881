"""``${VAR}`` and ``${VAR:-default}`` substitution in configuration values.

Secrets and per-environment addresses belong in the environment, not in the
file, so string values may refer to variables.  Rules:

* ``${NAME}`` is replaced by the variable; if it is unset that is an error.
* ``${NAME:-default}`` uses ``default`` when the variable is unset *or empty*
  (as in the shell); the default may itself contain ``${...}``.
* ``$${`` writes a literal ``${``.  A ``$`` not followed by ``{`` is left alone,
  which is what bcrypt hashes (``$2b$12$...``) need.
* A value that is *only* one substitution is re-typed like a YAML plain scalar
  afterwards (``port: ${PORT:-8080}`` gives the int 8080) unless the caller says
  the value was quoted in the source: quoting is how a YAML author keeps a string.

Only values are substituted, never keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from settings.paths import KeyPath
from settings.yaml_lines import resolve_plain_scalar

__all__ = ["SubstitutionError", "expand", "substitute_tree"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SubstitutionError(ValueError):
    """A reference could not be expanded (unset variable or bad syntax)."""


def expand(text: str, env: Mapping[str, str]) -> tuple[str, bool]:
    """Expand every reference in ``text``.

    Returns:
        The expanded text, and whether ``text`` consisted of exactly one
        ``${...}`` reference (the caller may then re-type the result).

    Raises:
        SubstitutionError: naming the unset variable or describing the bad syntax.
    """
    result, end, whole = _expand(text, 0, env, nested=False)
    assert end == len(text)
    return result, whole


def _expand(text: str, pos: int, env: Mapping[str, str], *, nested: bool) -> tuple[str, int, bool]:
    """Expand from ``pos``; inside a default (``nested``) stop at the closing brace.

    Returns the expansion, the index where scanning stopped (at the ``}`` when
    nested, else ``len(text)``) and whether the span was exactly one reference.
    """
    out: list[str] = []
    start = pos
    references = 0
    literal_text = False
    while pos < len(text):
        if text.startswith("$${", pos):
            out.append("${")
            literal_text = True
            pos += 3
        elif text.startswith("${", pos):
            value, pos = _reference(text, pos, env)
            out.append(value)
            references += 1
        elif nested and text[pos] == "}":
            break
        else:
            out.append(text[pos])
            literal_text = True
            pos += 1
    whole = references == 1 and not literal_text and pos > start
    return "".join(out), pos, whole


def _reference(text: str, pos: int, env: Mapping[str, str]) -> tuple[str, int]:
    """Expand the ``${...}`` starting at ``pos``; return it and the index after ``}``."""
    name_match = _NAME.match(text, pos + 2)
    if name_match is None:
        raise SubstitutionError(
            f"invalid variable reference at {text[pos : pos + 12]!r} "
            "(expected ${NAME} or ${NAME:-default}; write $${ for a literal ${)"
        )
    name = name_match.group()
    after = name_match.end()
    if text.startswith("}", after):
        if name not in env:
            raise SubstitutionError(
                f"environment variable {name} is not set "
                f"(set it, or give a default with ${{{name}:-default}})"
            )
        return env[name], after + 1
    if text.startswith(":-", after):
        default, end, _ = _expand(text, after + 2, env, nested=True)
        if end >= len(text):
            raise SubstitutionError(f"unterminated ${{{name}:-...}} (missing '}}')")
        value = env.get(name, "")
        return (value if value != "" else default), end + 1
    if after >= len(text):
        raise SubstitutionError(f"unterminated ${{{name}}} (missing '}}')")
    raise SubstitutionError(
        f"invalid variable reference ${{{name}{text[after]}...: "
        "only ${NAME} and ${NAME:-default} are supported"
    )


def substitute_tree(
    data: Any,
    env: Mapping[str, str],
    *,
    may_retype: Callable[[KeyPath], bool] = lambda path: True,
) -> tuple[Any, list[tuple[KeyPath, str]]]:
    """Return a copy of ``data`` with every string value expanded.

    Args:
        data: dicts, lists and scalars as loaded from YAML/JSON or given in Python.
        env: where variables are looked up.
        may_retype: says whether a whole-value substitution at a path may become a
            non-string (false for values the author quoted).

    Returns:
        The new data and a list of ``(path, message)`` problems; all problems are
        collected so the user can fix every missing variable in one go.
    """
    problems: list[tuple[KeyPath, str]] = []

    def walk(value: Any, path: KeyPath) -> Any:
        if isinstance(value, dict):
            return {key: walk(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item, (*path, index)) for index, item in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            try:
                expanded, whole = expand(value, env)
            except SubstitutionError as exc:
                problems.append((path, str(exc)))
                return value
            if whole and may_retype(path):
                return resolve_plain_scalar(expanded)
            return expanded
        return value

    return walk(data, ()), problems
