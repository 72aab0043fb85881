"""The ``file`` backend: ``*.json``/``*.yaml`` manifests in a directory, watched by polling.

Polling (by modification time, size and inode) needs nothing from the platform and catches
editors that replace files. A file that does not parse is logged once per change and
its last good content stays in the snapshot, so a half-saved file never drops routes.
A file may hold one manifest or a list of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from gateway.discovery.base import DiscoveredInstance, DiscoveryBackend

log = logging.getLogger("octopus.discovery.file")

SUFFIXES = (".json", ".yaml", ".yml")


class FileBackend(DiscoveryBackend):
    name = "file"

    def __init__(self, path: str | Path, interval: float = 5.0) -> None:
        super().__init__()
        self.path = Path(path)
        self.interval = interval
        self._stamps: dict[Path, tuple[int, int, int]] = {}
        self._contents: dict[Path, list[Any]] = {}
        self.rejected = 0

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        first = True
        while True:
            changed = await asyncio.to_thread(self._scan)
            if changed or first:
                first = False
                self.synced()
                yield self._snapshot()
            await asyncio.sleep(self.interval)

    def _scan(self) -> bool:
        """Re-read changed files; True when the set of manifests may have changed."""
        if not self.path.is_dir():
            changed = bool(self._stamps)
            self._stamps.clear()
            self._contents.clear()
            return changed
        seen: dict[Path, tuple[int, int, int]] = {}
        for file in sorted(self.path.iterdir()):
            if file.suffix.lower() not in SUFFIXES or not file.is_file():
                continue
            try:
                stat = file.stat()
            except OSError:
                continue
            # The inode too: an atomic replace (write elsewhere, rename over) within the
            # file system's timestamp granularity, keeping the size, is still a change.
            seen[file] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        changed = set(seen) != set(self._stamps)
        for file, stamp in seen.items():
            if self._stamps.get(file) == stamp:
                continue
            changed = True
            try:
                documents = self._read(file)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                self.rejected += 1
                log.warning(
                    "manifest file rejected, keeping its last good content",
                    extra={"file": str(file), "reason": str(exc)},
                )
            else:
                self._contents[file] = documents
        for gone in set(self._stamps) - set(seen):
            self._contents.pop(gone, None)
        self._stamps = seen
        return changed

    @staticmethod
    def _read(file: Path) -> list[Any]:
        text = file.read_text(encoding="utf-8")
        document = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
        if document is None:
            return []
        return document if isinstance(document, list) else [document]

    def _snapshot(self) -> list[DiscoveredInstance]:
        snapshot = []
        for file, documents in sorted(self._contents.items()):
            for index, document in enumerate(documents):
                key = str(file) if len(documents) == 1 else f"{file}#{index}"
                snapshot.append(
                    DiscoveredInstance(
                        key=key, manifest=document if isinstance(document, dict) else None
                    )
                )
        return snapshot
