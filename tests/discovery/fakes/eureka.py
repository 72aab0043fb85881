"""A fake Eureka server: ``/eureka/apps`` and ``/eureka/apps/delta`` in Eureka's JSON.

What it implements, as Eureka does:

- the registry as applications (upper-case names) of instances with ``instanceId``,
  ``ipAddr``, ``status``, ``port: {"$": N, "@enabled": "true"}``, ``metadata`` (an empty
  one written as ``{"@class": "java.util.Collections$EmptyMap"}``) and ``actionType``;
- a recently-changed queue: every register, status change and cancel is queued with its
  action type, and ``/apps/delta`` returns the queued instances grouped by application;
  ``expire_deltas()`` empties it, as its retention time passing does;
- ``apps__hashcode`` on both answers: the digest of the whole registry (count of
  instances per status, statuses in ascending order), so a client can check its copy;
- ``quiet(change)``: a change that never reaches the queue (it left the window before the
  client polled), which only the hash reveals;
- JSON only when asked for with ``Accept: application/json`` (XML otherwise);
- HTTP basic authentication (401 otherwise), 403 on delta when deltas are disabled.
"""

from __future__ import annotations

import base64
import copy
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.discovery.fakes.common import FakeServer


class FakeEureka(FakeServer):
    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        deltas: bool = True,
        **server_options: Any,
    ) -> None:
        super().__init__(**server_options)
        self.username = username
        self.password = password
        self.deltas = deltas
        #: APP -> instance id -> instance document
        self.apps: dict[str, dict[str, dict[str, Any]]] = {}
        self.recent: list[dict[str, Any]] = []
        self.version = 1
        self._quiet = False

    # --- mutators (any thread) -------------------------------------------------------------

    def register(
        self,
        app: str,
        instance_id: str,
        ip: str,
        port: int,
        *,
        status: str = "UP",
        metadata: dict[str, str] | None = None,
    ) -> None:
        app = app.upper()
        now = str(int(time.time() * 1000))
        with self.lock:
            existing = self.apps.get(app, {}).get(instance_id)
            instance = {
                "instanceId": instance_id,
                "hostName": ip,
                "app": app,
                "ipAddr": ip,
                "status": status,
                "overriddenStatus": "UNKNOWN",
                "port": {"$": port, "@enabled": "true"},
                "securePort": {"$": 443, "@enabled": "false"},
                "countryId": 1,
                "dataCenterInfo": {
                    "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                    "name": "MyOwn",
                },
                "metadata": dict(metadata)
                if metadata
                else {"@class": "java.util.Collections$EmptyMap"},
                "vipAddress": app.lower(),
                "secureVipAddress": app.lower(),
                "isCoordinatingDiscoveryServer": "false",
                "lastUpdatedTimestamp": now,
                "lastDirtyTimestamp": now,
                "actionType": "MODIFIED" if existing else "ADDED",
            }
            self.apps.setdefault(app, {})[instance_id] = instance
            self._queue(instance)

    def set_status(self, app: str, instance_id: str, status: str) -> None:
        with self.lock:
            instance = self.apps[app.upper()][instance_id]
            instance["status"] = status
            instance["actionType"] = "MODIFIED"
            self._queue(instance)

    def cancel(self, app: str, instance_id: str) -> None:
        with self.lock:
            instances = self.apps.get(app.upper(), {})
            instance = instances.pop(instance_id, None)
            if not instances:
                self.apps.pop(app.upper(), None)
            if instance is not None:
                instance["actionType"] = "DELETED"
                self._queue(instance)

    def quiet(self, change: Callable[[], None]) -> None:
        """Apply ``change`` without queueing it for ``/apps/delta``."""
        with self.lock:
            self._quiet = True
            try:
                change()
            finally:
                self._quiet = False

    def expire_deltas(self) -> None:
        with self.lock:
            self.recent.clear()

    def _queue(self, instance: dict[str, Any]) -> None:
        self.version += 1
        if not self._quiet:
            self.recent.append(copy.deepcopy(instance))

    # --- HTTP ------------------------------------------------------------------------------

    def build_app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/eureka/apps", self._full),
                Route("/eureka/apps/delta", self._delta),
            ]
        )

    def hashcode(self) -> str:
        with self.lock:
            counts = Counter(i["status"] for app in self.apps.values() for i in app.values())
        return "".join(f"{status}_{counts[status]}_" for status in sorted(counts))

    def _refused(self, request: Request) -> Response | None:
        if self.username is not None:
            expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            if request.headers.get("authorization") != f"Basic {expected}":
                return Response(
                    status_code=401, headers={"WWW-Authenticate": 'Basic realm="Realm"'}
                )
        return None

    def _answer(self, request: Request, groups: dict[str, list[dict[str, Any]]]) -> Response:
        if "application/json" not in request.headers.get("accept", ""):
            xml = f"<applications><versions__delta>{self.version}</versions__delta></applications>"
            return Response(xml, media_type="application/xml")
        body = {
            "applications": {
                "versions__delta": str(self.version),
                "apps__hashcode": self.hashcode(),
                "application": [
                    {"name": name, "instance": instances} for name, instances in groups.items()
                ],
            }
        }
        return JSONResponse(body)

    async def _full(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        with self.lock:
            groups = {
                name: [copy.deepcopy(i) for i in instances.values()]
                for name, instances in sorted(self.apps.items())
            }
            return self._answer(request, groups)

    async def _delta(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if not self.deltas:
            return Response(status_code=403)
        with self.lock:
            groups: dict[str, list[dict[str, Any]]] = {}
            for instance in self.recent:
                groups.setdefault(instance["app"], []).append(copy.deepcopy(instance))
            return self._answer(request, groups)
