"""End-to-end helpers: the gateway as a real process, and a tiny real upstream.

``start_gateway(config, *extra_args)`` runs ``python -m gateway.cli run -c FILE ...``,
reads its output continuously (so a chatty gateway never blocks on a full pipe) and
returns once the ``octopus listening: data URL`` / ``admin URL`` lines have appeared,
i.e. once the listeners accept. Configs use ``http_port: 0`` and ``admin_port: 0``; the
real ports come from those lines.

Everything listens on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"^octopus listening: (?P<name>\w+) (?P<url>\S+)")
#: Generous: a spawned worker imports the whole gateway, and CI machines are slow.
START_TIMEOUT = 30.0


class GatewayStartError(AssertionError):
    """The gateway exited or stayed silent before announcing its listeners."""


class OutputReader:
    """Collects a process's output lines in a thread and lets tests wait for one."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(
        self, predicate: Callable[[str], Any], timeout: float, *, start: int = 0
    ) -> tuple[int, Any] | None:
        """The index and truthy result of the first line (from ``start``) that satisfies
        ``predicate``, waiting up to ``timeout``; None on timeout or end of output."""
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self.lines):
                    result = predicate(self.lines[index])
                    if result:
                        return index, result
                    index += 1
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class GatewayProcess:
    """A running gateway. ``admin_url`` is None when the admin listener is disabled."""

    proc: subprocess.Popen[str]
    data_url: str
    admin_url: str | None
    output_reader: OutputReader
    workdir: Path
    _cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the gateway wrote so far (stdout and stderr, interleaved)."""
        return self.output_reader.text()

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far, parsed."""
        records = []
        for line in list(self.output_reader.lines):
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first JSON log record satisfying ``predicate``; AssertionError on timeout."""

        def matches(line: str) -> dict[str, Any] | None:
            if not line.startswith("{"):
                return None
            try:
                record = json.loads(line)
            except ValueError:
                return None
            return record if predicate(record) else None

        found = self.output_reader.wait_for(matches, timeout)
        if found is None:
            raise AssertionError(f"no matching log record within {timeout}s:\n{self.output()}")
        return found[1]

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code; AssertionError (after killing it) if it does not exit in time."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"gateway did not exit within {timeout}s:\n{self.output()}"
            ) from None
        self.output_reader.join(5.0)
        return code

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the gateway (SIGTERM: graceful drain) and return its exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signum)
            return self.wait(timeout)
        finally:
            self.close()

    def kill(self) -> None:
        """SIGKILL the gateway and any worker it left behind (its own session only)."""
        # Also when the supervisor is gone already: its workers may still be around.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)

    def close(self) -> None:
        """Make sure nothing keeps running, then remove temporary files."""
        self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        while self._cleanup:
            self._cleanup.pop()()

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
        self.close()


def write_config(config: Mapping[str, Any], directory: Path, name: str = "octopus.yaml") -> Path:
    """Write a config dict as YAML (the format users write) and return its path."""
    path = directory / name
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def gateway_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent environment without ``OCTOPUS_*`` (a developer's own settings must
    not leak into tests), unbuffered output, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OCTOPUS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def octopus_command(*args: str) -> list[str]:
    """``octopus ARGS...`` as this interpreter runs it (no reliance on PATH)."""
    return [sys.executable, "-m", "gateway.cli", *args]


def run_octopus(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run a short ``octopus`` command (validate, routes, a failing run) to completion."""
    return subprocess.run(
        octopus_command(*args),
        cwd=cwd or REPO_ROOT,
        env=gateway_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_gateway(
    config: Mapping[str, Any] | str | os.PathLike[str] | None,
    *extra_args: str,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    expect_admin: bool | None = None,
    timeout: float = START_TIMEOUT,
) -> GatewayProcess:
    """Start ``octopus run`` and return once it announced its listeners.

    Args:
        config: a dict of the YAML shape (written to a temporary file), a path to a
            config file, or None for no ``-c`` at all (the embedded default).
        extra_args: more ``octopus run`` options, e.g. ``"--workers", "2"``.
        cwd: working directory; by default a fresh temporary directory (which is
            where the default ``file`` discovery looks for ``./services``).
        env: extra environment variables (``OCTOPUS_*`` from the caller's environment
            are dropped first).
        expect_admin: whether to wait for the admin listener line too; by default
            True unless a dict config sets ``admin.enabled: false``.
        timeout: seconds to wait for the listening lines.

    Raises:
        GatewayStartError: the process exited or did not announce in time (it is
            killed; the message carries its output).
    """
    workdir = Path(tempfile.mkdtemp(prefix="octopus-e2e-"))
    cleanup: list[Callable[[], None]] = [lambda: shutil.rmtree(workdir, ignore_errors=True)]
    args: list[str] = ["run"]
    if isinstance(config, Mapping):
        args += ["-c", str(write_config(config, workdir))]
        if expect_admin is None:
            expect_admin = bool((config.get("admin") or {}).get("enabled", True))
    elif config is not None:
        args += ["-c", str(config)]
    if expect_admin is None:
        expect_admin = True
    args += list(extra_args)

    proc = subprocess.Popen(
        octopus_command(*args),
        cwd=cwd or workdir,
        env=gateway_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: kill() reaches the workers too
    )
    reader = OutputReader(proc.stdout)
    handle = GatewayProcess(proc, "", None, reader, workdir, cleanup)
    try:
        urls = _wait_for_listeners(reader, expect_admin, timeout)
    except GatewayStartError:
        handle.close()
        raise
    handle.data_url = urls["data"]
    handle.admin_url = urls.get("admin")
    return handle


def _wait_for_listeners(reader: OutputReader, expect_admin: bool, timeout: float) -> dict[str, str]:
    wanted = {"data", "admin"} if expect_admin else {"data"}
    urls: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    start = 0
    while not wanted <= urls.keys():
        found = reader.wait_for(LISTENING.match, max(0.0, deadline - time.monotonic()), start=start)
        if found is None:
            state = "exited" if reader.closed else f"was silent for {timeout}s"
            raise GatewayStartError(
                f"gateway {state} before announcing {sorted(wanted - urls.keys())}:\n"
                + reader.text()
            )
        index, match = found
        urls[match["name"]] = match["url"]
        start = index + 1
    return urls


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Until ``host:port`` accepts a TCP connection (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{host}:{port} did not accept within {timeout}s") from None
            time.sleep(0.05)


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


def minimal_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    """The smallest useful config: everything on 127.0.0.1 port 0, one catch-all route
    to ``upstream_url``. Keyword arguments replace or add top-level sections."""
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "http_port": 0,
            "admin_port": 0,
            "workers": 1,
            "graceful_timeout": "10s",
        },
        "discovery": {"backend": "static"},
        "upstreams": {"echo": {"endpoints": [{"url": upstream_url}]}},
        "routes": [{"name": "all", "match": {"path": "/{rest:path}"}, "upstream": "echo"}],
    }
    config.update(sections)
    return config


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers any request with JSON describing it; ``?delay=SECONDS`` answers late."""

    protocol_version = "HTTP/1.1"
    server: UpstreamServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        query = parse_qs(urlsplit(self.path).query)
        self.server.record(self)
        delay = float(query.get("delay", ["0"])[0])
        if delay:
            time.sleep(delay)
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("latin-1"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: test output should show the gateway's logs, not the upstream's."""


class UpstreamServer(ThreadingHTTPServer):
    """An HTTP/1.1 echo server on 127.0.0.1 in a thread, recording request paths.

    ``arrived(path_prefix)`` lets a test wait until the gateway has really forwarded a
    request (e.g. before sending SIGTERM during a slow one).
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.paths: list[str] = []
        self._seen = threading.Condition()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def record(self, handler: BaseHTTPRequestHandler) -> None:
        with self._seen:
            self.paths.append(handler.path)
            self._seen.notify_all()

    def arrived(self, prefix: str, timeout: float = 10.0) -> bool:
        """Wait until a request whose path starts with ``prefix`` reached this server."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(path.startswith(prefix) for path in self.paths):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._seen.wait(remaining)
            return True

    def start(self) -> UpstreamServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gateway_children(pid: int) -> Sequence[int]:
    """Direct child pids of ``pid`` (Linux ``/proc``), e.g. the workers of a supervisor."""
    children: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.exists() else []:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children
