"""The FARP push API (FARP.md §6): instances register themselves with the gateway.

Pull discovery finds instances through a backend; push is the other way round: an
instance POSTs its manifest (or where to fetch it) to ``/_farp/v1/register``, keeps it
alive with heartbeats and deregisters when it stops. Registered instances become
``DiscoveredInstance`` entries in the watcher's ``pushed`` map, so from there on they
follow exactly the path discovered ones do (validation, schema fetches, routes, the
atomic table swap); this module only owns what is particular to push: liveness,
eviction, rate limits and the HTTP surface.

Every push endpoint requires the admin basic-auth credentials (when ``admin.auth`` is
configured) or the registration token (``farp.registration_token``) as
``Authorization: Bearer <token>`` or ``X-FARP-Token: <token>``. With neither configured
the push API is open: bind the admin listener to localhost (``admin.address:
127.0.0.1:9090``) in that case.

The ``status`` an instance reports (at registration and in heartbeats) overrides its
manifest's ``instance.status``: ``draining``, ``stopping``, ``unhealthy`` and ``starting``
take the instance out of rotation, ``healthy``/``degraded`` put it back. A heartbeat's
``routes_checksum`` that differs from the held manifest's ``checksum`` makes the gateway
refetch the manifest in the background.

State is per process: with several workers an instance registers with one of them.
Run push registrations against a single-worker gateway, or use a shared discovery
backend (etcd, Consul, Redis) when running several.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.discovery.base import DiscoveredInstance
from gateway.farp.canonical import canonical_json
from gateway.farp.manifest import Manifest, ManifestError, parse_manifest
from gateway.farp.schemas import SchemaError, parse_document

if TYPE_CHECKING:
    from gateway.farp.watcher import FarpWatcher
    from gateway.runtime import Gateway

log = logging.getLogger("octopus.farp.push")

PUSH_PREFIX = "/_farp/"
API_PREFIX = "/_farp/v1"
#: Instance statuses of FARP.md §1; only healthy/degraded take traffic.
STATUSES = frozenset({"starting", "healthy", "degraded", "unhealthy", "draining", "stopping"})
#: How long register/heartbeat/deregister wait for the routing table to reflect them.
APPLY_TIMEOUT = 5.0
#: Timeout for fetching a manifest from an instance.
FETCH_TIMEOUT = 5.0
#: Largest request body or fetched manifest accepted (inline schemas can be big).
MAX_DOCUMENT = 8 * 1024 * 1024
#: Registrations per service per second (token bucket; the burst is the same number).
REGISTRATIONS_PER_SECOND = 10.0
#: Buckets kept before idle (full) ones are dropped, so random names cannot grow memory.
MAX_BUCKETS = 1024


class PushError(Exception):
    """An answer other than success; carries the HTTP status and the JSON body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": code, "message": message, **extra}
        self.headers = headers

    def response(self) -> Response:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


# --- authentication ------------------------------------------------------------------


def registration_token_matches(scope: Scope, token: str) -> bool:
    """Whether the request carries ``token`` as a bearer token or in ``X-FARP-Token``.

    Compared in constant time: the token is a shared secret.
    """
    expected = token.encode()
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            if hmac.compare_digest(value[7:].strip(), expected):
                return True
        elif name == b"x-farp-token" and hmac.compare_digest(value.strip(), expected):
            return True
    return False


