"""Backends from configuration: ``discovery.backend`` or ``discovery.backends``."""

from __future__ import annotations

from typing import Any

from gateway.discovery.base import DiscoveryBackend
from gateway.discovery.file import FileBackend
from gateway.discovery.static import StaticBackend


def create_backends(settings: Any) -> list[DiscoveryBackend]:
    """One backend object per configured entry, in configuration order."""
    interval = settings.farp.watch_interval
    backends: list[DiscoveryBackend] = []
    for name, config in settings.discovery.entries():
        if name == "file":
            backends.append(FileBackend(config.path, interval=interval))
        elif name == "static":
            backends.append(StaticBackend(list(config.manifests)))
        else:  # settings refuses these with "not supported yet" until they land
            raise ValueError(f"discovery backend {name!r} is not supported yet")
    return backends
