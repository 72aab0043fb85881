"""Shared pieces of the resilience tests: configs, admin and metric reads, a client loop."""

from __future__ import annotations

import threading
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.controlled import ControlledUpstream
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.waiting import eventually

#: The upstream every test config defines.
UPSTREAM = "svc"


def config_for(
    servers: list[ControlledUpstream] | list[tuple[ControlledUpstream, int]],
    *,
    route_options: dict[str, Any] | None = None,
    **tuning: Any,
) -> dict[str, Any]:
    """One upstream over ``servers`` (optionally ``(server, weight)`` pairs) with the
    upstream keys in ``tuning``, and one catch-all route to it."""
    endpoints = []
    for entry in servers:
        if isinstance(entry, tuple):
            endpoints.append({"url": entry[0].url, "weight": entry[1]})
        else:
            endpoints.append({"url": entry.url})
    return gateway_config(
        {UPSTREAM: {"endpoints": endpoints, **tuning}},
        [route("all", "/{rest:path}", UPSTREAM, **(route_options or {}))],
    )


def served_by(response: httpx.Response) -> str:
    """The name of the upstream server that answered."""
    assert response.status_code == 200, response.text
    name: str = response.json()["server"]
    return name


def endpoint_view(client: httpx.Client, server: ControlledUpstream) -> dict[str, Any]:
    """``server``'s entry in ``/_/services``."""
    response = client.get("/_/services")
    assert response.status_code == 200, response.text
    for upstream in response.json()["upstreams"]:
        if upstream["name"] != UPSTREAM:
            continue
        for endpoint in upstream["endpoints"]:
            if endpoint["url"] == server.url:
                return dict(endpoint)
    raise AssertionError(f"{server.url} is not in /_/services: {response.text}")


def breaker_gauge(client: httpx.Client, server: ControlledUpstream) -> float | None:
    """``octopus_circuit_breaker_state`` of ``server`` as ``/metrics`` exposes it."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        if family.name != "octopus_circuit_breaker_state":
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("upstream") == UPSTREAM and labels.get("endpoint") == server.url:
                return float(sample.value)
    return None


class ClientLoop:
    """A client sending GETs back to back from a thread until stopped.

    Every answer is recorded: ``statuses`` (one per completed request), ``served`` (who
    answered each 200) and ``errors`` (anything that was not a 200: a status with its
    body, or a transport exception).
    """

    def __init__(self, gateway: GatewayServer, path: str = "/loop") -> None:
        self.url = gateway.url
        self.path = path
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.served: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def count(self) -> int:
        return len(self.statuses) + sum(1 for e in self.errors if e.startswith("exception"))

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            index = 0
            while not self._stop.is_set():
                index += 1
                try:
                    response = client.get(f"{self.path}/{index}")
                except httpx.HTTPError as exc:
                    self.errors.append(f"exception {index}: {exc!r}")
                    continue
                self.statuses.append(response.status_code)
                if response.status_code == 200:
                    self.served.append(response.json()["server"])
                else:
                    self.errors.append(f"{response.status_code} {index}: {response.text}")

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Until at least ``count`` requests have completed."""
        eventually(
            lambda: self.count >= count,
            timeout=timeout,
            message=f"the client loop completed only {self.count} of {count} requests",
        )

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
