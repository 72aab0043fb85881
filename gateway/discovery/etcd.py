"""The ``etcd`` backend: FARP manifests under a key prefix of an etcd v3 cluster.

Layout (FARP.md §5): ``{prefix}/services/{service}/instances/{instance_id}/manifest``,
optionally gzipped under the same key plus ``.gz`` (read first); schemas of ``registry``
locations at ``{prefix}{registry_path}``.

It speaks etcd's gRPC-JSON gateway (``/v3/kv/range``, ``/v3/watch``,
``/v3/auth/authenticate``; etcd 3.4 and later) with httpx rather than a gRPC client
library: the Python etcd3 clients are unmaintained and pin old protobuf/grpc releases,
while the JSON gateway is part of every etcd server's client port and needs nothing
beyond the HTTP client the gateway already has. Keys and values are base64 in JSON and
64-bit numbers are strings.

Protocol: a range over the services prefix (paged, all pages at one revision), then a
watch from ``header.revision + 1``. Watch events update the state and each yields a
fresh snapshot. A watch that reports ``compact_revision`` (the events we need were
compacted away while we were not looking) triggers a clean re-list; so does any broken
connection, after a backoff. A watch idle for ``idle_timeout`` is re-opened from the
next revision, which catches silently dead connections without missing an event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gateway.discovery.base import DiscoveredInstance
from gateway.discovery.remote import ManifestValues, ResilientBackend, decode_stored

log = logging.getLogger("octopus.discovery.etcd")

#: Range page size: bounds the size of one answer when thousands of instances register.
PAGE = 500
#: A watch message longer than this is not an etcd watch response; refuse to buffer it.
MAX_MESSAGE = 64 * 1024 * 1024
#: gRPC UNAUTHENTICATED: the token expired (simple tokens die after --auth-token-ttl).
UNAUTHENTICATED = 16


class EtcdError(Exception):
    """An error answer of the etcd server (its gRPC ``code`` when it gave one)."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class Compacted(Exception):
    """The watch start revision was compacted: only a full re-list is correct now."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted up to {revision}")
        self.revision = revision


class _TokenRejected(EtcdError):
    """The auth token is no longer valid: authenticate again and retry once."""


def _b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix`` (etcd's rule:
    increment the last byte that is not 0xff, dropping the 0xff bytes after it)."""
    data = bytearray(prefix)
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data)
        data.pop()
    return b"\x00"  # every key


def _is_auth_failure(code: int | None, message: str) -> bool:
    text = message.lower()
    return code == UNAUTHENTICATED or "invalid auth token" in text or "user name is empty" in text


