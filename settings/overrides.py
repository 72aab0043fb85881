"""``OCTOPUS_<KEY>__<SUBKEY>`` environment overrides.

Containers and CI set a port or a log level without editing files; the variable
name is the upper-cased key path joined by ``__`` (``OCTOPUS_SERVER__HTTP_PORT``).
Overrides are applied to the raw data before validation, so a bad value or an
unknown key gets the same checks as in a file, and the loader reports it
against the variable (``env OCTOPUS_SERVER__HTTP_PORT``).

Values are YAML: ``8081`` is an int, ``true`` a bool, ``[a, b]`` a list.  A
numeric path part indexes a list (``OCTOPUS_ROUTES__0__TIMEOUT=5s``).  Key parts
match existing keys case-insensitively, so ``OCTOPUS_UPSTREAMS__USERS__...``
reaches an upstream written ``Users``; new keys are created lower-case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from settings.paths import KeyPath, Locations, format_path
from settings.yaml_lines import YamlLoadError, parse_flow_value, resolve_plain_scalar

__all__ = ["NOT_OVERRIDES", "PREFIX", "apply_overrides", "parse_override_value"]

PREFIX = "OCTOPUS_"
#: ``OCTOPUS_*`` variables that are not key overrides.  ``OCTOPUS_CONFIG`` names
#: the config file and is read by the entry points, not here.
NOT_OVERRIDES = frozenset({"OCTOPUS_CONFIG"})


@dataclass(frozen=True)
class _Override:
    variable: str
    parts: tuple[str, ...]
    raw: str


def parse_override_value(text: str) -> Any:
    """Type an override value the way YAML would type it after ``key: ``.

    Values starting with a bracket or quote are parsed as YAML flow syntax; all
    others are resolved as a plain scalar only, so ``a#b`` or ``x: y`` stay the
    literal strings a shell user meant.

    Raises:
        ValueError: if bracketed/quoted text is not valid YAML.
    """
    stripped = text.strip()
    if stripped[:1] in ("[", "{", '"', "'"):
        try:
            return parse_flow_value(stripped)
        except YamlLoadError as exc:
            raise ValueError(f"not a valid YAML value: {exc.problem}") from None
    value = resolve_plain_scalar(stripped)
    return text if isinstance(value, str) else value


def _collect(env: Mapping[str, str]) -> list[_Override]:
    overrides = [
        _Override(name, tuple(name[len(PREFIX) :].split("__")), value)
        for name, value in env.items()
        if name.startswith(PREFIX) and name not in NOT_OVERRIDES
    ]
    # Sorted, so OCTOPUS_SERVER (a whole block) lands before OCTOPUS_SERVER__HTTP_PORT.
    return sorted(overrides, key=lambda override: override.variable)


def apply_overrides(
    data: dict[Any, Any], env: Mapping[str, str], locations: Locations
) -> list[str]:
    """Apply every ``OCTOPUS_*`` variable of ``env`` to ``data`` in place.

    Each path set or created is recorded in ``locations`` as ``env NAME`` so later
    validation errors point at the variable.

    Returns:
        Formatted error lines for variables that could not be applied.
    """
    errors: list[str] = []
    for override in _collect(env):
        where = f"env {override.variable}"
        if not all(override.parts):
            errors.append(
                f"{where}: malformed override name (use OCTOPUS_SECTION__KEY, "
                "parts joined by double underscores)"
            )
            continue
        try:
            value = parse_override_value(override.raw)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            continue
        problem = _set(data, override.parts, value, where, locations)
        if problem:
            errors.append(f"{where}: {problem}")
    return errors


def _set(
    data: dict[Any, Any],
    parts: tuple[str, ...],
    value: Any,
    where: str,
    locations: Locations,
) -> str | None:
    """Set ``value`` at the path named by ``parts``; return a problem or ``None``."""
    container: Any = data
    path: KeyPath = ()
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        if isinstance(container, dict):
            key = _existing_key(container, part)
            path = (*path, key)
            if last:
                container[key] = value
                locations.set(path, where)
                return None
            if not isinstance(container.get(key), dict | list):
                if container.get(key) is not None:
                    return f"cannot set a key below {format_path(path)}: it is not a mapping"
                container[key] = {}
                locations.set(path, where)
            container = container[key]
        elif isinstance(container, list):
            if not part.isdigit() or int(part) >= len(container):
                return (
                    f"{format_path(path)} is a list of {len(container)} item(s); "
                    f"{part.lower()!r} is not a valid index"
                )
            index = int(part)
            path = (*path, index)
            if last:
                container[index] = value
                locations.set(path, where)
                return None
            container = container[index]
        else:  # pragma: no cover - the dict branch never leaves a scalar container
            return f"cannot set a key below {format_path(path)}"
    return None


def _existing_key(mapping: dict[Any, Any], part: str) -> Any:
    """The key of ``mapping`` that ``part`` names, matching case-insensitively."""
    lowered = part.lower()
    for key in mapping:
        if isinstance(key, str) and key.lower() == lowered:
            return key
    return lowered
