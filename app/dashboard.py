"""The operator's dashboard at ``/_/`` and the ``/_/stats`` totals it charts.

``/_/`` answers browsers (``Accept: text/html``) with a static page shipped in the
package (``app/static/dashboard/``: no CDN, no build step) and everything else with the
JSON index of admin endpoints, as before. The page polls the admin JSON endpoints with
relative URLs every two seconds, so it works on the admin listener, under ``/_/`` on the
data port, below a ``root_path``, and behind admin basic auth (the browser resends the
credentials it was asked for).

``/_/stats`` gives running *totals* from the gateway's own metrics (requests by status
class, the latency histogram's buckets, upstream requests, in-flight requests); the
page turns successive answers into rates, error ratios and p50/p99, so the gateway keeps
no time series of its own. With several workers the totals come from the multiprocess
metric files and cover the whole instance, like ``/metrics``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.observability.metrics import GatewayMetrics
from gateway.runtime import Gateway

DASHBOARD_DIR = Path(__file__).resolve().parent / "static" / "dashboard"

#: The page loads only its own script and stylesheet and talks only to its own origin.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Vary": "Accept",
}

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


@lru_cache(maxsize=1)
def dashboard_page() -> str:
    """The page's HTML (read once; it holds no data, only the skeleton)."""
    return (DASHBOARD_DIR / "index.html").read_text(encoding="utf-8")


def wants_html(accept: str) -> bool:
    """Whether an ``Accept`` header prefers HTML to JSON.

    Browsers name ``text/html`` explicitly; API clients send ``application/json`` or
    ``*/*`` (curl, httpx), which keep getting the JSON index.
    """
    quality = {"text/html": 0.0, "application/json": 0.0}
    for item in accept.lower().split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media not in quality:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media] = max(quality[media], q)
    return quality["text/html"] > 0 and quality["text/html"] >= quality["application/json"]


def _families(metrics: GatewayMetrics) -> Iterable[Metric]:
    """The request metric families: this process's, or every worker's merged."""
    if metrics.multiprocess_dir is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics.multiprocess_dir)
        return registry.collect()
    return itertools.chain.from_iterable(
        metric.collect()
        for metric in (
            metrics.requests,
            metrics.duration,
            metrics.upstream_requests,
            metrics.active_connections,
        )
    )


def _status_class(status: str) -> str | None:
    if len(status) == 3 and status.isdigit() and "1" <= status[0] <= "5":
        return f"{status[0]}xx"
    return None


def _le(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.inf


def stats_document(gateway: Gateway) -> dict[str, Any]:
    """Totals since start for the dashboard's charts (see the module docstring)."""
    by_class = dict.fromkeys(_STATUS_CLASSES, 0)
    requests_total = 0
    routes: dict[str, dict[str, int]] = {}
    buckets: dict[float, float] = {}
    duration_sum = 0.0
    duration_count = 0.0
    upstreams: dict[str, dict[str, int]] = {}
    active = 0.0
    for family in _families(gateway.metrics):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "octopus_requests_total":
                count = int(value)
                requests_total += count
                status_class = _status_class(labels.get("status", ""))
                if status_class is not None:
                    by_class[status_class] += count
                route = routes.setdefault(labels.get("route", ""), {"requests": 0, "errors": 0})
                route["requests"] += count
                if status_class == "5xx":
                    route["errors"] += count
            elif name == "octopus_request_duration_seconds_bucket":
                le = _le(labels.get("le", "+Inf"))
                buckets[le] = buckets.get(le, 0.0) + value
            elif name == "octopus_request_duration_seconds_sum":
                duration_sum += value
            elif name == "octopus_request_duration_seconds_count":
                duration_count += value
            elif name == "octopus_upstream_requests_total":
                upstream = upstreams.setdefault(
                    labels.get("upstream", ""), {"requests": 0, "errors": 0}
                )
                upstream["requests"] += int(value)
                status = labels.get("status", "")
                if _status_class(status) in (None, "5xx"):  # 5xx, or no answer at all
                    upstream["errors"] += int(value)
            elif name == "octopus_active_connections":
                active += value
    table = gateway.table
    return {
        "time": time.time(),
        "started_at": gateway.started_at,
        "ready": bool(gateway.ready and not gateway.draining),
        "draining": gateway.draining,
        "table_version": table.version,
        "active_connections": int(active),
        "requests": {"total": requests_total, "by_class": by_class},
        "latency": {
            "count": int(duration_count),
            "sum": duration_sum,
            "buckets": [
                {"le": "+Inf" if math.isinf(le) else le, "count": int(count)}
                for le, count in sorted(buckets.items())
            ],
        },
        "routes": [{"route": name, **counts} for name, counts in sorted(routes.items())],
        "upstreams": [{"name": name, **counts} for name, counts in sorted(upstreams.items())],
    }


def dashboard_routes(
    gateway: Gateway, json_index: Callable[[Request], Awaitable[Response]]
) -> list[BaseRoute]:
    """``/_/`` (the page, or ``json_index`` for non-browsers) and ``/_/stats``."""

    async def index(request: Request) -> Response:
        if wants_html(request.headers.get("accept", "")):
            return HTMLResponse(dashboard_page(), headers=PAGE_HEADERS)
        response = await json_index(request)
        response.headers["Vary"] = "Accept"
        return response

    async def stats(request: Request) -> Response:
        return JSONResponse(stats_document(gateway), headers={"Cache-Control": "no-store"})

    return [
        Route("/_/", index, methods=["GET"]),
        Route("/_/stats", stats, methods=["GET"]),
    ]
