"""What the backends that talk to a server (etcd, Redis, DNS) share: outage handling
and the decoding of manifests stored as values.

A registry that goes away must not take the routes with it: the backend keeps its last
good snapshot (it simply yields nothing new), retries with capped exponential backoff
and jitter so that a fleet of gateways does not hammer a recovering server in lockstep,
and logs once when it enters the outage and once when it leaves it, however many
retries happen in between. ``state``/``last_error`` and the counters below are what the
admin API and the metrics read.

Stored manifests are decoded by :class:`ManifestValues`, which keeps the last good
document of every key: a publisher that writes a truncated value must not drop the
instance's routes, exactly as a half-saved file does not with the ``file`` backend.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import time
import zlib
from collections.abc import Callable
from typing import Any

from gateway.discovery.base import DiscoveryBackend

log = logging.getLogger("octopus.discovery")

#: ``state`` while the source cannot be reached; the last good snapshot stays in use.
UNAVAILABLE = "unavailable"


class Backoff:
    """Capped exponential backoff with "equal jitter": each delay is drawn from the upper
    half of the current step, so waits still grow (unlike full jitter, which may retry at
    once) while gateways started together spread out."""

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 30.0,
        factor: float = 2.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._rng = rng
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt (and count this failure)."""
        step = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        return step / 2 + self._rng() * step / 2

    def reset(self) -> None:
        """After a success the next outage starts again from the shortest delay."""
        self.attempts = 0


class ResilientBackend(DiscoveryBackend):
    """A backend with a remote source: outage bookkeeping on top of :class:`DiscoveryBackend`.

    Counters (monotonic, for metrics): ``failures`` every failed attempt, ``outages``
    every transition into :data:`UNAVAILABLE`, ``relists`` every full re-list forced by a
    missed watch window (etcd compaction, a pub/sub reconnect).
    """

    def __init__(self, *, backoff_initial: float = 0.1, backoff_max: float = 30.0) -> None:
        super().__init__()
        self.backoff = Backoff(backoff_initial, backoff_max)
        self.failures = 0
        self.outages = 0
        self.relists = 0
        self._down_since: float | None = None

    def failed(self, exc: BaseException, doing: str) -> float:
        """Record a failed attempt at ``doing``; return how long to wait before retrying.

        Logged only on the transition into the outage: a server down for an hour must not
        produce a warning per retry.
        """
        self.failures += 1
        reason = str(exc) or type(exc).__name__
        self.last_error = f"{doing}: {reason}"
        if self.state != UNAVAILABLE:
            self.outages += 1
            self._down_since = time.monotonic()
            log.warning(
                "discovery backend unavailable, keeping the last good snapshot",
                extra={"backend": self.name, "error": self.last_error},
            )
        self.state = UNAVAILABLE
        return self.backoff.next()

    def recovered(self) -> None:
        """The source answered a full listing: leave the outage (logged once) and reset
        the backoff."""
        if self.state == UNAVAILABLE:
            downtime = time.monotonic() - (self._down_since or time.monotonic())
            log.info(
                "discovery backend recovered",
                extra={
                    "backend": self.name,
                    "downtime_s": round(downtime, 3),
                    "retries": self.backoff.attempts,
                },
            )
        self._down_since = None
        self.backoff.reset()
        self.synced()


GZIP_MAGIC = b"\x1f\x8b"


def decode_stored(raw: bytes) -> bytes:
    """A stored value, gunzipped when it is gzip data (FARP.md §5 allows large manifests
    and schemas to be stored gzipped; the magic bytes tell, whatever the key says)."""
    if raw[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"corrupt gzip data: {exc}") from None
    return raw


def parse_stored_manifest(raw: bytes) -> dict[str, Any]:
    """A manifest document from a stored value (JSON, possibly gzipped)."""
    data = decode_stored(raw)
    document = json.loads(data.decode("utf-8"))
    if not isinstance(document, dict):
        raise ValueError("a manifest must be a JSON object")
    return document


class ManifestValues:
    """Decoded manifests by instance key, each falling back to its last good document.

    ``decode(key, candidates)`` takes the raw values that may hold the instance's manifest
    in order of preference (etcd: the ``.gz`` key first) and returns the first that
    decodes; when none does, the document last decoded for ``key`` (or None if there never
    was one). A bad value is logged once per distinct content, not on every re-list.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.rejected = 0
        self._good: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self._bad: dict[str, str] = {}

    def decode(self, key: str, candidates: list[bytes]) -> dict[str, Any] | None:
        errors = []
        for raw in candidates:
            known = self._good.get(key)
            if known is not None and known[0] == raw:
                self._bad.pop(key, None)
                return known[1]
            try:
                document = parse_stored_manifest(raw)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
                errors.append(str(exc))
                continue
            self._good[key] = (raw, document)
            self._bad.pop(key, None)
            return document
        mark = hashlib.sha256(b"".join(candidates)).hexdigest()
        if self._bad.get(key) != mark:
            self._bad[key] = mark
            self.rejected += 1
            log.warning(
                "stored manifest does not decode, keeping its last good version",
                extra={"backend": self.backend, "key": key, "reason": "; ".join(errors)},
            )
        known = self._good.get(key)
        return known[1] if known is not None else None

    def retain(self, keys: set[str]) -> None:
        """Forget instances that left, so a later registration under the same key does
        not resurrect an old document."""
        self._good = {k: v for k, v in self._good.items() if k in keys}
        self._bad = {k: v for k, v in self._bad.items() if k in keys}
