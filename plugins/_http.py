"""Small HTTP header helpers the built-in plugins share (not part of the plugin API).

Kept here rather than in each plugin because ``Vary`` handling must be identical
everywhere: two plugins that each "set" ``Vary`` would silently drop each other's
token and let caches serve a representation to the wrong client.
"""

from __future__ import annotations

import re

from plugins.api import Response

#: RFC 9110 ``token`` (field names, content codings).
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def split_list(value: str) -> list[str]:
    """The members of a comma-separated header value, stripped, empty ones dropped."""
    return [part.strip() for part in value.split(",") if part.strip()]


def header_list(response: Response, name: str) -> list[str]:
    """Every member of every ``name`` field (repeated fields are one list per RFC 9110)."""
    key = name.lower().encode("latin-1")
    members: list[str] = []
    for header, value in response.headers:
        if header == key:
            members.extend(split_list(value.decode("latin-1")))
    return members


def append_vary(response: Response, *names: str) -> None:
    """Add ``names`` to ``Vary`` without losing what is there (case-insensitive, once).

    ``Vary: *`` already says "varies on everything", so it is left alone.
    """
    present = header_list(response, "vary")
    if "*" in present:
        return
    lowered = {member.lower() for member in present}
    added = [name for name in names if name.lower() not in lowered]
    if not added:
        return
    response.set_header("vary", ", ".join([*present, *added]))


def is_token(value: str) -> bool:
    return bool(TOKEN.match(value))
