"""The ``kubernetes`` backend: FARP-labelled Services and the EndpointSlices behind them.

Two informers in miniature, one per resource: list (paged), then watch from the list's
``resourceVersion`` with bookmarks, so the API server streams changes instead of being
polled. Services are selected server-side by ``label_selector``; a Service's instances are
the ready addresses of its EndpointSlices (label ``kubernetes.io/service-name``), on the
port named by its ``farp.io/port-name`` annotation (else the slice's first port). FARP
metadata comes from the Service's annotations: ``farp.*`` keys as they are, and
``farp.io/manifest-url`` as ``farp.manifest``.

When the watch window is missed (HTTP 410 Gone, or an ERROR event with code 410) the
resource is re-listed from scratch: a resumed watch could not say what was lost. On an
outage the last snapshot stays (nothing is yielded), the loops retry with capped
exponential backoff and jitter, and ``state``/``last_error`` say what is wrong; the log
gets one line when the backend goes down and one when it recovers, not one per retry.

Credentials: in-cluster (the pod's service-account token, re-read on every request because
bound tokens rotate, and the cluster CA) or a kubeconfig file, read here with PyYAML rather
than the official client, which would pull in a large dependency for two GET requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.discovery.base import DiscoveredInstance
from gateway.discovery.remote import Backoff, ResilientBackend

log = logging.getLogger("octopus.discovery.kubernetes")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MANIFEST_ANNOTATION = "farp.io/manifest-url"
PORT_ANNOTATION = "farp.io/port-name"
ENABLED_LABEL = "farp.io/enabled"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Items per list page; big lists are paged so one request never holds the whole cluster.
PAGE_SIZE = 500


class KubernetesConfigError(Exception):
    """The cluster cannot be reached as configured (not in a pod, unreadable kubeconfig)."""


class _Gone(Exception):
    """410: the resourceVersion fell out of the server's window; only a re-list recovers."""


class _ApiError(Exception):
    """Any other unsuccessful answer of the API server."""


# --- access: where the API server is and how to authenticate -----------------------------


@dataclass(frozen=True)
class ClusterAccess:
    """How to reach one API server: its URL, TLS settings and credentials."""

    server: str
    tls: ssl.SSLContext | None = None
    token: str | None = None
    token_file: Path | None = None
    basic: tuple[str, str] | None = None

    def authorization(self) -> str | None:
        """The ``Authorization`` value for the next request. A token file is read each
        time: the kubelet rewrites projected service-account tokens before they expire."""
        if self.token_file is not None:
            return "Bearer " + self.token_file.read_text(encoding="utf-8").strip()
        if self.token:
            return "Bearer " + self.token
        if self.basic is not None:
            pair = f"{self.basic[0]}:{self.basic[1]}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        return None


class _ClusterAuth(httpx.Auth):
    def __init__(self, access: ClusterAccess) -> None:
        self.access = access

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        value = self.access.authorization()
        if value is not None:
            request.headers["Authorization"] = value
        yield request


def in_cluster_access(
    environ: Mapping[str, str] | None = None, account_dir: Path = SERVICE_ACCOUNT_DIR
) -> ClusterAccess:
    """The pod's own access: ``KUBERNETES_SERVICE_HOST/PORT``, its service-account token
    and the cluster CA, as every in-cluster client finds them."""
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST")
    port = env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubernetesConfigError(
            "not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset) "
            "and discovery.kubernetes.kubeconfig is empty"
        )
    token_file = account_dir / "token"
    if not token_file.is_file():
        raise KubernetesConfigError(f"service-account token {token_file} not found")
    ca = account_dir / "ca.crt"
    tls = _tls_context(ca_file=str(ca) if ca.is_file() else None)
    return ClusterAccess(server=f"https://{_host_port(host, port)}", tls=tls, token_file=token_file)


