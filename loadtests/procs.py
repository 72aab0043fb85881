"""Child-process bookkeeping and readiness probes for the benchmark harness.

Every server the harness starts goes through :class:`ManagedProcess`. Each one runs in its own
session so that a Ctrl-C in the terminal reaches only the harness (which then shuts servers
down in order instead of racing them), and so that a server's own children, such as granian
or uvicorn worker processes, are signalled together with it. Every process is also recorded in
a module registry drained by an ``atexit`` hook: a crashed harness must never leave an nginx or
a gateway behind holding a port and skewing the next run.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The only host the harness will ever talk to or point wrk at.
LOOPBACK = "127.0.0.1"

#: How long a server gets to exit on SIGTERM before it is SIGKILLed.
STOP_GRACE_S = 5.0


class HarnessError(RuntimeError):
    """A benchmark precondition failed; the message is meant for the person running it."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    The kernel picks it (bind to port 0), which avoids collisions with whatever else runs on
    the machine. There is a small window before the server binds it; a loser of that race
    fails loudly at startup rather than benchmarking the wrong thing.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a log file, or a note if there is nothing to show.

    Used when a server fails: its own last words are usually the whole diagnosis.
    """
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    if not text.strip():
        return f"({path} is empty)"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A server subprocess whose output goes to files and which is always cleaned up.

    Output goes to files rather than pipes because nobody reads the pipes during a 10 s wrk
    run; a chatty server would fill the pipe buffer and stall, which would show up as a
    latency spike in the benchmark rather than as an error.
    """

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.stdout_path = log_dir / f"{name}.stdout.log"
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self._reaped_before_stop = False
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The process id, or None before :meth:`start`."""
        return self._popen.pid if self._popen else None

    def start(self) -> ManagedProcess:
        """Launch the process in a new session and register it for cleanup."""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.cwd,
                start_new_session=True,
            )
        _REGISTRY.append(self)
        return self

    def returncode(self) -> int | None:
        """Exit status if the process has exited, else None (reaps it if it has)."""
        if self._popen is None:
            return None
        code = self._popen.poll()
        if code is not None and not self._stopping:
            self._reaped_before_stop = True
        return code

    def alive(self) -> bool:
        """True while the process is running."""
        return self._popen is not None and self.returncode() is None

    def describe_failure(self) -> str:
        """A human-readable account of a dead or misbehaving process, with its log tails."""
        code = self.returncode()
        state = "is still running" if code is None else f"exited with status {code}"
        return (
            f"{self.name} {state}\n"
            f"command: {' '.join(self.argv)}\n"
            f"--- stderr tail ({self.stderr_path}) ---\n{tail(self.stderr_path)}\n"
            f"--- stdout tail ({self.stdout_path}) ---\n{tail(self.stdout_path)}"
        )

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Terminate the whole process group, escalating to SIGKILL after ``grace_s``.

        Idempotent, so both the ``finally`` in ``main`` and the ``atexit`` hook may call it.
        """
        popen = self._popen
        if popen is None:
            return
        self._stopping = True
        was_running = popen.poll() is None
        if was_running:
            self._signal_group(signal.SIGTERM)
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                popen.wait(timeout=grace_s)
        # Sweep up grandchildren (e.g. gateway workers) that outlived the leader. Only when we
        # reaped the leader just now: a group id that has been free for a while may belong to
        # an unrelated process by now, and we must never signal that.
        if not self._reaped_before_stop:
            self._signal_group(signal.SIGKILL)
        if self in _REGISTRY:
            _REGISTRY.remove(self)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, sig)


_REGISTRY: list[ManagedProcess] = []


def stop_all() -> None:
    """Stop every registered process, newest first (the gateway before its upstream)."""
    for proc in reversed(list(_REGISTRY)):
        with contextlib.suppress(Exception):
            proc.stop()


atexit.register(stop_all)


@dataclass(frozen=True)
class HttpAnswer:
    """One probe response: enough to check status, body and headers."""

    status: int
    body: bytes
    headers: dict[str, str]


def http_get(port: int, path: str = "/", timeout_s: float = 2.0) -> HttpAnswer:
    """GET ``http://127.0.0.1:<port><path>`` with the stdlib client.

    http.client rather than urllib because urllib honours ``http_proxy`` from the environment,
    and a probe that silently went through a proxy would "succeed" against the wrong server.
    """
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return HttpAnswer(resp.status, body, headers)
    finally:
        conn.close()


def wait_for_http_200(
    proc: ManagedProcess, port: int, path: str = "/", deadline_s: float = 20.0
) -> HttpAnswer:
    """Poll until ``GET path`` on ``port`` answers 200, failing fast if ``proc`` dies.

    Readiness is judged over HTTP, not by the port being open, because an ASGI server accepts
    connections before its app has finished starting up, and a benchmark that begins then
    measures startup, not steady state.
    """
    end = time.monotonic() + deadline_s
    last = "no answer yet"
    while True:
        if not proc.alive():
            raise HarnessError(
                f"{proc.name} exited while waiting for GET {path} on port {port}\n"
                + proc.describe_failure()
            )
        try:
            answer = http_get(port, path, timeout_s=1.0)
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if answer.status == 200:
                return answer
            last = f"HTTP {answer.status}: {answer.body[:200]!r}"
        if time.monotonic() >= end:
            raise HarnessError(
                f"{proc.name} did not answer 200 on GET http://{LOOPBACK}:{port}{path} "
                f"within {deadline_s:.0f} s (last: {last})\n" + proc.describe_failure()
            )
        time.sleep(0.1)
