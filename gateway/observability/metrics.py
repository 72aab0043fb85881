"""Prometheus metrics with the names fixed by DESIGN.md §9.

Label values are bounded: routes are labelled by their path template, unknown methods
become ``OTHER``. Label children are cached per key so the hot path does one dict
lookup and one increment per metric.

Two storage modes, chosen by prometheus_client when it is first imported:

* **single process** (the default, and ``octopus run --workers 1``): values live in
  memory, in a registry per ``GatewayMetrics`` so that several gateways in one process
  (tests, apps mounting two gateways) never share a series;
* **multiprocess** (``PROMETHEUS_MULTIPROC_DIR`` set before the import; ``octopus run
  --workers N`` sets it for its workers, see :class:`MetricsDirectory`): every process
  writes its values to memory-mapped files named by its pid in that directory, and a
  scrape, whichever worker answers it, merges all files, so one scrape shows the whole
  instance. Counters and histograms of workers that died stay in the sum (totals never
  go backwards); gauges say how they combine (``multiprocess_mode``): in-flight
  requests add up over live workers, per-worker copies of the same state (FARP view,
  breaker state, plugins) show the highest live value, so a breaker open in any worker
  shows as open.

Process metrics (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``process_open_fds``...) describe the answering process in single-process mode. In
multiprocess mode the standard collector would only see the worker that happens to
answer, so :class:`InstanceProcessCollector` reports every live process of the instance
(the supervisor and each worker) as its own series with a ``pid`` label; sum them with
``sum without (pid) (...)``, which also works on single-process series.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger("octopus.metrics")

#: The environment variable prometheus_client reads (at import) to enable multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: File in the multiprocess directory naming the supervisor, so scrapes can report it too.
SUPERVISOR_PID_FILE = "octopus-supervisor.pid"

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
UNMATCHED = "unmatched"
_BREAKER_CODES = {"closed": 0, "half-open": 1, "open": 2}
_LIVE_PID_FILE = re.compile(r"gauge_livesum_(\d+)\.db$")


def multiprocess_directory() -> str | None:
    """The directory this process writes metric values to, or None in single-process mode.

    prometheus_client decides once, at import, whether values go to files; a variable set
    after that import would make scrapes read files nobody writes, so that case is
    reported and treated as single-process.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if not getattr(values.ValueClass, "_multiprocess", False):
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported; "
            "metrics are per process",
            extra={"directory": path},
        )
        return None
    # Values are written from the first metric on; a missing directory would fail there.
    os.makedirs(path, exist_ok=True)
    return path


class GatewayMetrics:
    """The gateway's metric families (one set per gateway instance)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_directory()
        r = self.registry
        self.requests = Counter(
            "octopus_requests_total",
            "HTTP requests handled, by method, status and route template.",
            ["method", "status", "route"],
            registry=r,
        )
        self.duration = Histogram(
            "octopus_request_duration_seconds",
            "Time from request start to the end of the response, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "octopus_upstream_requests_total",
            "Requests sent to upstreams, by upstream and the status it answered (or error).",
            ["upstream", "status"],
            registry=r,
        )
        self.active_connections = Gauge(
            "octopus_active_connections",
            "Requests and WebSocket sessions in progress.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.farp_services = Gauge(
            "octopus_farp_services_total",
            "FARP services currently routed.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.farp_routes = Gauge(
            "octopus_farp_routes_total",
            "Routes generated from FARP manifests, by service and route type.",
            ["service", "type"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.farp_schema_updates = Counter(
            "octopus_farp_schema_updates_total",
            "Schema sets accepted for a service (first sight or a changed checksum).",
            ["service"],
            registry=r,
        )
        self.farp_rejected = Counter(
            "octopus_farp_manifests_rejected_total",
            "Manifests rejected, by reason; the last good version keeps serving.",
            ["reason"],
            registry=r,
        )
        self.farp_fetch_failures = Counter(
            "octopus_farp_schema_fetch_failures_total",
            "Schema fetches that failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "octopus_circuit_breaker_state",
            "Circuit breaker state per endpoint: 0 closed, 1 half-open, 2 open "
            "(with several workers: the most open state any live worker sees).",
            ["upstream", "endpoint"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.plugin_loaded = Gauge(
            "octopus_plugin_loaded",
            "Plugins loaded, by name and version (always 1).",
            ["plugin", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        if self.multiprocess_dir is None:
            ProcessCollector(registry=r)
        self._request_children: dict[tuple[str, int, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}
        self._upstream_children: dict[tuple[str, str], Any] = {}
        self._farp_route_keys: set[tuple[str, str]] = set()

    @property
    def multiprocess(self) -> bool:
        return self.multiprocess_dir is not None

    def observe_request(self, method: str, status: int, route: str, seconds: float) -> None:
        if method not in KNOWN_METHODS:
            method = "OTHER"
        key = (method, status, route)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(method, str(status), route)
            self._request_children[key] = child
        child.inc()
        dkey = (method, route)
        hist = self._duration_children.get(dkey)
        if hist is None:
            hist = self.duration.labels(method, route)
            self._duration_children[dkey] = hist
        hist.observe(seconds)

    def observe_upstream(self, upstream: str, status: int | str) -> None:
        key = (upstream, str(status))
        child = self._upstream_children.get(key)
        if child is None:
            child = self.upstream_requests.labels(upstream, str(status))
            self._upstream_children[key] = child
        child.inc()

    def set_breaker(self, upstream: str, endpoint: str, state: str) -> None:
        self.breaker_state.labels(upstream, endpoint).set(_BREAKER_CODES.get(state, 0))

    def set_farp_routes(self, counts: dict[tuple[str, str], int]) -> None:
        """Replace the FARP route counts with ``counts`` (``(service, type) -> routes``).

        A series that disappears is removed in single-process mode; multiprocess files
        cannot forget a key, so there it is set to 0 instead of keeping a stale count.
        """
        gone = self._farp_route_keys - counts.keys()
        if self.multiprocess:
            for service, kind in gone:
                self.farp_routes.labels(service, kind).set(0)
        else:
            for service, kind in gone:
                self.farp_routes.remove(service, kind)
        for (service, kind), count in counts.items():
            self.farp_routes.labels(service, kind).set(count)
        self._farp_route_keys = set(counts)

    def exposition(self) -> bytes:
        """The text exposition: this gateway's registry, or every process's files."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        registry.register(InstanceProcessCollector(self.multiprocess_dir))
        return generate_latest(registry)