def kubeconfig_access(path: str | Path) -> ClusterAccess:
    """The current context of a kubeconfig file: its cluster's server and CA, and its user's
    token, token file, client certificate or basic credentials. Relative file names are
    relative to the kubeconfig's directory, as kubectl resolves them."""
    file = Path(path).expanduser()
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KubernetesConfigError(f"cannot read kubeconfig {file}: {exc}") from exc
    if not isinstance(document, dict):
        raise KubernetesConfigError(f"kubeconfig {file} is not a mapping")
    context_name = document.get("current-context")
    if not context_name:
        raise KubernetesConfigError(f"kubeconfig {file} has no current-context")
    context = _named(document, "contexts", context_name, "context", file)
    cluster = _named(document, "clusters", context.get("cluster"), "cluster", file)
    user = (
        _named(document, "users", context.get("user"), "user", file) if context.get("user") else {}
    )
    server = cluster.get("server")
    if not server:
        raise KubernetesConfigError(
            f"kubeconfig {file}: cluster {context.get('cluster')!r} has no server"
        )

    def local(value: Any) -> str | None:
        return str(file.parent / str(value)) if value else None

    def data(value: Any) -> bytes | None:
        if not value:
            return None
        try:
            return base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KubernetesConfigError(f"kubeconfig {file}: bad base64 data: {exc}") from exc

    tls = None
    if str(server).startswith("https://"):
        ca_data = data(cluster.get("certificate-authority-data"))
        tls = _tls_context(
            ca_file=local(cluster.get("certificate-authority")),
            ca_data=ca_data.decode("ascii", "replace") if ca_data else None,
            cert_file=local(user.get("client-certificate")),
            cert_data=data(user.get("client-certificate-data")),
            key_file=local(user.get("client-key")),
            key_data=data(user.get("client-key-data")),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )
    token_file = local(user.get("tokenFile"))
    basic = (
        (str(user["username"]), str(user.get("password") or "")) if user.get("username") else None
    )
    has_cert = bool(user.get("client-certificate") or user.get("client-certificate-data"))
    if not (user.get("token") or token_file or basic or has_cert) and (
        user.get("exec") or user.get("auth-provider")
    ):
        raise KubernetesConfigError(
            f"kubeconfig {file}: exec and auth-provider credential plugins are not supported; "
            "give the user a token, tokenFile or client certificate"
        )
    return ClusterAccess(
        server=str(server).rstrip("/"),
        tls=tls,
        token=str(user["token"]) if user.get("token") else None,
        token_file=Path(token_file) if token_file else None,
        basic=basic,
    )


def _named(
    document: dict[str, Any], section: str, name: Any, inner: str, file: Path
) -> dict[str, Any]:
    for entry in document.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(inner)
            return value if isinstance(value, dict) else {}
    raise KubernetesConfigError(f"kubeconfig {file}: no {section[:-1]} named {name!r}")


