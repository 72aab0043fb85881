"""Configuration that is valid but asks for features the gateway lacks so far.

The schema describes the whole product; the runtime catches up feature by
feature.  Starting with such a config would silently ignore part of it, which is
worse than refusing, so the loader refuses with these messages.  When a feature
lands, delete its rows from :data:`UNSUPPORTED`; nothing else changes.

A row is ``(key path pattern, predicate on the value there, message)``.  In the
pattern ``*`` matches every key of a mapping (upstream names) and ``[*]`` every
item of a list.  The message may use ``{value}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from settings.paths import KeyPath, format_path

if TYPE_CHECKING:
    from settings.models import Settings

__all__ = ["UNSUPPORTED", "find_unsupported", "unsupported_features"]

Predicate = Callable[[Any], bool]

_SUPPORTED_BACKENDS = (
    None,
    "file",
    "static",
    "etcd",
    "redis",
    "dns",
    "consul",
    "kubernetes",
    "eureka",
)
_SUPPORTED_BALANCERS = (None, "round-robin", "weighted")


def _is_set(value: Any) -> bool:
    return value is not None


def _backend_unsupported(value: Any) -> bool:
    return value not in _SUPPORTED_BACKENDS


def _balancer_unsupported(value: Any) -> bool:
    return value not in _SUPPORTED_BALANCERS


UNSUPPORTED: list[tuple[str, Predicate, str]] = [
    ("discovery.backend", _backend_unsupported, "discovery backend {value!r} is not supported yet"),
    (
        "discovery.backends[*].backend",
        _backend_unsupported,
        "discovery backend {value!r} is not supported yet",
    ),
    ("tls.client_ca", _is_set, "client certificate verification is not supported yet"),
]

_EACH_KEY = object()
_EACH_ITEM = object()


def _tokens(pattern: str) -> list[object]:
    """Split a pattern: ``a.*.b[*].c`` → ``["a", EACH_KEY, "b", EACH_ITEM, "c"]``."""
    tokens: list[object] = []
    for part in pattern.split("."):
        name = part.replace("[*]", "")
        tokens.append(_EACH_KEY if name == "*" else name)
        tokens.extend([_EACH_ITEM] * part.count("[*]"))
    return tokens


def _walk(data: Any, tokens: list[object], path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Every ``(path, value)`` in ``data`` that the pattern tokens reach."""
    if not tokens:
        yield path, data
        return
    head, rest = tokens[0], tokens[1:]
    if head is _EACH_KEY and isinstance(data, dict):
        for key, value in data.items():
            yield from _walk(value, rest, (*path, key))
    elif head is _EACH_ITEM and isinstance(data, list):
        for index, value in enumerate(data):
            yield from _walk(value, rest, (*path, index))
    elif isinstance(head, str) and isinstance(data, dict) and head in data:
        yield from _walk(data[head], rest, (*path, head))


def find_unsupported(settings: Settings) -> list[tuple[KeyPath, str]]:
    """``(key path, message)`` for every unsupported feature ``settings`` uses."""
    data = settings.model_dump()
    found: list[tuple[KeyPath, str]] = []
    for pattern, predicate, message in UNSUPPORTED:
        for path, value in _walk(data, _tokens(pattern)):
            if predicate(value):
                found.append((path, message.format(value=value)))
    return found


def unsupported_features(settings: Settings) -> list[str]:
    """Messages like ``tls.client_ca: client certificate verification is not supported yet``."""
    return [f"{format_path(path)}: {message}" for path, message in find_unsupported(settings)]
