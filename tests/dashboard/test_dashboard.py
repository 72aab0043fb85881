"""The admin dashboard (``/_/``) in a real headless Chromium, and the ``/_/stats`` it charts.

The browser is Debian's ``chromium`` (installed by ``.ci/system-deps.sh``), driven by
Playwright with ``executable_path``: nothing is downloaded. Without Chromium or
Playwright the browser tests skip on a developer machine and fail under ``CI=true``.

Two real setups: ``octopus run`` as a process (the page on the admin listener, no
auth), and ``create_app`` on uvicorn in a thread with admin basic auth (the page under
``/_/`` on the data port). Both serve a static route, a FARP service from the static
discovery backend, a dead upstream (so health and breaker states show), and a plugin.
The screenshot of the first lands in ``tests/artifacts/dashboard.png``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import bcrypt
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from app.dashboard import CONTENT_SECURITY_POLICY, DASHBOARD_DIR, wants_html
from gateway.asgi import create_app
from gateway.farp.publish import inline_schema, make_manifest
from tests.e2e.helpers import start_gateway
from tests.support.gateway import GatewayServer
from tests.support.servers import ThreadedServer, free_port
from tests.support.upstream import UpstreamServer
from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("OCTOPUS_CHROMIUM", "/usr/bin/chromium")
#: Playwright's ``launch`` also gives every run a fresh temporary ``--user-data-dir``.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: A route name that would run script if the page ever used innerHTML with data.
HOSTILE_NAME = '<img src=x onerror="window.__pwned=1">'
USER = "admin"
PASSWORD = "dashboard-pw"
#: Polls come every 2 s; three polls (two rate points) take about 4 s.
POLL_TIMEOUT = 15.0


def _unavailable(reason: str) -> NoReturn:
    """Chromium cannot run here: a failure in CI, a skip on a developer machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the dashboard must be tested in a real browser)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} is missing (Debian chromium: run .ci/system-deps.sh)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS
            )
        except Error as exc:
            _unavailable(f"Chromium did not start: {exc}")
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("orders") as server:
        yield server


def inventory_manifest(address: str) -> dict[str, Any]:
    """A FARP service ``inventory`` whose OpenAPI document declares two operations."""
    document = {
        "openapi": "3.1.0",
        "info": {"title": "inventory", "version": "1.0.0"},
        "paths": {
            path: {"get": {"responses": {"200": {"description": "OK"}}}}
            for path in ("/items", "/items/{id}")
        },
    }
    return make_manifest(
        "inventory",
        "inventory-1",
        address,
        [inline_schema("openapi", document)],
        routing={"strategy": "service"},
    )


def dashboard_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    """Static routes to a live and a dead upstream, one FARP service, one plugin."""
    address = upstream_url.removeprefix("http://")
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "http_port": 0, "admin_port": 0, "workers": 1},
        "discovery": {"backend": "static", "static": {"manifests": [inventory_manifest(address)]}},
        "farp": {"watch_interval": "200ms"},
        "upstreams": {
            "orders": {"endpoints": [{"url": upstream_url}]},
            "legacy": {"endpoints": [{"url": f"http://127.0.0.1:{free_port()}"}], "retries": 0},
        },
        "routes": [
            {
                "name": "orders-api",
                "match": {"path": "/orders/{rest:path}"},
                "upstream": "orders",
                "strip_prefix": True,
            },
            {"name": "legacy-api", "match": {"path": "/legacy/{rest:path}"}, "upstream": "legacy"},
        ],
        "plugins": [{"name": "cors", "config": {"allow_origins": ["https://ops.example"]}}],
        "middleware": ["cors"],
        "observability": {"logging": {"access_log": False}},
    }
    config.update(sections)
    return config


def send_traffic(base_url: str, rounds: int = 1) -> None:
    """Successes, a few upstream 500s, and 502s from the dead upstream."""
    with httpx.Client(base_url=base_url, timeout=5) as client:
        for _ in range(rounds):
            for _ in range(12):
                assert client.get("/orders/items").status_code == 200
            assert client.get("/orders/status/500").status_code == 500
            for _ in range(3):  # two rounds open the dead upstream's breaker
                assert client.get("/legacy/x").status_code in (502, 503)
            client.get("/inventory/items")