def _tls_context(
    *,
    ca_file: str | None = None,
    ca_data: str | None = None,
    cert_file: str | None = None,
    cert_data: bytes | None = None,
    key_file: str | None = None,
    key_data: bytes | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    """A client TLS context. A given CA replaces the system store (the cluster's own CA is
    what signs the API server), as in kubectl."""
    try:
        if ca_file or ca_data:
            context = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
        else:
            context = ssl.create_default_context()
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cert_file or cert_data:
            # ssl loads client certificates from files only: inline data goes to a private
            # temporary directory that is removed as soon as the context holds the key.
            with tempfile.TemporaryDirectory(prefix="octopus-k8s-") as folder:
                if cert_data is not None:
                    cert_file = str(Path(folder, "client.crt"))
                    Path(cert_file).write_bytes(cert_data)
                if key_data is not None:
                    key_file = str(Path(folder, "client.key"))
                    Path(key_file).write_bytes(key_data)
                context.load_cert_chain(str(cert_file), key_file)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise KubernetesConfigError(f"bad TLS material for the API server: {exc}") from exc
    return context


def _host_port(host: str, port: str | int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- the backend ---------------------------------------------------------------------------


@dataclass
class _Resource:
    """One listed-and-watched collection and the objects currently in it."""

    kind: str
    path: str
    selector: str
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    listed: bool = False


class KubernetesBackend(ResilientBackend):
    """Services selected by label, their EndpointSlices, listed then watched.

    Outage bookkeeping (``state``, ``last_error``, the ``failures``/``outages``/``relists``
    counters, one log line per transition) is :class:`ResilientBackend`'s; each of the two
    loops keeps its own backoff so that one failing resource does not slow the other.
    """

    name = "kubernetes"

    def __init__(
        self,
        namespace: str = "",
        label_selector: str = "farp.io/enabled=true",
        kubeconfig: str | None = None,
        *,
        watch_timeout: float = 300.0,
        request_timeout: float = 10.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
        environ: Mapping[str, str] | None = None,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    ) -> None:
        super().__init__(backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.namespace = namespace
        self.label_selector = label_selector
        self.kubeconfig = kubeconfig
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.environ = environ
        self.service_account_dir = service_account_dir
        scope = f"/namespaces/{namespace}" if namespace else ""
        self._resources = (
            _Resource("services", f"/api/v1{scope}/services", label_selector),
            _Resource(
                "endpointslices",
                f"/apis/discovery.k8s.io/v1{scope}/endpointslices",
                SERVICE_NAME_LABEL,
            ),
        )
        self._failing: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._client: httpx.AsyncClient | None = None

    async def watch(self) -> AsyncIterator[list[DiscoveredInstance]]:
        tasks = [
            asyncio.create_task(self._follow(resource), name=f"kubernetes-{resource.kind}")
            for resource in self._resources
        ]
        last: list[DiscoveredInstance] | None = None
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                if not all(resource.listed for resource in self._resources):
                    continue  # the first snapshot needs both collections
                snapshot = self._snapshot()
                if snapshot != last:
                    last = snapshot
                    yield snapshot
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- list and watch ------------------------------------------------------------------

    async def _follow(self, resource: _Resource) -> None:
        """List, then watch until the stream breaks; re-list after a 410, back off after
        an error. A re-list replaces the collection only once it is complete."""
        backoff = Backoff(self.backoff.initial, self.backoff.maximum)
        gone = Backoff(self.backoff.initial, self.backoff.maximum)
        while True:
            try:
                client = self._http()
                version = await self._list(client, resource)
                backoff.reset()
                self._ok(resource.kind)
                while True:
                    version, delivered = await self._watch_once(client, resource, version)
                    if delivered:
                        gone.reset()
            except asyncio.CancelledError:
                raise
            except _Gone as exc:
                self.relists += 1
                log.info(
                    "kubernetes watch window missed, re-listing",
                    extra={"resource": resource.kind, "reason": str(exc)},
                )
                # A 410 is routine (the window moved on): re-list at once. Only when the
                # server keeps answering 410 straight after a list is there a reason to wait.
                delay = gone.next()
                if gone.attempts > 1:
                    await asyncio.sleep(delay)
            except Exception as exc:  # any failure: keep the last snapshot and retry
                self._failing[resource.kind] = str(exc)
                self.failed(exc, f"list/watch {resource.kind}")
                await asyncio.sleep(backoff.next())

    async def _list(self, client: httpx.AsyncClient, resource: _Resource) -> str:
        items: dict[str, dict[str, Any]] = {}
        params = {"labelSelector": resource.selector, "limit": str(PAGE_SIZE)}
        version = ""
        while True:
            response = await client.get(resource.path, params=params)
            if response.status_code == 410:  # an expired continue token
                raise _Gone(_status_message(response))
            if response.status_code != 200:
                raise _ApiError(f"list {resource.kind}: {_status_message(response)}")
            body = response.json()
            for item in body.get("items") or []:
                items[_object_key(item)] = item
            metadata = body.get("metadata") or {}
            version = str(metadata.get("resourceVersion") or "")
            token = metadata.get("continue")
            if not token:
                break
            params = {**params, "continue": token}
        resource.items = items
        resource.listed = True
        self._changed.set()
        return version

    async def _watch_once(
        self, client: httpx.AsyncClient, resource: _Resource, version: str
    ) -> tuple[str, bool]:
        """One watch request, until the server ends it (``timeoutSeconds``); returns the
        resourceVersion to resume from and whether any event arrived."""
        params = {
            "labelSelector": resource.selector,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(int(self.watch_timeout)),
        }
        # The read timeout outlasts the server's own timeout: silence until then is normal.
        timeout = httpx.Timeout(self.request_timeout, read=self.watch_timeout + 30)
        delivered = False
        async with client.stream("GET", resource.path, params=params, timeout=timeout) as response:
            if response.status_code == 410:
                raise _Gone(_status_message(response, await response.aread()))
            if response.status_code != 200:
                body = await response.aread()
                raise _ApiError(f"watch {resource.kind}: {_status_message(response, body)}")
            async for line in response.aiter_lines():
                if line.strip():
                    version = self._apply(resource, json.loads(line), version)
                    delivered = True
        return version, delivered

    def _apply(self, resource: _Resource, event: dict[str, Any], version: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(str(obj.get("message") or "410 Gone"))
            raise _ApiError(f"watch {resource.kind}: error {obj.get('code')}: {obj.get('message')}")
        new_version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        self._ok(resource.kind)
        if kind == "BOOKMARK":
            return new_version
        if kind in ("ADDED", "MODIFIED"):
            resource.items[_object_key(obj)] = obj
        elif kind == "DELETED":
            resource.items.pop(_object_key(obj), None)
        else:
            log.debug("unknown kubernetes watch event ignored", extra={"type": kind})
            return version
        self._changed.set()
        return new_version

    def _http(self) -> httpx.AsyncClient:
        """The client, built on first use: configuration problems then surface as an
        outage with a reason (and a retry) rather than as a crash at start-up."""
        if self._client is None:
            access = (
                kubeconfig_access(self.kubeconfig)
                if self.kubeconfig
                else in_cluster_access(self.environ, self.service_account_dir)
            )
            self._client = httpx.AsyncClient(
                base_url=access.server,
                verify=access.tls if access.tls is not None else True,
                auth=_ClusterAuth(access),
                headers={"Accept": "application/json"},
                timeout=httpx.Timeout(self.request_timeout),
            )
        return self._client

    # --- state -----------------------------------------------------------------------------

    def _ok(self, source: str) -> None:
        """``source`` answered; the backend is back once both resources are listed and
        neither is failing."""
        self._failing.pop(source, None)
        if not self._failing and all(resource.listed for resource in self._resources):
            self.recovered()

    # --- snapshot --------------------------------------------------------------------------

    def _snapshot(self) -> list[DiscoveredInstance]:
        services, slices = self._resources
        by_service: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for slice_ in slices.items.values():
            metadata = slice_.get("metadata") or {}
            owner = (metadata.get("labels") or {}).get(SERVICE_NAME_LABEL)
            if owner:
                by_service.setdefault((metadata.get("namespace") or "", owner), []).append(slice_)
        found: dict[str, DiscoveredInstance] = {}
        for service in services.items.values():
            metadata = service.get("metadata") or {}
            namespace = metadata.get("namespace") or ""
            name = metadata.get("name") or ""
            annotations = metadata.get("annotations") or {}
            farp = farp_metadata(metadata.get("labels") or {}, annotations)
            port_name = annotations.get(PORT_ANNOTATION)
            owned = by_service.get((namespace, name), [])
            for slice_ in sorted(owned, key=lambda s: (s.get("metadata") or {}).get("name", "")):
                port = _pick_port(slice_.get("ports"), port_name)
                if port is None:
                    continue
                for endpoint in slice_.get("endpoints") or []:
                    if (endpoint.get("conditions") or {}).get("ready") is False:
                        continue  # unknown readiness (absent) counts as ready, as in kube-proxy
                    addresses = endpoint.get("addresses") or []
                    if not addresses:
                        continue
                    # The addresses of one endpoint are fungible; the API says to use the first.
                    address = _host_port(str(addresses[0]), port)
                    key = f"k8s:{namespace}/{name}/{address}"
                    target = endpoint.get("targetRef") or {}
                    found.setdefault(
                        key,
                        DiscoveredInstance(
                            key=key,
                            manifest=None,
                            address=address,
                            service_name=name,
                            instance_id=str(target.get("name") or address),
                            metadata=dict(farp),
                        ),
                    )
        return [found[key] for key in sorted(found)]


def farp_metadata(labels: Mapping[str, str], annotations: Mapping[str, str]) -> dict[str, str]:
    """The ``farp.*`` metadata of a Service. Plain ``farp.*`` annotation keys are copied;
    prefixed keys (``farp.io/...``) are Kubernetes-style settings, of which the manifest URL
    becomes ``farp.manifest``. The selection label or a manifest URL means FARP is on."""
    farp = {
        key: str(value)
        for key, value in annotations.items()
        if key.startswith("farp.") and "/" not in key
    }
    url = annotations.get(MANIFEST_ANNOTATION)
    if url:
        farp.setdefault("farp.manifest", str(url))
        farp.setdefault("farp.enabled", "true")
    if labels.get(ENABLED_LABEL) == "true":
        farp.setdefault("farp.enabled", "true")
    return farp


def _pick_port(ports: Any, name: str | None) -> int | None:
    for port in ports or []:
        if not isinstance(port, dict) or port.get("port") is None:
            continue
        if name is None or port.get("name") == name:
            return int(port["port"])
    return None


def _object_key(obj: dict[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    return f"{metadata.get('namespace') or ''}/{metadata.get('name') or ''}"


def _status_message(response: httpx.Response, body: bytes | None = None) -> str:
    """``HTTP 403: services is forbidden: ...`` from a Status body when there is one."""
    raw = body if body is not None else response.content
    try:
        message = json.loads(raw).get("message")
    except (ValueError, AttributeError):
        message = raw[:200].decode("utf-8", "replace").strip()
    return f"HTTP {response.status_code}: {message}" if message else f"HTTP {response.status_code}"
