"""Backends from configuration: ``discovery.backend`` or ``discovery.backends``."""

from __future__ import annotations

from typing import Any

from gateway.discovery.base import DiscoveryBackend
from gateway.discovery.consul import ConsulBackend
from gateway.discovery.dns import DnsBackend
from gateway.discovery.etcd import EtcdBackend
from gateway.discovery.eureka import EurekaBackend
from gateway.discovery.file import FileBackend
from gateway.discovery.kubernetes import KubernetesBackend
from gateway.discovery.redis import RedisBackend
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
        elif name == "etcd":
            tls = config.tls
            backends.append(
                EtcdBackend(
                    list(config.endpoints),
                    config.prefix,
                    username=config.username,
                    password=config.password,
                    ca=tls.ca if tls else None,
                    cert=tls.cert if tls else None,
                    key=tls.key if tls else None,
                )
            )
        elif name == "redis":
            backends.append(RedisBackend(config.url, interval=interval))
        elif name == "dns":
            backends.append(
                DnsBackend(
                    list(config.services),
                    config.domain,
                    list(config.nameservers),
                    interval=interval,
                )
            )
        elif name == "consul":
            services = list(config.services) if config.services is not None else None
            backends.append(
                ConsulBackend(config.address, config.token, config.datacenter, services)
            )
        elif name == "kubernetes":
            backends.append(
                KubernetesBackend(config.namespace, config.label_selector, config.kubeconfig)
            )
        elif name == "eureka":
            backends.append(
                EurekaBackend(config.url, config.username, config.password, interval=interval)
            )
        else:  # settings refuses these with "not supported yet" until they land
            raise ValueError(f"discovery backend {name!r} is not supported yet")
    return backends
