"""Turning pydantic validation errors into the gateway's one-line messages.

pydantic's wording is written for Python programmers (``Extra inputs are not
permitted``, ``Input should be a valid dictionary or instance of X``); config
authors need ``unknown key (did you mean 'http_port'?)``.  This module owns that
translation so the loader only deals with files and order of operations.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from settings.fields import LOCATED_ERROR
from settings.paths import KeyPath, Locations
from settings.redaction import is_secret_key

__all__ = ["format_validation_error"]

_PREFIXES = ("Value error, ", "Assertion failed, ")
# Shown the way the user wrote them in YAML, not as Python reprs.
_YAML_WORDS: dict[object, str] = {None: "null", True: "true", False: "false"}
_MAPPING_TYPES = {"model_type", "model_attributes_type", "dict_type", "dataclass_type"}


def format_validation_error(
    exc: ValidationError, locations: Locations, root: type[BaseModel]
) -> list[str]:
    """One located line per problem in ``exc`` (validated against ``root``)."""
    located: list[tuple[KeyPath, str]] = []
    for error in exc.errors(include_url=False):
        loc: KeyPath = tuple(error["loc"])
        if error["type"] == LOCATED_ERROR:
            located += [((*loc, *sub), message) for sub, message in error["ctx"]["issues"]]
        else:
            located.append((loc, _message(error, loc, root)))
    # pydantic reports in schema order; users read and fix in file order (stable sort).
    located.sort(key=lambda item: locations.position(item[0]))
    lines = [locations.describe(path, message) for path, message in located]
    return list(dict.fromkeys(lines))  # unions can repeat an error; keep the first


def _message(error: Any, loc: KeyPath, root: type[BaseModel]) -> str:
    kind: str = error["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(loc, root)
    if kind in _MAPPING_TYPES:
        return f"expected a mapping{_got(error, loc)}"
    if kind == "list_type":
        return f"expected a list{_got(error, loc)}"
    message: str = error["msg"]
    for prefix in _PREFIXES:
        if message.startswith(prefix):
            # Our own validators already name the value where that helps.
            return message[len(prefix) :]
    return message[:1].lower() + message[1:] + _got(error, loc)


def _got(error: Any, loc: KeyPath) -> str:
    """`` (got 'x')`` for scalar inputs, never for secrets."""
    value = error.get("input")
    if loc and is_secret_key(loc[-1], loc[-2] if len(loc) > 1 else None):
        return ""
    if value is None or isinstance(value, bool):
        return f" (got {_YAML_WORDS[value]})"
    if isinstance(value, str | int | float):
        shown = repr(value)
        return f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return f" (got a {_kind_name(value)})"


def _kind_name(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _suggestion(loc: KeyPath, root: type[BaseModel]) -> str:
    """`` (did you mean 'x'?)`` when the unknown key is a near miss of a real one."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    fields = _fields_at(loc[:-1], root)
    close = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(path: KeyPath, root: type[BaseModel]) -> list[str]:
    """Field names of the model found at ``path`` below ``root`` (empty if none)."""
    annotation: Any = root
    for part in path:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            annotation = field.annotation
        elif get_origin(annotation) is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict and isinstance(part, str):
            annotation = get_args(annotation)[1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated[...]`` and ``X | None`` down to ``X``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation
