"""The gateway under test: built from a config dict and served for real, either in a
thread of the test process (to inspect its pools and table) or as a uvicorn process of
its own (to measure its memory)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.asgi import GatewayApp, create_app
from gateway.runtime import Gateway
from gateway.upstream.pool import ConnectionPool
from tests.support.servers import ThreadedServer, free_port
from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
#: The ``make_gateway`` fixture: a config dict (and ThreadedServer options) in, a
#: started gateway out.
MakeGateway = Callable[..., "GatewayServer"]


def gateway_config(
    upstreams: dict[str, Any],
    routes: list[dict[str, Any]],
    **sections: Any,
) -> dict[str, Any]:
    """A config dict in the YAML shape. ``upstreams`` values may be a URL, a list of URLs
    or a full upstream section; ``sections`` are merged in at the top level."""
    ups: dict[str, Any] = {}
    for name, value in upstreams.items():
        if isinstance(value, str):
            ups[name] = {"endpoints": [{"url": value}]}
        elif isinstance(value, list):
            ups[name] = {"endpoints": [{"url": url} for url in value]}
        else:
            ups[name] = value
    config: dict[str, Any] = {
        # The proxy core is under test: no FARP watcher rebuilding the table behind it.
        "farp": {"enabled": False},
        "discovery": {"backend": "static", "static": {"manifests": []}},
        "upstreams": ups,
        "routes": routes,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def route(name: str, path: str, upstream: str, **extra: Any) -> dict[str, Any]:
    """A route entry; ``methods``/``host``/``headers``/``query`` go under ``match``."""
    match: dict[str, Any] = {"path": path}
    for key in ("methods", "host", "headers", "query"):
        if key in extra:
            match[key] = extra.pop(key)
    return {"name": name, "match": match, "upstream": upstream, **extra}


class GatewayServer:
    """``create_app(config, serve_admin=True)`` on uvicorn in a thread."""

    def __init__(self, config: Any, **options: Any) -> None:
        self.app: GatewayApp = create_app(config, serve_admin=True)
        self.server = ThreadedServer(self.app, **options)
        self.port = self.server.port
        self.url = self.server.url

    @property
    def gateway(self) -> Gateway:
        return self.app.gateway

    def pool(self, upstream: str, index: int = 0) -> ConnectionPool:
        """The connection pool of one endpoint of ``upstream`` in the current table."""
        return self.gateway.table.upstreams[upstream].endpoints[index].pool

    def client(self, **options: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **options)

    def reload(self, config: Any) -> None:
        """Rebuild the routing table from ``config`` and swap it in, on the server's loop,
        as a configuration reload does (endpoints that stay keep their live state)."""
        from gateway.routing.builder import build_table
        from settings import load_settings

        gateway = self.gateway
        settings = load_settings(config)

        def swap() -> None:
            version = gateway.table.version + 1
            gateway.settings = settings
            gateway.swap(build_table(settings, gateway.endpoints, version=version))

        self.server.call(swap)

    def start(self) -> GatewayServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GatewayProcess:
    """``OCTOPUS_CONFIG=FILE python -m uvicorn gateway.asgi:app`` as a child process."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config_path = workdir / "octopus.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = workdir / "gateway.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        env = {**os.environ, "OCTOPUS_CONFIG": str(self.config_path)}
        env = {
            k: v for k, v in env.items() if not k.startswith("OCTOPUS_") or k == "OCTOPUS_CONFIG"
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "gateway.asgi:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        eventually(self._healthy, timeout=20, interval=0.05, message=self._failure())
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited: {self.log_path.read_text()}")
        try:
            return httpx.get(f"{self.url}/_/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def _failure(self) -> str:
        return f"gateway did not become healthy; log at {self.log_path}"

    def memory_kib(self) -> dict[str, int]:
        """``VmRSS`` and ``VmHWM`` (peak RSS) of the process, in KiB."""
        assert self.proc is not None
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
