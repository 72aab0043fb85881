"""The one exception type configuration problems are reported with.

Start-up code, ``octopus validate`` and the tests all want the same thing from a
bad config: every problem at once, one per line, each saying where it is.  A
single exception carrying a list of ready-to-print lines gives them exactly that
without any of them having to know about pydantic or YAML.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """The configuration is unreadable, invalid, or asks for something unsupported.

    Attributes:
        errors: one line per problem, e.g.
            ``config.yaml:7: server.htp_port: unknown key``.
    """

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)
