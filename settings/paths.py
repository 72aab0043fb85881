"""Key paths and where they came from, shared by the loader's error reporting.

A key path is the tuple of mapping keys and list indexes leading to a value, the
same shape as a pydantic error ``loc``; that is what lets a validation error be
traced back to the file line (or environment variable) that produced it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["KeyPath", "Locations", "format_path"]

KeyPath = tuple[str | int, ...]

# Sort position of override locations: overrides are applied after the file, so
# their problems are listed after the file's.
_AFTER_FILE = 1 << 30

# Keys that can be printed bare after a dot; anything else is shown as ['...'] so
# an upstream called ``api.v1`` cannot be confused with a nested key.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def format_path(path: KeyPath) -> str:
    """Render ``("routes", 0, "match", "path")`` as ``routes[0].match.path``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out.append(f"[{part}]")
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{str(part)!r}]")
    return "".join(out)


class Locations:
    """Maps key paths to a human location such as ``config.yaml:12``.

    Only some paths have a known location (keys present in a file, variables that
    set overrides); a path without one is reported at its nearest ancestor that
    has one, which for a missing required key is the block it is missing from.
    """

    def __init__(self, origin: str) -> None:
        #: Name used when nothing more precise is known, e.g. ``config.yaml`` or ``<dict>``.
        self.origin = origin
        # path -> (sort position, location text); positions order errors like the file.
        self._known: dict[KeyPath, tuple[int, str]] = {}

    @classmethod
    def from_lines(cls, origin: str, lines: Mapping[KeyPath, int]) -> Locations:
        """Build from the 1-based line numbers a YAML document recorded."""
        locations = cls(origin)
        locations._known = {path: (line, f"{origin}:{line}") for path, line in lines.items()}
        return locations

    def set(self, path: KeyPath, where: str) -> None:
        """Record that ``path`` (and everything under it) now comes from ``where``.

        Entries below ``path`` are dropped: when an override replaces a whole block,
        the file lines inside the old block no longer describe anything.
        """
        depth = len(path)
        for known in [p for p in self._known if len(p) > depth and p[:depth] == path]:
            del self._known[known]
        self._known[path] = (_AFTER_FILE, where)

    def _nearest(self, path: KeyPath) -> tuple[int, str]:
        for end in range(len(path), -1, -1):
            found = self._known.get(tuple(path[:end]))
            if found is not None:
                return found
        return 0, self.origin

    def where(self, path: KeyPath) -> str:
        """Return the location of ``path`` or of its nearest located ancestor."""
        return self._nearest(path)[1]

    def position(self, path: KeyPath) -> int:
        """A sort key putting problems in file order (overrides after the file)."""
        return self._nearest(path)[0]

    def describe(self, path: KeyPath, message: str) -> str:
        """Format one error line: ``where: dotted.path: message``."""
        dotted = format_path(path)
        if dotted:
            return f"{self.where(path)}: {dotted}: {message}"
        return f"{self.where(path)}: {message}"
