"""The ``static`` backend: manifests written inline in the configuration."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from gateway.discovery.base import DiscoveredInstance, DiscoveryBackend


class StaticBackend(DiscoveryBackend):
    name = "static"

    def __init__(self, manifests: list[dict[str, Any]]) -> None:
        super().__init__()
        self.manifests = manifests

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        snapshot = [
            DiscoveredInstance(key=f"static[{index}]", manifest=manifest)
            for index, manifest in enumerate(self.manifests)
        ]
        self.synced()
        yield snapshot
