"""``discovery:``: where FARP manifests come from.

Two shapes are accepted, one backend (``{backend: etcd, etcd: {...}}``) or
several (``{backends: [{backend: etcd, etcd: {...}}, ...]}``).  Consumers should
not care which was written, so :meth:`DiscoverySettings.entries` flattens both
into one list of ``(backend name, config)`` with defaults filled in.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from settings.fields import ConfigModel, located_error

__all__ = [
    "BACKEND_MODELS",
    "DISCOVERY_BACKENDS",
    "BackendName",
    "ConsulDiscovery",
    "DiscoveryBackendEntry",
    "DiscoverySettings",
    "DnsDiscovery",
    "EtcdDiscovery",
    "EtcdTLSSettings",
    "EurekaDiscovery",
    "FileDiscovery",
    "KubernetesDiscovery",
    "RedisDiscovery",
    "StaticDiscovery",
]

BackendName = Literal["file", "static", "etcd", "consul", "kubernetes", "eureka", "dns", "redis"]
DISCOVERY_BACKENDS: tuple[str, ...] = get_args(BackendName)


class FileDiscovery(ConfigModel):
    """A directory of ``*.json``/``*.yaml`` manifests, watched for changes."""

    path: str = "./services"


class StaticDiscovery(ConfigModel):
    """Manifests written inline; free-form because the FARP layer validates them."""

    manifests: list[dict[str, Any]] = Field(default_factory=list)


class EtcdTLSSettings(ConfigModel):
    """Client TLS towards etcd (file paths)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


class EtcdDiscovery(ConfigModel):
    """Manifests stored under a key prefix in etcd."""

    endpoints: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:2379"])
    prefix: str = "/farp"
    username: str | None = None
    password: str | None = None
    tls: EtcdTLSSettings | None = None


class RedisDiscovery(ConfigModel):
    """Manifests as TTL'd keys plus a pub/sub channel of change events."""

    url: str = "redis://127.0.0.1:6379/0"


class DnsDiscovery(ConfigModel):
    """SRV + TXT records ``_{service}._tcp.{domain}``."""

    #: ``host:port`` of resolvers; empty means the system's.
    nameservers: list[str] = Field(default_factory=list)
    domain: str = ""
    services: list[str] = Field(default_factory=list)


class ConsulDiscovery(ConfigModel):
    """Services registered in Consul's catalog."""

    address: str = "http://127.0.0.1:8500"
    token: str | None = None
    datacenter: str | None = None
    #: Only these services; ``None`` means all.
    services: list[str] | None = None


class KubernetesDiscovery(ConfigModel):
    """Services labelled for FARP in a cluster."""

    #: Empty means all namespaces.
    namespace: str = ""
    label_selector: str = "farp.io/enabled=true"
    #: Empty/None means in-cluster configuration.
    kubeconfig: str | None = None


class EurekaDiscovery(ConfigModel):
    """Applications registered in a Eureka server."""

    url: str = "http://127.0.0.1:8761/eureka"
    username: str | None = None
    password: str | None = None


BACKEND_MODELS: dict[str, type[ConfigModel]] = {
    "file": FileDiscovery,
    "static": StaticDiscovery,
    "etcd": EtcdDiscovery,
    "consul": ConsulDiscovery,
    "kubernetes": KubernetesDiscovery,
    "eureka": EurekaDiscovery,
    "dns": DnsDiscovery,
    "redis": RedisDiscovery,
}


class _BackendBlocks(ConfigModel):
    """One optional block per backend, named after it."""

    file: FileDiscovery | None = None
    static: StaticDiscovery | None = None
    etcd: EtcdDiscovery | None = None
    consul: ConsulDiscovery | None = None
    kubernetes: KubernetesDiscovery | None = None
    eureka: EurekaDiscovery | None = None
    dns: DnsDiscovery | None = None
    redis: RedisDiscovery | None = None

    def block(self, name: str) -> ConfigModel:
        """The block for backend ``name``, or that backend's defaults if absent."""
        found = getattr(self, name)
        return found if found is not None else BACKEND_MODELS[name]()


class DiscoveryBackendEntry(_BackendBlocks):
    """One item of ``discovery.backends``: ``{backend: NAME, NAME: {...}}``."""

    backend: BackendName

    @model_validator(mode="after")
    def _only_own_block(self) -> DiscoveryBackendEntry:
        # A block for another backend in the same entry is almost surely a mistake
        # (copy-paste, or a wrong ``backend:``); it would be silently ignored.
        others = [
            ((name,), f"does not match backend {self.backend!r} of this entry")
            for name in DISCOVERY_BACKENDS
            if name != self.backend and getattr(self, name) is not None
        ]
        if others:
            raise located_error(others)
        return self


class DiscoverySettings(_BackendBlocks):
    """``discovery:``.  Blocks for backends not in use are allowed and ignored, so a
    config can keep several and switch with ``OCTOPUS_DISCOVERY__BACKEND``."""

    #: ``None`` turns discovery off (static routes only).
    backend: BackendName | None = "file"
    backends: list[DiscoveryBackendEntry] | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> DiscoverySettings:
        if self.backends is not None and "backend" in self.model_fields_set and self.backend:
            raise located_error([(("backend",), "set either backend or backends, not both")])
        return self

    def entries(self) -> list[tuple[str, ConfigModel]]:
        """The backends to run, as ``(name, config model)``, defaults filled in."""
        if self.backends is not None:
            return [(entry.backend, entry.block(entry.backend)) for entry in self.backends]
        if self.backend is None:
            return []
        return [(self.backend, self.block(self.backend))]
