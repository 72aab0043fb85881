"""``load_settings``: from a file, a dict or the embedded default to :class:`Settings`.

The order of operations is the contract:

1. read the source (YAML/JSON text keeps the line of every key);
2. expand ``${VAR}`` references in string values;
3. apply ``OCTOPUS_*`` environment overrides;
4. validate with the pydantic models;
5. refuse features that are valid but not implemented yet.

Each step collects every problem it finds and stops the load with one
:class:`ConfigError` listing them, each located as ``file:line: key.path: ...``
(or ``env OCTOPUS_X`` / ``<dict>``), so a user fixes a config in one round trip.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from settings.errors import ConfigError
from settings.messages import format_validation_error
from settings.models import Settings
from settings.overrides import apply_overrides
from settings.paths import KeyPath, Locations
from settings.substitution import substitute_tree
from settings.unsupported import find_unsupported
from settings.yaml_lines import YamlLoadError, load_document

__all__ = ["DEFAULT_CONFIG_NAME", "DEFAULT_CONFIG_YAML", "load_settings"]

#: Name used in messages for the embedded default.
DEFAULT_CONFIG_NAME = "<default>"
#: The embedded default configuration (``settings/default.yaml``).
DEFAULT_CONFIG_YAML: str = (
    resources.files("settings").joinpath("default.yaml").read_text(encoding="utf-8")
)

Source = str | os.PathLike[str] | Mapping[str, Any] | Settings | None


@dataclass
class _Raw:
    """Unvalidated data plus what is needed to report problems in it."""

    data: Any
    locations: Locations
    #: Paths whose string values were quoted in YAML and must stay strings.
    quoted: set[KeyPath] = field(default_factory=set)
    problems: list[tuple[KeyPath, str]] = field(default_factory=list)


def load_settings(source: Source = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load, substitute, override and validate a configuration.

    Args:
        source: ``None`` for the embedded default; a path (str or Path) of a YAML or
            JSON file (JSON by the ``.json`` extension, YAML otherwise); a dict of
            the YAML shape; or a :class:`Settings`, which is returned unchanged.
        env: variables for ``${VAR}`` and ``OCTOPUS_*`` overrides; defaults to
            ``os.environ``.

    Raises:
        ConfigError: listing every problem found, one located line each.
        TypeError: if ``source`` is none of the above.
    """
    if isinstance(source, Settings):
        return source
    environ: Mapping[str, str] = os.environ if env is None else env
    raw = _read(source)
    errors = [raw.locations.describe(path, message) for path, message in raw.problems]

    data, problems = substitute_tree(raw.data, environ, may_retype=lambda p: p not in raw.quoted)
    errors += [raw.locations.describe(path, message) for path, message in problems]
    if errors:
        raise ConfigError(errors)

    errors = apply_overrides(data, environ, raw.locations)
    if errors:
        raise ConfigError(errors)

    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, raw.locations, Settings)) from None

    unsupported = sorted(find_unsupported(settings), key=lambda i: raw.locations.position(i[0]))
    if unsupported:
        raise ConfigError(raw.locations.describe(path, message) for path, message in unsupported)

    settings._source = raw.locations.origin
    return settings


def _read(source: Source) -> _Raw:
    """Turn any accepted source into a mapping plus its locations."""
    if source is None:
        raw = _parse(DEFAULT_CONFIG_YAML, DEFAULT_CONFIG_NAME, json=False)
    elif isinstance(source, Mapping):
        # Deep copy: overrides and substitution must never touch the caller's dict.
        raw = _Raw(copy.deepcopy(dict(source)), Locations("<dict>"))
    elif isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        try:
            text = Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read config file: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{name}: config file is not UTF-8 text ({exc.reason})") from None
        raw = _parse(text, name, json=Path(name).suffix.lower() == ".json")
    else:
        raise TypeError(
            "load_settings() source must be None, a path, a dict or a Settings, "
            f"not {type(source).__name__}"
        )
    if raw.data is None:  # an empty file: every default applies
        raw.data = {}
    if not isinstance(raw.data, dict):
        raise ConfigError(
            f"{raw.locations.origin}: the top level must be a mapping of sections "
            f"(server:, upstreams:, routes:, ...), not a {type(raw.data).__name__}"
        )
    return raw


def _parse(text: str, name: str, *, json: bool) -> _Raw:
    try:
        doc = load_document(text, json=json)
    except YamlLoadError as exc:
        where = name if exc.line is None else f"{name}:{exc.line}"
        kind = "JSON" if json else "YAML"
        hint = _flow_hint(text, exc) if not json else ""
        raise ConfigError(f"{where}: invalid {kind}: {exc.problem}{hint}") from None
    # In JSON every string is quoted, so quoting cannot signal "keep as string";
    # whole-value substitutions there are always re-typed.
    quoted = set() if json else doc.quoted
    return _Raw(doc.data, Locations.from_lines(name, doc.lines), quoted, doc.problems)


def _flow_hint(text: str, exc: YamlLoadError) -> str:
    """Explain the classic trap: ``{path: /users/{id}}`` or ``{secret: ${X}}``.

    Braces are flow-collection syntax in YAML, so inside ``{...}``/``[...]`` a
    value containing them must be quoted; PyYAML's own message does not say so.
    """
    lines = text.splitlines()
    if exc.line is None or not 0 < exc.line <= len(lines) or "flow" not in exc.problem:
        return ""
    if "{" not in lines[exc.line - 1]:
        return ""
    return '; inside {...} or [...] quote values that contain braces, e.g. "/users/{id}"'
