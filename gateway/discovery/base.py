"""What every discovery backend provides.

A backend turns its source into a stream of *snapshots*: the complete current list of
instances, each with its FARP manifest when the source carries one, and its metadata.
Whole snapshots (not deltas) keep the consumer simple and make a missed event harmless.
Backends with a KV store also serve ``registry`` schema locations through ``read_key``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DiscoveredInstance:
    """One instance as a backend sees it. ``key`` identifies its source (a file, a KV key)
    so that a broken update can fall back to the last good version from the same place."""

    key: str
    manifest: dict[str, Any] | None
    address: str | None = None
    service_name: str | None = None
    instance_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class DiscoveryBackend(ABC):
    """Base of every backend; ``state`` and ``last_sync`` feed ``/_/services``."""

    name = "base"

    def __init__(self) -> None:
        self.state = "starting"
        self.last_sync: float | None = None
        self.last_error: str | None = None

    @abstractmethod
    def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        """Yield a full snapshot at start and after every change."""

    async def read_key(self, path: str) -> bytes | None:
        """Read a KV entry (``registry`` schema locations); None when absent or no KV."""
        return None

    async def close(self) -> None:
        """Release connections; the watch loop is cancelled separately."""
        return None

    def synced(self) -> None:
        self.state = "synced"
        self.last_sync = time.time()
        self.last_error = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "state": self.state,
            "last_sync": self.last_sync,
            "last_error": self.last_error,
        }
