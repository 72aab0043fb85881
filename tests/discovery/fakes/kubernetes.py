"""A fake Kubernetes API server for Services and ``discovery.k8s.io/v1`` EndpointSlices.

What it implements, as the real API server does:

- one global, increasing ``resourceVersion`` stamped on every object and list;
- list, cluster-wide or per namespace, filtered by an equality-based ``labelSelector``
  (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``), paged with ``limit``/``continue`` (the server
  may return fewer items than ``limit``; ``page_size`` forces that);
- ``?watch=1&resourceVersion=N``: a chunked stream of newline-delimited JSON events after
  N, ``ADDED``/``MODIFIED``/``DELETED`` (an object that stops matching the selector arrives
  as ``DELETED``, one that starts matching as ``ADDED``, like the watch cache sends them),
  ``BOOKMARK`` when ``allowWatchBookmarks=true``, ended after ``timeoutSeconds``;
- a compacted history: a watch from a resourceVersion older than the window gets an
  ``ERROR`` event with a 410 ``Status`` (or, with ``gone_as_status``, an HTTP 410), and an
  expired ``continue`` token gets HTTP 410;
- bearer-token authentication (401 ``Status`` otherwise).

Tests mutate it from their thread with ``put_service``/``put_slice``/``delete_*``, push
``bookmark()``, end every open watch with ``end_watches()`` (as ``timeoutSeconds`` would)
and lose history with ``expire()``.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.discovery.fakes.common import Changes, FakeServer

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

#: plural -> (kind, apiVersion)
KINDS = {
    "services": ("Service", "v1"),
    "endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
}


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    old: dict[str, Any] | None
    new: dict[str, Any]


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (the set-based ``in``/``notin`` forms are not needed)."""
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if "!=" in term:
            key, value = (part.strip() for part in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (part.strip() for part in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubernetes(FakeServer):
    def __init__(
        self,
        *,
        token: str | None = None,
        page_size: int | None = None,
        gone_as_status: bool = False,
        **server_options: Any,
    ) -> None:
        super().__init__(**server_options)
        self.token = token
        self.page_size = page_size
        self.gone_as_status = gone_as_status
        self.rv = 1000
        self.compacted = 0
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.events: dict[str, list[_Event]] = {k: [] for k in KINDS}
        self._generation = 0
        self._bookmarks = 0
        self._quiet = False
        self._pages: dict[str, tuple[list[dict[str, Any]], int]] = {}
        #: Watch streams open right now, and bookmarks written to them so far.
        self.open_watches = 0
        self.bookmarks_sent = 0

    # --- mutators (any thread) -------------------------------------------------------------

    def put_service(
        self,
        namespace: str,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> None:
        self._put(
            "services",
            {
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": dict(labels or {}),
                    "annotations": dict(annotations or {}),
                },
                "spec": {
                    "type": "ClusterIP",
                    "selector": {"app": name},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                },
            },
        )

    def put_slice(
        self,
        namespace: str,
        name: str,
        *,
        service: str,
        endpoints: list[tuple[str, bool | None]],
        ports: list[tuple[str, int]] | None = None,
        address_type: str = "IPv4",
    ) -> None:
        """``endpoints``: ``(address, ready)``; ready None leaves ``conditions`` empty."""
        entries = []
        for address, ready in endpoints:
            conditions = {} if ready is None else {"ready": ready, "serving": ready}
            entries.append(
                {
                    "addresses": [address],
                    "conditions": conditions,
                    "targetRef": {
                        "kind": "Pod",
                        "namespace": namespace,
                        "name": f"{service}-{address.replace('.', '-').replace(':', '-')}",
                    },
                }
            )
        self._put(
            "endpointslices",
            {
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {
                        SERVICE_NAME_LABEL: service,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    },
                },
                "addressType": address_type,
                "endpoints": entries,
                "ports": [
                    {"name": port_name, "port": number, "protocol": "TCP"}
                    for port_name, number in (ports if ports is not None else [("http", 8080)])
                ],
            },
        )

    def delete_service(self, namespace: str, name: str) -> None:
        self._delete("services", namespace, name)

    def delete_slice(self, namespace: str, name: str) -> None:
        self._delete("endpointslices", namespace, name)

    def bookmark(self) -> None:
        """Every open watch that asked for bookmarks gets one at the current version."""
        with self.lock:
            self._bookmarks += 1
        self.changes.notify()

    def end_watches(self) -> None:
        """End every open watch normally, as ``timeoutSeconds`` elapsing does."""
        with self.lock:
            self._generation += 1
        self.changes.notify()

    def expire(self, change: Callable[[], None] | None = None) -> None:
        """Lose history: apply ``change`` without watch events (as if they fell out of the
        window), compact everything so far, and end open watches. Watchers behind the
        compaction get 410 (an ERROR event, or HTTP 410 on re-watch with gone_as_status)."""
        with self.lock:
            self._quiet = True
            try:
                if change is not None:
                    change()
            finally:
                self._quiet = False
            self.rv += 1
            self.compacted = self.rv
            for kind in KINDS:
                self.events[kind] = []
            self._generation += 1
        self.changes.notify()

    def _put(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self.lock:
            old = self.objects[kind].get(key)
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["kind"], obj["apiVersion"] = KINDS[kind]
            meta = obj["metadata"]
            meta["resourceVersion"] = str(self.rv)
            meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
            self.objects[kind][key] = obj
            if not self._quiet:
                self.events[kind].append(_Event(self.rv, "MODIFIED" if old else "ADDED", old, obj))
        self.changes.notify()

    def _delete(self, kind: str, namespace: str, name: str) -> None:
        with self.lock:
            old = self.objects[kind].pop((namespace, name), None)
            if old is None:
                return
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            if not self._quiet:
                self.events[kind].append(_Event(self.rv, "DELETED", old, gone))
        self.changes.notify()

    # --- HTTP ------------------------------------------------------------------------------

    def build_app(self) -> Starlette:
        routes = []
        for kind, prefix in (
            ("services", "/api/v1"),
            ("endpointslices", "/apis/discovery.k8s.io/v1"),
        ):
            routes.append(Route(f"{prefix}/{kind}", self._endpoint(kind)))
            routes.append(Route(f"{prefix}/namespaces/{{namespace}}/{kind}", self._endpoint(kind)))
        return Starlette(routes=routes)

    def _endpoint(self, kind: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
                return JSONResponse(status(401, "Unauthorized", "Unauthorized"), status_code=401)
            namespace = request.path_params.get("namespace", "")
            if request.query_params.get("watch") in ("1", "true"):
                return self._watch(kind, namespace, request)
            return self._list(kind, namespace, request)

        return endpoint

    def _visible(self, obj: dict[str, Any] | None, namespace: str, selector: str) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        return (not namespace or meta["namespace"] == namespace) and selector_matches(
            selector, meta.get("labels") or {}
        )

    def _list(self, kind: str, namespace: str, request: Request) -> Response:
        query = request.query_params
        with self.lock:
            token = query.get("continue")
            if token:
                page = self._pages.pop(token, None)
                if page is None or page[1] < self.compacted:
                    message = (
                        "The provided continue parameter is too old "
                        "to display a consistent list result."
                    )
                    return JSONResponse(status(410, "Expired", message), status_code=410)
                items, rv = page
            else:
                selector = query.get("labelSelector", "")
                items = [
                    copy.deepcopy(obj)
                    for _, obj in sorted(self.objects[kind].items())
                    if self._visible(obj, namespace, selector)
                ]
                rv = self.rv
            limit = int(query["limit"]) if query.get("limit") else None
            if self.page_size is not None:
                limit = min(limit or self.page_size, self.page_size)
            page_items, rest = (items[:limit], items[limit:]) if limit else (items, [])
            metadata: dict[str, Any] = {"resourceVersion": str(rv)}
            if rest:
                next_token = uuid.uuid4().hex
                self._pages[next_token] = (rest, rv)
                metadata["continue"] = next_token
        kind_name, api_version = KINDS[kind]
        for item in page_items:  # items of a list carry no kind/apiVersion of their own
            item.pop("kind", None)
            item.pop("apiVersion", None)
        body = {
            "kind": f"{kind_name}List",
            "apiVersion": api_version,
            "metadata": metadata,
            "items": page_items,
        }
        return JSONResponse(body)

    def _watch(self, kind: str, namespace: str, request: Request) -> Response:
        query = request.query_params
        selector = query.get("labelSelector", "")
        bookmarks = query.get("allowWatchBookmarks") == "true"
        timeout = float(query.get("timeoutSeconds") or 1800)
        requested = query.get("resourceVersion") or "0"
        kind_name, api_version = KINDS[kind]
        with self.lock:
            initial: list[dict[str, Any]] = []
            if requested == "0":  # "any version": current objects as ADDED, then changes
                initial = [
                    copy.deepcopy(o)
                    for _, o in sorted(self.objects[kind].items())
                    if self._visible(o, namespace, selector)
                ]
                cursor = self.rv
            else:
                cursor = int(requested)
            too_old = cursor < self.compacted
            generation = self._generation
            seen_bookmarks = self._bookmarks
            compacted = self.compacted
        if too_old and self.gone_as_status:
            message = f"too old resource version: {cursor} ({compacted})"
            return JSONResponse(status(410, "Expired", message), status_code=410)

        def line(event_type: str, obj: dict[str, Any]) -> bytes:
            return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"

        async def stream() -> AsyncIterator[bytes]:
            with self.lock:
                self.open_watches += 1
            try:
                async for chunk in events_after():
                    yield chunk
            finally:
                with self.lock:
                    self.open_watches -= 1

        async def events_after() -> AsyncIterator[bytes]:
            nonlocal cursor, seen_bookmarks
            if too_old:
                message = f"too old resource version: {cursor} ({compacted})"
                yield line("ERROR", status(410, "Expired", message))
                return
            for obj in initial:
                yield line("ADDED", obj)
            deadline = time.monotonic() + timeout
            while True:
                waiter = self.changes.waiter()
                with self.lock:  # decide under the lock, send outside it
                    closing = self.closing
                    expired = cursor < self.compacted and not self.gone_as_status
                    message = f"too old resource version: {cursor} ({self.compacted})"
                    ended = self._generation != generation
                    events = [e for e in self.events[kind] if e.rv > cursor]
                    bookmark_due = bookmarks and self._bookmarks != seen_bookmarks
                    seen_bookmarks = self._bookmarks
                    current = self.rv
                if closing:
                    return
                if expired:
                    yield line("ERROR", status(410, "Expired", message))
                    return
                if ended:
                    return
                for event in events:
                    translated = self._translate(event, namespace, selector)
                    cursor = event.rv
                    if translated is not None:
                        yield line(*translated)
                if bookmark_due:
                    cursor = max(cursor, current)
                    marker = {
                        "kind": kind_name,
                        "apiVersion": api_version,
                        "metadata": {"resourceVersion": str(cursor)},
                    }
                    yield line("BOOKMARK", marker)
                    with self.lock:
                        self.bookmarks_sent += 1
                if events or bookmark_due:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                await Changes.wait(waiter, remaining)

        return StreamingResponse(stream(), media_type="application/json")

    def _translate(
        self, event: _Event, namespace: str, selector: str
    ) -> tuple[str, dict[str, Any]] | None:
        """What a watcher with this scope sees of ``event`` (selector transitions included)."""
        was = self._visible(event.old, namespace, selector)
        now = self._visible(event.new, namespace, selector)
        if event.type == "DELETED":
            return ("DELETED", event.new) if was else None
        if now:
            return ("MODIFIED" if was else "ADDED", event.new)
        if was:
            gone = copy.deepcopy(event.old or {})
            gone["metadata"]["resourceVersion"] = str(event.rv)
            return ("DELETED", gone)
        return None