class InstanceProcessCollector:
    """``process_*`` metrics of every live process of a multi-worker instance, by pid.

    Live workers are the ones with a ``livesum`` gauge file (each worker creates one for
    ``octopus_active_connections`` at start, and the supervisor deletes it when the worker
    exits); the supervisor is named by :data:`SUPERVISOR_PID_FILE`.
    """

    _MERGED = (
        ("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", True),
        ("process_resident_memory_bytes", "Resident memory size in bytes.", False),
        ("process_virtual_memory_bytes", "Virtual memory size in bytes.", False),
        ("process_start_time_seconds", "Start time of the process since unix epoch.", False),
        ("process_open_fds", "Number of open file descriptors.", False),
        ("process_max_fds", "Maximum number of open file descriptors.", False),
    )

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def pids(self) -> list[int]:
        """The supervisor (when there is one) and the live workers, in pid order."""
        found: set[int] = set()
        supervisor = os.path.join(self.directory, SUPERVISOR_PID_FILE)
        with contextlib.suppress(OSError, ValueError), open(supervisor) as handle:
            found.add(int(handle.read().strip()))
        for name in os.listdir(self.directory):
            match = _LIVE_PID_FILE.match(name)
            if match:
                found.add(int(match.group(1)))
        return sorted(found)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, documentation, counter in self._MERGED:
            if counter:
                families[name] = CounterMetricFamily(
                    name.removesuffix("_total"), documentation, labels=["pid"]
                )
            else:
                families[name] = GaugeMetricFamily(name, documentation, labels=["pid"])
        for pid in self.pids():
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for metric in collector.collect():
                family = families.get(metric.name) or families.get(metric.name + "_total")
                if family is None:
                    continue
                for sample in metric.samples:
                    family.add_metric([str(pid)], sample.value)
        return list(families.values())

    def describe(self) -> Iterable[Metric]:
        return []


class MetricsDirectory:
    """The multiprocess directory of one ``octopus run --workers N`` start.

    The supervisor creates it before spawning workers and exports it as
    ``PROMETHEUS_MULTIPROC_DIR``, so spawned workers (fresh interpreters) import
    prometheus_client in multiprocess mode (in ``/dev/shm`` when there is one: memory,
    not disk). It starts empty on every start, so counts start from 0 and never mix with
    a previous run's pids; a directory the user named
    in ``PROMETHEUS_MULTIPROC_DIR`` is used and emptied of metric files instead of
    replaced. Exited workers are marked dead so their live gauges stop counting.
    """

    def __init__(self, path: str, *, owned: bool, previous: str | None) -> None:
        self.path = path
        self.owned = owned
        self._previous = previous

    @classmethod
    def create(cls) -> MetricsDirectory:
        given = os.environ.get(MULTIPROC_ENV)
        if given:
            os.makedirs(given, exist_ok=True)
            _remove_metric_files(given)
            directory = cls(given, owned=False, previous=given)
        else:
            path = tempfile.mkdtemp(prefix="octopus-metrics-", dir=_memory_backed_dir())
            directory = cls(path, owned=True, previous=None)
        with open(os.path.join(directory.path, SUPERVISOR_PID_FILE), "w") as handle:
            handle.write(str(os.getpid()))
        os.environ[MULTIPROC_ENV] = directory.path
        log.info("multiprocess metrics", extra={"directory": directory.path})
        return directory

    def process_exited(self, pid: int) -> None:
        """A worker is gone: its live gauges (in-flight requests...) must stop counting."""
        with contextlib.suppress(OSError):
            mark_process_dead(pid, self.path)

    def close(self) -> None:
        """Remove the values of this run (the whole directory when it was made here)."""
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            _remove_metric_files(self.path)
        if self._previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = self._previous


def _memory_backed_dir() -> str | None:
    """``/dev/shm`` when usable: every counted request writes to the value files, and on
    a disk-backed temp directory the kernel keeps writing those pages back to disk."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _remove_metric_files(path: str) -> None:
    for name in [*glob.glob(os.path.join(path, "*.db")), os.path.join(path, SUPERVISOR_PID_FILE)]:
        with contextlib.suppress(OSError):
            os.remove(name)