def is_push_path(scope: Scope) -> bool:
    """Whether the request is for the push API (below ``root_path`` when mounted)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.startswith(PUSH_PREFIX)


def unauthorized() -> Response:
    return JSONResponse(
        {
            "error": "unauthorized",
            "message": "the push API requires the registration token or admin credentials",
        },
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="octopus-farp"'},
    )


class PushTokenGuard:
    """Requires the registration token on ``/_farp/`` paths when there is no admin auth.

    With admin auth configured, ``AdminAuth`` accepts either credential itself; this
    guard covers the other case, so a token alone still protects the push API.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and is_push_path(scope)
            and not registration_token_matches(scope, self.token)
        ):
            await unauthorized()(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- rate limiting -------------------------------------------------------------------


@dataclass
class TokenBucket:
    """``rate`` tokens a second up to ``capacity``; a registration takes one."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.capacity


class RegistrationLimiter:
    """One token bucket per service name: a crash-looping or misconfigured fleet cannot
    make the gateway fetch manifests and rebuild its table without bound."""

    def __init__(self, rate: float = REGISTRATIONS_PER_SECOND) -> None:
        self.rate = rate
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, service: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.get(service)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            bucket = TokenBucket(self.rate, self.rate, self.rate, now)
            self._buckets[service] = bucket
        wait = bucket.take(now)
        if wait > 0:
            raise PushError(
                429,
                "too_many_requests",
                f"too many registrations for service {service!r}; retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )


# --- the registry --------------------------------------------------------------------


@dataclass
class PushedInstance:
    """What the gateway knows about one pushed instance beyond its manifest."""

    instance_id: str
    service_name: str
    address: str  # host:port the gateway forwards to
    manifest_url: str  # where the manifest is (re)fetched from
    version: str | None
    tags: list[str]
    metadata: dict[str, str]
    status: str | None  # last status the instance reported (None: as in its manifest)
    document: dict[str, Any]  # the manifest as handed to the watcher
    registered_at: float  # unix seconds
    last_heartbeat: float  # unix seconds (registration counts as one)
    seen: float  # time.monotonic() of the last sign of life, for eviction
    refetch: asyncio.Task[Any] | None = None
    refetch_tried: dict[str, float] = field(default_factory=dict)  # checksum -> monotonic

    @property
    def key(self) -> str:
        return f"push:{self.instance_id}"

    @property
    def checksum(self) -> str:
        return str(self.document.get("checksum") or "")


def fingerprint(document: dict[str, Any]) -> str:
    """The watcher's identity of a manifest document (see ``FarpWatcher._accept``)."""
    return hashlib.sha256(canonical_json(document)).hexdigest()


def with_status(document: dict[str, Any], status: str | None) -> dict[str, Any]:
    """A copy of ``document`` whose ``instance.status`` is ``status``.

    Always a copy: the watcher's accepted manifests keep the dict they were parsed
    from, and it must not change under them.
    """
    result = copy.deepcopy(document)
    if status is None:
        return result
    instance = result.get("instance")
    if not isinstance(instance, dict):
        instance = {}
        result["instance"] = instance
    instance["status"] = status
    return result


def _effective_status(document: dict[str, Any]) -> str:
    instance = document.get("instance")
    status = instance.get("status") if isinstance(instance, dict) else None
    return str(status or "healthy").lower()


def _host_port(address: str, port: int) -> str:
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"  # IPv6 literal
    return f"{address}:{port}"


class PushRegistry:
    """The pushed instances of one gateway: liveness, eviction and table updates.

    Manifests live in the watcher (``gateway.farp.pushed``), which builds routes from
    them; this registry adds what push needs on top and is the only writer of that map.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.instances: dict[str, PushedInstance] = {}
        self.limiter = RegistrationLimiter()
        self._watcher: FarpWatcher | None = None
        self._evictor: asyncio.Task[Any] | None = None

    # --- plumbing ----------------------------------------------------------------

    @property
    def heartbeat_timeout(self) -> float:
        return float(self.gateway.settings.farp.heartbeat_timeout)

    @property
    def check_interval(self) -> float:
        """Eviction checks: a quarter of the timeout, between 50 ms and 1 s."""
        return min(1.0, max(0.05, self.heartbeat_timeout / 4))

    def watcher(self) -> FarpWatcher:
        """The running watcher; a restarted gateway has a new one, and forgets pushes."""
        watcher = self.gateway.farp
        if watcher is None:
            raise PushError(
                503, "farp_unavailable", "FARP is disabled or the gateway has not started"
            )
        if watcher is not self._watcher:
            self._watcher = watcher
            self.instances.clear()
        return watcher

    def _publish(self, entry: PushedInstance) -> None:
        self.watcher().pushed[entry.key] = DiscoveredInstance(
            key=entry.key,
            manifest=entry.document,
            address=entry.address,
            service_name=entry.service_name,
            instance_id=entry.instance_id,
            metadata=dict(entry.metadata),
        )

    def _ensure_evictor(self) -> None:
        if self._evictor is None or self._evictor.done():
            self._evictor = self.gateway.spawn(self._evict_loop(), name="farp-push-eviction")

    async def _evict_loop(self) -> None:
        """Runs while there are pushed instances; register starts it again when needed."""
        while self.instances and not self.gateway.draining:
            await asyncio.sleep(self.check_interval)
            self.evict_expired(time.monotonic())

    def evict_expired(self, now: float) -> list[str]:
        """Drop instances silent for longer than ``farp.heartbeat_timeout``."""
        watcher = self.gateway.farp
        if watcher is None or watcher is not self._watcher:
            self.instances.clear()  # they belonged to a watcher that has stopped
            return []
        timeout = self.heartbeat_timeout
        expired = [e for e in self.instances.values() if now - e.seen > timeout]
        if not expired:
            return []
        for entry in expired:
            self._remove(entry)
            log.warning(
                "pushed instance evicted: no heartbeat",
                extra={
                    "instance_id": entry.instance_id,
                    "service": entry.service_name,
                    "silent_s": round(now - entry.seen, 3),
                },
            )
        watcher.notify()
        return [e.instance_id for e in expired]

    def _remove(self, entry: PushedInstance) -> None:
        self.instances.pop(entry.instance_id, None)
        if self._watcher is not None:
            self._watcher.pushed.pop(entry.key, None)
        if entry.refetch is not None:
            entry.refetch.cancel()

    async def _apply(self, done: Any) -> bool:
        """Ask for a rebuild and wait (bounded) until ``done()`` holds in the watcher.

        A rebuild already running when the change was made may not include it, so
        one more rebuild is requested when the first one does not show it; if that one
        does not either, the watcher refused the change (e.g. an unreachable schema;
        it retries on its own).
        """
        watcher = self.watcher()
        watcher.notify()
        start = watcher.generation
        deadline = time.monotonic() + APPLY_TIMEOUT
        asked_again = False
        while not done(watcher):
            generation = watcher.generation
            if generation >= start + 1 and not asked_again:
                asked_again = True
                start = generation
                watcher.notify()
            elif generation >= start + 1:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await watcher.wait_rebuilt(generation, timeout=remaining)
            except TimeoutError:
                return False
        return True

    # --- operations --------------------------------------------------------------

    async def register(self, body: Any) -> dict[str, Any]:
        """Validate, fetch if needed, publish to the watcher and wait for the routes."""
        if not isinstance(body, dict):
            raise PushError(400, "invalid_request", "body: must be a JSON object")
        info = _parse_instance(body.get("instance"))
        self.watcher()
        self.limiter.check(info["service_name"])
        address = _host_port(info["address"], info["port"])
        manifest_url = _manifest_url(address, info["metadata"])
        document = body.get("manifest")
        if document is None:
            document = await fetch_manifest(manifest_url)
        elif not isinstance(document, dict):
            raise PushError(400, "invalid_manifest", "manifest: must be an object or null")
        document = with_status(document, info["status"])
        manifest = validate(document, address, info["id"], info["service_name"])

        self.watcher()  # the fetch awaited: the gateway may have restarted meanwhile
        previous = self.instances.get(info["id"])
        if previous is not None and previous.refetch is not None:
            previous.refetch.cancel()
        now = time.time()
        entry = PushedInstance(
            instance_id=info["id"],
            service_name=info["service_name"],
            address=address,
            manifest_url=manifest_url,
            version=info["version"],
            tags=info["tags"],
            metadata=info["metadata"],
            status=info["status"],
            document=document,
            registered_at=now,
            last_heartbeat=now,
            seen=time.monotonic(),
        )
        self.instances[entry.instance_id] = entry
        self._publish(entry)
        self._ensure_evictor()
        wanted = fingerprint(document)
        ready = await self._apply(lambda w: _accepted_fingerprint(w, entry.key) == wanted)
        log.info(
            "instance registered",
            extra={
                "instance_id": entry.instance_id,
                "service": entry.service_name,
                "address": address,
                "routes_ready": ready,
            },
        )
        return {"status": "registered", "routes_checksum": manifest.checksum, "routes_ready": ready}

    async def heartbeat(self, instance_id: str, body: Any) -> dict[str, Any]:
        """Refresh liveness; apply a status change; refetch on a checksum change."""
        self.watcher()
        entry = self.instances.get(instance_id)
        if entry is None:
            raise PushError(
                404,
                "unknown_instance",
                f"instance {instance_id!r} is not registered",
                action="re-register",
            )
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise PushError(400, "invalid_request", "body: must be a JSON object")
        status = body.get("status")
        if status is not None:
            status = _check_status(status, "status")
        checksum = body.get("routes_checksum")
        if checksum is not None and not isinstance(checksum, str):
            raise PushError(400, "invalid_request", "routes_checksum: must be a string")
        entry.seen = time.monotonic()
        entry.last_heartbeat = time.time()
        if status is not None and status != _effective_status(entry.document):
            entry.status = status
            entry.document = with_status(entry.document, status)
            self._publish(entry)
            wanted = fingerprint(entry.document)
            await self._apply(lambda w: _accepted_fingerprint(w, entry.key) == wanted)
            log.info(
                "pushed instance changed status",
                extra={"instance_id": instance_id, "status": status},
            )
        if checksum is not None and checksum != entry.checksum:
            self._maybe_refetch(entry, checksum)
        return {"status": "ok"}

    async def deregister(self, instance_id: str) -> dict[str, Any]:
        self.watcher()
        entry = self.instances.get(instance_id)
        if entry is None:
            raise PushError(404, "unknown_instance", f"instance {instance_id!r} is not registered")
        self._remove(entry)
        await self._apply(lambda w: entry.key not in w.accepted)
        log.info(
            "instance deregistered",
            extra={"instance_id": instance_id, "service": entry.service_name},
        )
        return {"status": "deregistered"}

    def _maybe_refetch(self, entry: PushedInstance, checksum: str) -> None:
        """Refetch in the background, once at a time, and at most once per heartbeat
        timeout for the same announced checksum (a service whose manifest endpoint
        disagrees with its heartbeats must not make us fetch on every beat)."""
        if entry.refetch is not None and not entry.refetch.done():
            return
        now = time.monotonic()
        tried = entry.refetch_tried.get(checksum)
        if tried is not None and now - tried < max(1.0, self.heartbeat_timeout):
            return
        entry.refetch_tried = {checksum: now}
        entry.refetch = self.gateway.spawn(self._refetch(entry), name="farp-push-refetch")

    async def _refetch(self, entry: PushedInstance) -> None:
        try:
            document = await fetch_manifest(entry.manifest_url)
            document = with_status(document, entry.status)
            validate(document, entry.address, entry.instance_id, entry.service_name)
        except PushError as exc:
            log.warning(
                "manifest refetch failed; keeping the current one",
                extra={"instance_id": entry.instance_id, "reason": exc.body["message"]},
            )
            return
        if self.instances.get(entry.instance_id) is not entry:
            return  # deregistered, evicted or re-registered meanwhile
        if fingerprint(document) == fingerprint(entry.document):
            return
        entry.document = document
        self._publish(entry)
        self.watcher().notify()
        log.info(
            "manifest refetched after a checksum change",
            extra={"instance_id": entry.instance_id, "checksum": entry.checksum},
        )

    # --- views -------------------------------------------------------------------

    def services(self) -> dict[str, list[dict[str, Any]]]:
        """Every instance the watcher accepted (pushed or discovered), plus pushed ones
        still waiting for their schemas, grouped by service name."""
        watcher = self.watcher()
        grouped: dict[str, list[dict[str, Any]]] = {}
        accepted_keys = set()
        for key, accepted in sorted(watcher.accepted.items()):
            accepted_keys.add(key)
            manifest = accepted.manifest
            instance = manifest.instance
            pushed = self.instances.get(manifest.instance_id) if key.startswith("push:") else None
            view = {
                "id": manifest.instance_id,
                "service": manifest.service_name,
                "version": manifest.service_version,
                "address": instance.address if instance else None,
                "status": (instance.status if instance else "") or "unspecified",
                "serving": manifest.serving,
                "state": "accepted",
                "source": "push" if key.startswith("push:") else "discovery",
                "routes_checksum": manifest.checksum,
                "registered_at": pushed.registered_at if pushed else None,
                "last_heartbeat": pushed.last_heartbeat if pushed else None,
            }
            grouped.setdefault(manifest.service_name, []).append(view)
        for entry in self.instances.values():
            if entry.key in accepted_keys:
                continue
            grouped.setdefault(entry.service_name, []).append(
                {
                    "id": entry.instance_id,
                    "service": entry.service_name,
                    "version": entry.version,
                    "address": entry.address,
                    "status": _effective_status(entry.document),
                    "serving": False,
                    "state": "pending",
                    "source": "push",
                    "routes_checksum": entry.checksum,
                    "registered_at": entry.registered_at,
                    "last_heartbeat": entry.last_heartbeat,
                }
            )
        return grouped


def _accepted_fingerprint(watcher: FarpWatcher, key: str) -> str | None:
    accepted = watcher.accepted.get(key)
    return accepted.fingerprint if accepted is not None else None


def _parse_instance(raw: Any) -> dict[str, Any]:
    """The ``instance`` object of a registration, with errors naming the field."""
    if not isinstance(raw, dict):
        raise PushError(400, "invalid_request", "instance: required (an object)")

    def text(name: str, *, required: bool) -> str | None:
        value = raw.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise PushError(400, "invalid_request", f"instance.{name}: required (a string)")
        return value.strip()

    port = raw.get("port")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise PushError(400, "invalid_request", "instance.port: required (1-65535)")
    status = raw.get("status")
    tags = raw.get("tags") or []
    if not isinstance(tags, list):
        raise PushError(400, "invalid_request", "instance.tags: must be a list")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise PushError(400, "invalid_request", "instance.metadata: must be an object")
    return {
        "id": text("id", required=True),
        "service_name": text("service_name", required=True),
        "address": text("address", required=True),
        "port": port,
        "version": text("version", required=False),
        "status": _check_status(status, "instance.status") if status else None,
        "tags": [str(t) for t in tags],
        "metadata": {str(k): str(v) for k, v in metadata.items()},
    }


def _check_status(value: Any, name: str) -> str:
    status = value.lower() if isinstance(value, str) else ""
    if status not in STATUSES:
        choices = ", ".join(sorted(STATUSES))
        raise PushError(400, "invalid_request", f"{name}: must be one of {choices}")
    return status


def _manifest_url(address: str, metadata: dict[str, str]) -> str:
    """``metadata["farp.manifest"]`` (a URL, or a path on the instance), else the default."""
    base = f"http://{address}/"
    where = metadata.get("farp.manifest", "").strip()
    if not where:
        return urljoin(base, "/_farp/manifest")
    if urlsplit(where).scheme in ("http", "https"):
        return where
    return urljoin(base, where)


def validate(document: dict[str, Any], address: str, instance_id: str, service: str) -> Manifest:
    """``parse_manifest`` plus the push-specific rule that the manifest describes the
    instance being registered (else one instance could overwrite another's routes)."""
    try:
        manifest = parse_manifest(document, address=address)
    except ManifestError as exc:
        raise PushError(400, "invalid_manifest", str(exc), field=exc.field) from None
    if manifest.instance_id != instance_id:
        raise PushError(
            400,
            "invalid_manifest",
            f"manifest: instance_id: {manifest.instance_id!r} differs from instance.id "
            f"{instance_id!r}",
            field="instance_id",
        )
    if manifest.service_name != service:
        raise PushError(
            400,
            "invalid_manifest",
            f"manifest: service_name: {manifest.service_name!r} differs from "
            f"instance.service_name {service!r}",
            field="service_name",
        )
    return manifest


async def fetch_manifest(url: str) -> dict[str, Any]:
    """GET a manifest from an instance, bounded in time and size."""
    try:
        async with (
            httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=True) as client,
            client.stream("GET", url, headers={"accept": "application/json"}) as response,
        ):
            if response.status_code != 200:
                raise PushError(
                    502,
                    "manifest_unreachable",
                    f"GET {url} answered {response.status_code}",
                )
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_DOCUMENT:
                    raise PushError(
                        400, "invalid_manifest", f"manifest at {url} exceeds {MAX_DOCUMENT} bytes"
                    )
    except httpx.HTTPError as exc:
        raise PushError(502, "manifest_unreachable", f"GET {url} failed: {exc}") from None
    try:
        document = parse_document(bytes(data))
    except (SchemaError, UnicodeDecodeError) as exc:
        raise PushError(400, "invalid_manifest", f"manifest at {url}: {exc}") from None
    if not isinstance(document, dict):
        raise PushError(400, "invalid_manifest", f"manifest at {url}: $: must be a JSON object")
    return document


# --- HTTP ----------------------------------------------------------------------------

_registries: weakref.WeakKeyDictionary[Gateway, PushRegistry] = weakref.WeakKeyDictionary()


def registry_for(gateway: Gateway) -> PushRegistry:
    """The one registry of ``gateway``, however many admin apps serve it."""
    registry = _registries.get(gateway)
    if registry is None:
        registry = PushRegistry(gateway)
        _registries[gateway] = registry
    return registry


async def _read_json(request: Request, *, optional: bool = False) -> Any:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_DOCUMENT:
            raise PushError(413, "payload_too_large", f"body exceeds {MAX_DOCUMENT} bytes")
    if not data.strip():
        if optional:
            return None
        raise PushError(400, "invalid_request", "body: required (JSON)")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise PushError(400, "invalid_request", f"body: not JSON: {exc}") from None


def push_routes(gateway: Gateway) -> list[BaseRoute]:
    """The ``/_farp/v1`` endpoints, to mount on the admin app."""
    registry = registry_for(gateway)

    async def register(request: Request) -> Response:
        try:
            return JSONResponse(await registry.register(await _read_json(request)), 201)
        except PushError as exc:
            return exc.response()

    async def heartbeat(request: Request) -> Response:
        try:
            body = await _read_json(request, optional=True)
            return JSONResponse(await registry.heartbeat(request.path_params["id"], body))
        except PushError as exc:
            return exc.response()

    async def deregister(request: Request) -> Response:
        try:
            return JSONResponse(await registry.deregister(request.path_params["id"]))
        except PushError as exc:
            return exc.response()

    async def services(request: Request) -> Response:
        try:
            grouped = registry.services()
        except PushError as exc:
            return exc.response()
        return JSONResponse(
            {"services": [{"name": n, "instances": grouped[n]} for n in sorted(grouped)]}
        )

    async def service(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            grouped = registry.services()
        except PushError as exc:
            return exc.response()
        if name not in grouped:
            return JSONResponse(
                {"error": "not_found", "message": f"no instances of service {name!r}"}, 404
            )
        return JSONResponse({"name": name, "instances": grouped[name]})

    return [
        Route(f"{API_PREFIX}/register", register, methods=["POST"]),
        Route(f"{API_PREFIX}/heartbeat/{{id}}", heartbeat, methods=["PUT"]),
        Route(f"{API_PREFIX}/deregister/{{id}}", deregister, methods=["DELETE"]),
        Route(f"{API_PREFIX}/services", services, methods=["GET"]),
        Route(f"{API_PREFIX}/services/{{name}}", service, methods=["GET"]),
    ]
