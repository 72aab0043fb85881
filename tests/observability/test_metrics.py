"""Prometheus metrics: real values for every DESIGN.md §9 name, one instance-wide scrape
under ``octopus run --workers N``, and where ``/metrics`` is (and is not) served."""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.asgi import create_app
from gateway.observability.metrics import LATENCY_BUCKETS, GatewayMetrics
from tests.e2e.helpers import GatewayProcess, minimal_config, start_gateway, wait_until
from tests.support.gateway import MakeGateway, gateway_config, route
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamApp, UpstreamServer

Sample = tuple[str, dict[str, str], float]


def samples(text: str) -> list[Sample]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(found: list[Sample], name: str, **labels: str) -> float:
    return sum(
        value
        for sample_name, sample_labels, value in found
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )


def scrape(gateway: GatewayProcess) -> list[Sample]:
    response = httpx.get(f"{gateway.admin_url}/metrics", timeout=10)
    assert response.status_code == 200
    return samples(response.text)


def worker_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    config = minimal_config(upstream_url, **sections)
    config["routes"] = [
        {"name": "items", "match": {"path": "/items/{id}"}, "upstream": "echo"},
        {"name": "rest", "match": {"path": "/{rest:path}"}, "upstream": "echo"},
    ]
    return config


def get_on_new_connections(url: str, paths: list[str]) -> None:
    """One connection per request, several at a time, so every worker accepts some."""

    def get(path: str) -> int:
        return httpx.get(f"{url}{path}", timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get, paths)) == {200}


def requests_per_worker(directory: str) -> dict[int, float]:
    """``octopus_requests_total`` as each worker's own file holds it."""
    counts: dict[int, float] = {}
    for path in glob.glob(os.path.join(directory, "counter_*.db")):
        pid = int(Path(path).stem.split("_")[1])
        for metric in MultiProcessCollector.merge([path], accumulate=False):
            if metric.name == "octopus_requests":
                counts[pid] = counts.get(pid, 0) + sum(
                    s.value for s in metric.samples if s.name == "octopus_requests_total"
                )
    return counts


@pytest.fixture(scope="module")
def echo() -> Iterator[UpstreamServer]:
    with UpstreamServer("echo") as server:
        yield server


def test_one_scrape_counts_the_requests_of_every_worker(echo: UpstreamServer) -> None:
    with start_gateway(worker_config(echo.url), "--workers", "2") as gateway:
        directory = next(
            r["directory"] for r in gateway.log_records() if r["message"] == "multiprocess metrics"
        )
        sent = 0
        # Connections go to whichever worker accepts first; keep sending (bounded) until
        # both have served some, so the sum below really adds two workers up.
        while sent < 200:
            get_on_new_connections(gateway.data_url, [f"/items/{sent + i}" for i in range(40)])
            sent += 40
            if len([c for c in requests_per_worker(directory).values() if c]) == 2:
                break
        per_worker = requests_per_worker(directory)
        assert len(per_worker) == 2 and all(per_worker.values()), per_worker

        found = scrape(gateway)
        route_labels = {"route": "/items/{id}", "method": "GET"}
        assert total(found, "octopus_requests_total", status="200", **route_labels) == sent
        assert sum(per_worker.values()) == sent
        assert total(found, "octopus_request_duration_seconds_count", **route_labels) == sent
        buckets = {
            labels["le"]: value
            for name, labels, value in found
            if name == "octopus_request_duration_seconds_bucket"
            and labels["route"] == "/items/{id}"
        }
        assert set(buckets) == {str(b) for b in LATENCY_BUCKETS} | {"+Inf"}
        assert buckets["+Inf"] == sent
        upstream_ok = total(found, "octopus_upstream_requests_total", upstream="echo", status="200")
        assert upstream_ok == sent
        assert ("octopus_active_connections", {}, 0.0) in found
        # The supervisor and both workers, each with its own process series.
        pids = {labels["pid"] for name, labels, _ in found if name == "process_cpu_seconds_total"}
        assert str(gateway.pid) in pids and len(pids) == 3
        assert total(found, "process_resident_memory_bytes") > 0
        assert total(found, "process_open_fds") > 0
    assert not os.path.exists(directory), "the metrics directory outlives the gateway"


