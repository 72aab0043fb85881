"""``octopus run`` as a real process: proxying, the admin listener, workers and drain."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.helpers import (
    GatewayProcess,
    UpstreamServer,
    host_port,
    minimal_config,
    run_octopus,
    wait_until,
    write_config,
)

Start = Callable[..., GatewayProcess]
#: Tests that read the gateway's log records ask for JSON explicitly.
JSON_LOGS: dict[str, Any] = {"observability": {"logging": {"format": "json"}}}


def _get(url: str, timeout: float = 10.0) -> httpx.Response:
    """One request on a fresh connection (so multi-worker tests spread connections)."""
    return httpx.get(url, timeout=timeout)


def _refuses_connections(url: str) -> bool:
    try:
        with socket.create_connection(host_port(url), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def _ready_status(admin_url: str) -> int | None:
    try:
        return _get(f"{admin_url}/_/ready", timeout=2.0).status_code
    except httpx.TransportError:
        return None


class _Background:
    """A request running in a thread, for requests that must be in flight meanwhile."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url, timeout), daemon=True)
        self._thread.start()

    def _run(self, url: str, timeout: float) -> None:
        try:
            self.response = _get(url, timeout)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self, timeout: float = 30.0) -> httpx.Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "request did not finish"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def test_run_proxies_requests_and_serves_health_on_the_admin_port(
    gateway_factory: Start, upstream: UpstreamServer
) -> None:
    gateway = gateway_factory(minimal_config(upstream.url))
    assert gateway.admin_url is not None
    assert gateway.data_url != gateway.admin_url

    response = _get(f"{gateway.data_url}/hello/world?x=1")
    health = _get(f"{gateway.admin_url}/_/health")

    assert response.status_code == 200
    assert response.json()["path"] == "/hello/world?x=1"
    assert health.status_code == 200
    assert _get(f"{gateway.admin_url}/_/ready").status_code == 200
    assert gateway.stop() == 0


def test_admin_paths_are_not_served_on_the_data_port(
    gateway_factory: Start, upstream: UpstreamServer
) -> None:
    gateway = gateway_factory(minimal_config(upstream.url))

    response = _get(f"{gateway.data_url}/_/health")

    # With an admin listener the data port proxies everything, /_/ included.
    assert response.status_code == 200
    assert response.json()["path"] == "/_/health"


def test_admin_disabled_means_no_admin_listener(
    gateway_factory: Start, upstream: UpstreamServer
) -> None:
    gateway = gateway_factory(minimal_config(upstream.url, admin={"enabled": False}))

    assert gateway.admin_url is None
    assert _get(f"{gateway.data_url}/ok").status_code == 200
    assert "octopus listening: admin" not in gateway.output()


def test_run_with_two_workers_serves_requests(
    gateway_factory: Start, upstream: UpstreamServer
) -> None:
    gateway = gateway_factory(minimal_config(upstream.url, **JSON_LOGS), "--workers", "2")
    assert gateway.admin_url is not None

    statuses = [_get(f"{gateway.data_url}/n/{i}").status_code for i in range(20)]

    assert statuses == [200] * 20
    assert _get(f"{gateway.admin_url}/_/health").status_code == 200
    ready = [r for r in gateway.log_records() if r.get("message") == "worker ready"]
    assert sorted(r["worker"] for r in ready) == [1, 2]
    assert gateway.stop() == 0


def test_supervisor_restarts_a_worker_that_dies(
    gateway_factory: Start, upstream: UpstreamServer
) -> None:
    gateway = gateway_factory(minimal_config(upstream.url, **JSON_LOGS), "--workers", "2")
    first = {
        r["worker"]: r["pid"] for r in gateway.log_records() if r.get("message") == "worker ready"
    }
    victim = first[1]

    os.kill(victim, signal.SIGKILL)
    replacement = gateway.wait_for_log(
        lambda r: r.get("message") == "worker ready" and r["worker"] == 1 and r["pid"] != victim,
        timeout=20,
    )

    assert replacement["pid"] != victim
    assert [_get(f"{gateway.data_url}/again/{i}").status_code for i in range(10)] == [200] * 10
    assert gateway.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drains_in_flight_requests_and_exits_0(
    gateway_factory: Start, upstream: UpstreamServer, workers: str
) -> None:
    gateway = gateway_factory(minimal_config(upstream.url), "--workers", workers)
    admin_url = gateway.admin_url
    assert admin_url is not None
    slow = _Background(f"{gateway.data_url}/slow?delay=2")
    assert upstream.arrived("/slow"), "the slow request never reached the upstream"

    gateway.send_signal(signal.SIGTERM)

    # Readiness turns 503 while the request is still in flight, on the admin port.
    wait_until(lambda: _ready_status(admin_url) == 503, timeout=5)
    # New connections to the data port are refused during the drain.
    wait_until(lambda: _refuses_connections(gateway.data_url), timeout=5)
    response = slow.result()
    assert response.status_code == 200
    assert response.json()["path"] == "/slow?delay=2"
    assert gateway.wait(timeout=20) == 0


def test_start_without_any_config_answers_404_json(gateway_factory: Start, tmp_path: Path) -> None:
    # The embedded default: file discovery over ./services (absent here), no routes.
    gateway = gateway_factory(
        None,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--admin-port",
        "0",
        "--workers",
        "1",
        cwd=tmp_path,
    )

    response = _get(f"{gateway.data_url}/nothing/here")

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"]
    assert "request_id" in body
    assert gateway.stop() == 0


def test_command_line_port_overrides_the_file(
    gateway_factory: Start, upstream: UpstreamServer
) -> None:
    config = minimal_config(upstream.url)
    config["server"]["http_port"] = 1  # would fail to bind; --port wins
    gateway = gateway_factory(config, "--port", "0")

    assert _get(f"{gateway.data_url}/x").status_code == 200


def test_granian_serves_data_and_admin_on_one_port(
    gateway_factory: Start, upstream: UpstreamServer
) -> None:
    gateway = gateway_factory(minimal_config(upstream.url), "--server", "granian")

    assert gateway.admin_url == gateway.data_url
    assert _get(f"{gateway.data_url}/through/granian").status_code == 200
    assert _get(f"{gateway.data_url}/_/health").status_code == 200
    assert gateway.stop() == 0


def test_run_reports_a_busy_port_and_exits_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = minimal_config("http://127.0.0.1:9")
        config["server"]["http_port"] = port
        path = write_config(config, tmp_path)

        result = run_octopus("run", "-c", str(path), timeout=30)

    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_tls_enabled_serves_https_on_the_data_port(
    gateway_factory: Start, upstream: UpstreamServer, tmp_path: Path, server: str
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    config = minimal_config(upstream.url, tls={"enabled": True, "cert": str(cert), "key": str(key)})
    gateway = gateway_factory(config, "--server", server)

    assert gateway.data_url.startswith("https://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(cert))
    response = httpx.get(f"{gateway.data_url}/secure", verify=trust, timeout=10)

    assert response.status_code == 200
    assert response.json()["path"] == "/secure"
    assert gateway.stop() == 0