class WatchedPage:
    """A page that records console errors and uncaught exceptions."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on(
            "console",
            lambda message: (
                self.errors.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def wait_polls(self, count: int) -> None:
        """Until the page has rendered ``count`` polls (read from Python: the page's CSP
        forbids the eval that ``wait_for_function`` would run in it)."""
        body = self.page.locator("body")
        deadline = time.monotonic() + POLL_TIMEOUT
        while int(body.get_attribute("data-polls") or 0) < count:
            assert time.monotonic() < deadline, f"fewer than {count} polls: {self.errors}"
            self.page.wait_for_timeout(100)

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()


def check_dashboard(watched: WatchedPage, data_url: str) -> None:
    """What an operator must see: routes with sources, services, discovery, plugins, and
    charts that draw after traffic."""
    page = watched.page
    watched.wait_polls(1)
    send_traffic(data_url)
    watched.wait_polls(2)
    send_traffic(data_url)
    watched.wait_polls(3)

    routes = page.locator("#routes tbody")
    static_row = routes.locator('tr[data-route="orders-api"]')
    assert static_row.count() == 1
    assert "static" in static_row.inner_text()
    assert "/orders/{rest:path}" in static_row.inner_text()
    farp_rows = routes.locator("tr", has_text="FARP inventory")
    assert farp_rows.count() >= 1, routes.inner_text()
    assert "/inventory/items" in routes.inner_text()

    orders = page.locator('#services article[data-upstream="orders"]')
    assert orders.count() == 1
    assert "healthy" in orders.inner_text()
    assert "orders-api" in orders.inner_text()
    legacy = page.locator('#services article[data-upstream="legacy"]')
    assert legacy.count() == 1
    assert "inventory" in page.locator("#services").inner_text()

    discovery = watched.text("#discovery tbody")
    assert "static" in discovery and "synced" in discovery
    assert "cors" in watched.text("#plugins tbody")
    assert watched.text("#gateway-state") == "ready"

    # Charts: every chart has drawn a line from the polled totals.
    for chart in ("chart-rate", "chart-errors", "chart-latency"):
        line = page.locator(f"#{chart} svg path.line").first
        assert line.count() == 1, chart
        assert re.match(r"M[\d.]+ [\d.]+", line.get_attribute("d") or ""), chart
    rate = float(watched.text("#card-rate"))
    assert rate > 0
    assert watched.text("#card-errors").endswith("%")
    assert re.fullmatch(r"[\d.]+ / [\d.]+", watched.text("#card-latency"))


def test_dashboard_on_the_admin_listener_of_a_running_gateway(
    browser: Any, upstream: UpstreamServer
) -> None:
    with start_gateway(dashboard_config(upstream.url)) as gateway:
        assert gateway.admin_url is not None
        eventually(lambda: httpx.get(f"{gateway.admin_url}/_/ready").status_code == 200, timeout=10)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        try:
            watched = WatchedPage(context)
            response = watched.page.goto(f"{gateway.admin_url}/_/")
            assert response is not None and response.status == 200
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["content-type"].startswith("text/html")
            check_dashboard(watched, gateway.data_url)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            watched.page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert watched.errors == []
        finally:
            context.close()


def test_dashboard_below_a_mount_point(browser: Any, upstream: UpstreamServer) -> None:
    """Mounted inside another app (``root_path``), the page's relative URLs still reach
    its assets and the admin documents."""
    gateway_app = create_app(dashboard_config(upstream.url))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield  # a mounted gateway starts on its first request; it stops with the host
        await gateway_app.gateway.shutdown()

    host = Starlette(routes=[Mount("/edge", app=gateway_app)], lifespan=lifespan)
    with ThreadedServer(host) as server:
        context = browser.new_context()
        try:
            watched = WatchedPage(context)
            response = watched.page.goto(f"{server.url}/edge/_/")
            assert response is not None and response.status == 200
            watched.wait_polls(2)
            assert watched.page.locator('#routes tr[data-route="orders-api"]').count() == 1
            assert watched.page.locator('#services [data-upstream="orders"]').count() == 1
            assert watched.errors == []
        finally:
            context.close()


@pytest.fixture(scope="module")
def guarded(upstream: UpstreamServer) -> Iterator[GatewayServer]:
    """The gateway as an ASGI app (admin under ``/_/`` on its port) with admin auth, and a
    route whose name is markup."""
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = dashboard_config(
        upstream.url,
        admin={"auth": {"type": "basic", "username": USER, "password_hash": password_hash}},
    )
    config["routes"].append(
        {"name": HOSTILE_NAME, "match": {"path": "/markup/{rest:path}"}, "upstream": "orders"}
    )
    with GatewayServer(config) as server:
        eventually(lambda: httpx.get(f"{server.url}/_/ready").status_code == 200, timeout=10)
        yield server


def test_dashboard_behind_admin_basic_auth(browser: Any, guarded: GatewayServer) -> None:
    context = browser.new_context(
        viewport={"width": 1280, "height": 900},
        http_credentials={"username": USER, "password": PASSWORD},
    )
    try:
        watched = WatchedPage(context)
        response = watched.page.goto(f"{guarded.url}/_/")
        assert response is not None and response.status == 200
        check_dashboard(watched, guarded.url)
        # Data is text, never markup: the hostile name shows as typed and ran nothing.
        row = watched.page.locator("#routes tbody tr", has_text="/markup/{rest:path}")
        assert row.locator("td").first.inner_text() == HOSTILE_NAME
        assert row.locator("img").count() == 0
        assert watched.page.evaluate("window.__pwned") is None
        watched.page.screenshot(path=str(ARTIFACTS / "dashboard-auth.png"), full_page=True)
        assert watched.errors == []
    finally:
        context.close()


def test_dashboard_without_credentials_is_refused(guarded: GatewayServer) -> None:
    """A browser without credentials gets the basic-auth challenge, for the page, its
    assets and its data alike."""
    accept = {"Accept": "text/html,*/*;q=0.8"}
    for path in ("/_/", "/_/stats", "/_/static/dashboard/dashboard.js"):
        response = httpx.get(f"{guarded.url}{path}", headers=accept)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Basic"), path
    wrong = httpx.get(f"{guarded.url}/_/", headers=accept, auth=(USER, "wrong"))
    assert wrong.status_code == 401


# ---- the JSON side: no browser needed -------------------------------------------------


def test_json_clients_keep_the_json_index(guarded: GatewayServer) -> None:
    auth = (USER, PASSWORD)
    for accept in ("application/json", "*/*", None):
        headers = {"Accept": accept} if accept else {}
        response = httpx.get(f"{guarded.url}/_/", headers=headers, auth=auth)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["vary"] == "Accept"
        assert "/_/stats" in response.json()["endpoints"]
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    page = httpx.get(f"{guarded.url}/_/", headers={"Accept": browser_accept}, auth=auth)
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("text/html,application/xhtml+xml,*/*;q=0.8", True),
        ("text/html", True),
        ("application/json", False),
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0.9, application/json;q=0.5", True),
        ("text/html;q=0", False),
        ("*/*", False),
        ("", False),
    ],
)
def test_accept_negotiation(accept: str, html: bool) -> None:
    assert wants_html(accept) is html


def test_stats_totals_follow_traffic(guarded: GatewayServer) -> None:
    """Totals grow by what was sent: per route exactly (the FARP service's answer is left
    out of the status counts: its health is probed in the background)."""
    auth = (USER, PASSWORD)

    def stats() -> dict[str, Any]:
        response = httpx.get(f"{guarded.url}/_/stats", auth=auth)
        assert response.status_code == 200
        return response.json()

    def by_route(document: dict[str, Any]) -> dict[str, tuple[int, int]]:
        return {r["route"]: (r["requests"], r["errors"]) for r in document["routes"]}

    before = stats()
    send_traffic(guarded.url)
    after = stats()
    assert after["time"] >= before["time"]
    assert after["ready"] is True and after["draining"] is False
    assert after["requests"]["total"] - before["requests"]["total"] == 17
    grown = {
        route: (
            requests - by_route(before).get(route, (0, 0))[0],
            errors - by_route(before).get(route, (0, 0))[1],
        )
        for route, (requests, errors) in by_route(after).items()
    }
    assert grown["/orders/{rest:path}"] == (13, 1), grown
    assert grown["/legacy/{rest:path}"] == (3, 3), grown
    assert grown["/inventory/items"][0] == 1, grown
    classes = {
        key: after["requests"]["by_class"][key] - before["requests"]["by_class"][key]
        for key in after["requests"]["by_class"]
    }
    assert classes["2xx"] >= 12 and classes["5xx"] >= 4, classes
    assert sum(classes.values()) == 17, classes
    assert after["latency"]["count"] - before["latency"]["count"] == 17
    buckets = after["latency"]["buckets"]
    assert buckets[-1]["le"] == "+Inf"
    assert buckets[-1]["count"] == after["latency"]["count"]
    counts = [bucket["count"] for bucket in buckets]
    assert counts == sorted(counts)
    upstreams = {entry["name"]: entry for entry in after["upstreams"]}
    assert upstreams["legacy"]["errors"] >= 3
    assert upstreams["orders"]["requests"] >= 13


# ---- the files themselves -------------------------------------------------------------


def test_page_files_are_self_contained_and_csp_friendly() -> None:
    html = (DASHBOARD_DIR / "index.html").read_text()
    script = (DASHBOARD_DIR / "dashboard.js").read_text()
    css = (DASHBOARD_DIR / "dashboard.css").read_text()
    # No inline script, style or event handler: "script-src 'self'; style-src 'self'".
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script src="static/dashboard/dashboard.js" defer>'
    ]
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)
    # Nothing from the internet (the SVG namespace is a name, not a fetch).
    for text in (html, script, css):
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert urls == set()
    # Data reaches the DOM as text only.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


def test_page_files_ship_in_the_package() -> None:
    """The wheel (and so the Docker image) carries the page: setuptools package-data."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["app"]
    app_dir = REPO / "app"
    files = sorted(p for p in DASHBOARD_DIR.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"index.html", "dashboard.js", "dashboard.css"}
    for path in files:
        relative = path.relative_to(app_dir).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