def test_counts_start_from_zero_on_every_start(echo: UpstreamServer, tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    config = worker_config(echo.url)
    with start_gateway(config, "--workers", "2", env=env) as first:
        get_on_new_connections(first.data_url, [f"/items/{i}" for i in range(5)])
        assert total(scrape(first), "octopus_requests_total", route="/items/{id}") == 5
    assert directory.is_dir() and not list(directory.glob("*.db"))

    (directory / "counter_1.db").write_bytes(b"stale")  # a crashed run's leftovers
    with start_gateway(config, "--workers", "2", env=env) as second:
        get_on_new_connections(second.data_url, [f"/items/{i}" for i in range(3)])
        assert total(scrape(second), "octopus_requests_total", route="/items/{id}") == 3


def test_a_dead_worker_leaves_the_live_gauges_and_process_list(echo: UpstreamServer) -> None:
    with start_gateway(worker_config(echo.url), "--workers", "2") as gateway:
        get_on_new_connections(gateway.data_url, [f"/items/{i}" for i in range(10)])
        before = scrape(gateway)
        workers = {
            labels["pid"] for name, labels, _ in before if name == "process_cpu_seconds_total"
        } - {str(gateway.pid)}
        victim = int(sorted(workers)[0])
        os.kill(victim, signal.SIGKILL)
        gateway.wait_for_log(
            lambda r: r.get("message") == "worker ready" and r.get("pid") != victim, timeout=30
        )

        def replaced() -> list[Sample] | None:
            found = scrape(gateway)
            pids = {labels["pid"] for name, labels, _ in found if name == "process_open_fds"}
            return found if str(victim) not in pids and len(pids) == 3 else None

        after = wait_until(replaced, timeout=15)
        # Counters of the dead worker still count: totals never go backwards.
        assert total(after, "octopus_requests_total", route="/items/{id}") == 10
        assert ("octopus_active_connections", {}, 0.0) in after


def test_single_process_metrics_include_process_metrics(
    make_gateway: MakeGateway, upstream: UpstreamApp, upstream_server: UpstreamServer
) -> None:
    gw = make_gateway(
        gateway_config({"svc": upstream_server.url}, [route("users", "/users/{id}", "svc")])
    )
    with gw.client() as client:
        for index in range(3):
            assert client.get(f"/users/{index}").status_code == 200
        assert client.get("/nowhere").status_code == 404
        found = samples(client.get("/metrics").text)
    labels = {"method": "GET", "route": "/users/{id}"}
    assert total(found, "octopus_requests_total", status="200", **labels) == 3
    assert total(found, "octopus_requests_total", status="404", route="unmatched") == 1
    assert total(found, "octopus_request_duration_seconds_bucket", le="+Inf", **labels) == 3
    assert total(found, "octopus_upstream_requests_total", upstream="svc", status="200") == 3
    names = {name for name, _, _ in found}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    assert "process_open_fds" in names


def test_metrics_are_on_the_data_port_only_when_asked(
    upstream: UpstreamApp, upstream_server: UpstreamServer
) -> None:
    """``octopus run``'s data listener (no admin plane on it) proxies the metrics path
    like any other unless ``expose_on_data_port`` is set."""
    routes = [route("all", "/{rest:path}", "svc")]
    closed = gateway_config({"svc": upstream_server.url}, routes)
    with ThreadedServer(create_app(closed, serve_admin=False)) as server:
        response = httpx.get(f"{server.url}/metrics")
        assert response.status_code == 200 and upstream.paths == ["/metrics"]

    upstream.reset()
    exposed = gateway_config(
        {"svc": upstream_server.url},
        routes,
        observability={"metrics": {"path": "/prom", "expose_on_data_port": True}},
    )
    with ThreadedServer(create_app(exposed, serve_admin=False)) as server:
        httpx.get(f"{server.url}/hello")
        response = httpx.get(f"{server.url}/prom")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert 'octopus_requests_total{method="GET",route="/{rest:path}",status="200"}' in (
            response.text
        )
        assert upstream.paths == ["/hello"]


def test_disabled_metrics_are_not_served(
    make_gateway: MakeGateway, upstream_server: UpstreamServer
) -> None:
    gw = make_gateway(
        gateway_config(
            {"svc": upstream_server.url},
            [route("users", "/users/{id}", "svc")],
            observability={"metrics": {"enabled": False}},
        )
    )
    with gw.client() as client:
        assert client.get("/metrics").status_code == 404


def test_farp_route_counts_drop_services_that_left() -> None:
    metrics = GatewayMetrics()
    metrics.set_farp_routes({("users", "openapi"): 3, ("orders", "openapi"): 1})
    metrics.set_farp_routes({("users", "openapi"): 2})
    found = samples(metrics.exposition().decode())
    assert total(found, "octopus_farp_routes_total", service="users") == 2
    assert not [s for s in found if s[1].get("service") == "orders"]