class EtcdBackend(ResilientBackend):
    """Manifests in etcd v3, listed then watched."""

    name = "etcd"

    def __init__(
        self,
        endpoints: list[str],
        prefix: str = "/farp",
        *,
        username: str | None = None,
        password: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = 5.0,
        idle_timeout: float = 30.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
    ) -> None:
        super().__init__(backoff_initial=backoff_initial, backoff_max=backoff_max)
        if not endpoints:
            raise ValueError("etcd discovery needs at least one endpoint")
        default_scheme = "https" if (ca or cert) else "http"
        self.endpoints = [
            (e if "://" in e else f"{default_scheme}://{e}").rstrip("/") for e in endpoints
        ]
        self.prefix = prefix.rstrip("/")
        self.username = username
        self.password = password
        self.ca = ca
        self.cert = cert
        self.key = key
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._services = f"{self.prefix}/services/".encode()
        self._pattern = re.compile(
            re.escape(self.prefix) + r"/services/([^/]+)/instances/([^/]+)/manifest(\.gz)?"
        )
        self._endpoint = 0
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        #: Raw values of the manifest keys, as of the last list plus the events since.
        self._values: dict[str, bytes] = {}
        self._manifests = ManifestValues(self.name)
        self._next_revision = 0

    @property
    def rejected(self) -> int:
        """Stored values that did not decode as a manifest (counted once each)."""
        return self._manifests.rejected

    # --- the stream of snapshots ---------------------------------------------------

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        last: list[DiscoveredInstance] | None = None
        while True:
            try:
                revision, values = await self._list()
            except Exception as exc:  # transport, TLS, auth, a malformed answer: all retried
                delay = self.failed(exc, f"list {self._base()}")
                self._rotate()
                await asyncio.sleep(delay)
                continue
            self._values = values
            self._next_revision = revision + 1
            snapshot = self._snapshot()
            if snapshot != last:
                last = snapshot
                yield snapshot
            try:
                # The outage ends when the watch is established, not at the listing: a
                # server that lists but refuses watches would otherwise flap between the
                # states (a log line each way) and reset the backoff on every retry.
                async with contextlib.aclosing(self._follow()) as follow:
                    async for snapshot in follow:
                        if snapshot != last:
                            last = snapshot
                            yield snapshot
            except Compacted as exc:
                # Not an outage: the server is fine, our window is gone. Re-list at once.
                self.relists += 1
                log.info(
                    "etcd watch window compacted, re-listing",
                    extra={"backend": self.name, "compact_revision": exc.revision},
                )
            except Exception as exc:  # never the end of discovery (cancellation is not one)
                delay = self.failed(exc, f"watch {self._base()}")
                self._rotate()
                await asyncio.sleep(delay)

    async def _follow(self) -> AsyncIterator[list[DiscoveredInstance]]:
        """Snapshots after each batch of events, re-opening the watch when it idles."""
        token_retried = False
        while True:
            try:
                async with contextlib.aclosing(self._watch_once()) as stream:
                    async for snapshot in stream:
                        token_retried = False
                        yield snapshot
            except httpx.ReadTimeout:
                # Idle for idle_timeout: re-open from the next revision. A dead connection
                # that never said so is found this way, and no event is lost.
                log.debug("etcd watch idle, re-opening", extra={"revision": self._next_revision})
                continue
            except _TokenRejected:
                if token_retried:
                    raise
                token_retried = True
                self._token = None
                continue
            # The server ended the stream cleanly (it does when shutting down).
            raise EtcdError(None, "watch stream closed by the server")

    async def _watch_once(self) -> AsyncIterator[list[DiscoveredInstance]]:
        request = {
            "create_request": {
                "key": _b64(self._services),
                "range_end": _b64(prefix_end(self._services)),
                "start_revision": str(self._next_revision),
                "progress_notify": True,
            }
        }
        timeout = httpx.Timeout(self.timeout, read=self.idle_timeout)
        headers = await self._auth_headers()
        client = self._http()
        url = self._base() + "/v3/watch"
        async with client.stream(
            "POST", url, json=request, headers=headers, timeout=timeout
        ) as response:
            if response.status_code != 200:
                await response.aread()
                self._check(response)
            async for message in _json_lines(response.aiter_bytes()):
                changed = self._apply(message)
                if message.get("result", message).get("created"):
                    self.recovered()  # listed and watching: in sync (logged if it was down)
                else:
                    self.synced()
                if changed:
                    yield self._snapshot()

    def _apply(self, message: dict[str, Any]) -> bool:
        """Apply one watch response; True when a manifest key changed."""
        error = message.get("error")
        if error:
            if isinstance(error, dict):  # newer gateways wrap it: {"error": {grpc_code, ...}}
                code, text = error.get("grpc_code") or error.get("code"), error.get("message")
            else:
                code, text = message.get("code"), message.get("message") or error
            raise EtcdError(code, f"watch failed: {text}")
        result = message.get("result", message)
        compact = int(result.get("compact_revision") or 0)
        if compact:
            raise Compacted(compact)
        if result.get("canceled"):
            reason = str(result.get("cancel_reason") or "")
            if _is_auth_failure(None, reason):
                raise _TokenRejected(UNAUTHENTICATED, f"watch refused: {reason}")
            raise EtcdError(None, f"watch canceled: {reason or 'no reason given'}")
        events = result.get("events") or []
        if not events:
            if not result.get("created"):
                # A progress notification: every event up to this revision has been sent.
                revision = int((result.get("header") or {}).get("revision") or 0)
                self._next_revision = max(self._next_revision, revision + 1)
            return False
        changed = False
        for event in events:
            kv = event.get("kv") or {}
            key = _unb64(kv.get("key")).decode("utf-8", "replace")
            self._next_revision = max(self._next_revision, int(kv.get("mod_revision") or 0) + 1)
            if not self._pattern.fullmatch(key):
                continue
            changed = True
            if event.get("type") == "DELETE":  # PUT is the enum's zero: absent in JSON
                self._values.pop(key, None)
            else:
                self._values[key] = _unb64(kv.get("value"))
        return changed

    async def _list(self) -> tuple[int, dict[str, bytes]]:
        """Every manifest key under the prefix, at one revision (paged)."""
        start, end = self._services, prefix_end(self._services)
        revision = 0
        values: dict[str, bytes] = {}
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end), "limit": PAGE}
            if revision:
                body["revision"] = str(revision)
            reply = await self._call("/v3/kv/range", body)
            if not revision:
                revision = int(reply["header"]["revision"])
            kvs = reply.get("kvs") or []
            for kv in kvs:
                key = _unb64(kv.get("key")).decode("utf-8", "replace")
                if self._pattern.fullmatch(key):
                    values[key] = _unb64(kv.get("value"))
            if not reply.get("more") or not kvs:
                return revision, values
            start = _unb64(kvs[-1]["key"]) + b"\x00"

    def _snapshot(self) -> list[DiscoveredInstance]:
        groups: dict[str, tuple[str, str, dict[bool, bytes]]] = {}
        for key, raw in self._values.items():
            found = self._pattern.fullmatch(key)
            if found is None:
                continue
            service, instance_id, gz = found.groups()
            base = key[:-3] if gz else key
            groups.setdefault(base, (service, instance_id, {}))[2][bool(gz)] = raw
        snapshot = []
        for base in sorted(groups):
            service, instance_id, raws = groups[base]
            candidates = [raws[flag] for flag in (True, False) if flag in raws]  # .gz first
            document = self._manifests.decode(base, candidates)
            if document is None:
                continue
            snapshot.append(
                DiscoveredInstance(
                    key=f"etcd:{base}",
                    manifest=document,
                    address=_manifest_address(document),
                    service_name=service,
                    instance_id=instance_id,
                )
            )
        self._manifests.retain(set(groups))
        return snapshot

    # --- the KV store ----------------------------------------------------------------

    def registry_key(self, path: str) -> str:
        """The etcd key of a ``registry`` schema location: ``{prefix}{registry_path}``."""
        return self.prefix + (path if path.startswith("/") else "/" + path)

    async def read_key(self, path: str) -> bytes | None:
        key = self.registry_key(path)
        candidates = [key] if key.endswith(".gz") else [key + ".gz", key]
        try:
            for candidate in candidates:
                reply = await self._call("/v3/kv/range", {"key": _b64(candidate)})
                kvs = reply.get("kvs") or []
                if kvs:
                    return decode_stored(_unb64(kvs[0].get("value")))
        except Exception as exc:
            # The schema fetcher reports "not found" and retries later; the outage itself
            # is reported (once) by the watch loop.
            log.debug("etcd read failed", extra={"key": key, "error": str(exc)})
        return None

    # --- HTTP ------------------------------------------------------------------------

    def _base(self) -> str:
        return self.endpoints[self._endpoint % len(self.endpoints)]

    def _rotate(self) -> None:
        """Try the next endpoint after a failure (a cluster answers on any member)."""
        self._endpoint = (self._endpoint + 1) % len(self.endpoints)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self.ca or self.cert:
                context = ssl.create_default_context(cafile=self.ca)
                if self.cert:
                    context.load_cert_chain(self.cert, self.key)
                verify = context
            self._client = httpx.AsyncClient(verify=verify, timeout=self.timeout)
        return self._client

    async def _auth_headers(self) -> dict[str, str]:
        if self.username is None:
            return {}
        if self._token is None:
            body = {"name": self.username, "password": self.password or ""}
            response = await self._http().post(self._base() + "/v3/auth/authenticate", json=body)
            self._token = str(self._check(response)["token"])
        return {"authorization": self._token}

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON request; re-authenticates once when the token was rejected."""
        for attempt in range(2):
            headers = await self._auth_headers()
            response = await self._http().post(self._base() + path, json=body, headers=headers)
            try:
                return self._check(response)
            except EtcdError as exc:
                if attempt or self.username is None or not _is_auth_failure(exc.code, str(exc)):
                    raise
                self._token = None
        raise AssertionError("unreachable")

    @staticmethod
    def _check(response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            raise EtcdError(None, f"HTTP {response.status_code}: not a JSON answer") from None
        if not isinstance(data, dict):
            raise EtcdError(None, f"HTTP {response.status_code}: unexpected answer")
        if response.status_code != 200 or data.get("error"):
            code = data.get("code")
            message = data.get("message") or data.get("error") or f"HTTP {response.status_code}"
            raise EtcdError(code if isinstance(code, int) else None, str(message))
        return data

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _manifest_address(document: dict[str, Any]) -> str | None:
    instance = document.get("instance")
    if isinstance(instance, dict) and isinstance(instance.get("address"), str):
        return instance["address"]
    return None


async def _json_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON messages of a gRPC-gateway stream: one object per line."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while True:
            line, newline, rest = buffer.partition(b"\n")
            if not newline:
                break
            buffer = rest
            if line.strip():
                message = json.loads(line)
                if isinstance(message, dict):
                    yield message
        if len(buffer) > MAX_MESSAGE:
            raise ValueError("etcd watch message too large")
    if buffer.strip():
        message = json.loads(buffer)
        if isinstance(message, dict):
            yield message
