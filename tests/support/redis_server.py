"""A real ``redis-server`` for tests: free 127.0.0.1 port, no persistence, killable.

``redis_binary()`` finds the binary; when it is missing the test is skipped with the
package to install, except under ``CI=true`` where that is a failure (CI must not go
green by testing nothing). ``RedisServer.kill()`` is an abrupt outage (SIGKILL);
``start()`` again brings it back, empty, on the same port.

Fixtures for a test package (``conftest.py``)::

    from tests.support.redis_server import redis_fixtures
    redis_process, redis_server = redis_fixtures()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.servers import free_port
from tests.support.waiting import eventually


def redis_binary() -> str:
    """The path of ``redis-server``; skip (or fail under ``CI=true``) when missing."""
    path = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)),
        None,
    )
    if path:
        return path
    message = (
        "redis-server is not installed: install the Debian package redis-server "
        "(bash .ci/system-deps.sh does it)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class RedisServer:
    """``redis-server --port P --save '' --appendonly no`` in a temporary directory."""

    def __init__(self, binary: str | None = None, workdir: Path | None = None) -> None:
        self.binary = binary or redis_binary()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="octopus-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        log = (self.workdir / "redis.log").open("ab")
        with log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        eventually(self._up, timeout=10, interval=0.02, message="redis-server did not start")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                "redis-server exited: " + (self.workdir / "redis.log").read_text()[-2000:]
            )
        try:
            with self.client(timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()

    def keys(self, pattern: str = "*") -> list[bytes]:
        with self.client() as client:
            return list(client.scan_iter(match=pattern))

    def kill(self) -> None:
        """An abrupt outage: SIGKILL, no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_fixtures() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(redis_process, redis_server)`` fixtures: one server per module, and per test
    that server running and empty (a test that killed it gets it back)."""

    @pytest.fixture(scope="module")
    def redis_process() -> Iterator[RedisServer]:
        with RedisServer() as server:
            yield server

    @pytest.fixture
    def redis_server(redis_process: RedisServer) -> RedisServer:
        if not redis_process.running:
            redis_process.start()
        redis_process.flush()
        return redis_process

    return redis_process, redis_server
