"""The multi-worker parent: N worker processes sharing the listening sockets.

The parent binds the data and admin sockets once, then starts N workers that each run
the same two uvicorn listeners (``gateway.server.run_in_process``) on those sockets;
the kernel hands each new connection to whichever worker accepts first. Each worker has
its own ``Gateway`` (routing table, pools, metrics), as DESIGN.md §5 says, so an admin
answer (``/_/services``...) describes the worker that happened to accept that admin
connection, not the sum of all workers. ``/metrics`` is the exception: workers write
their values to a multiprocess directory the parent creates afresh for every start
(``gateway.observability.metrics.MetricsDirectory``), and any worker's scrape merges
them all.

Process model: ``multiprocessing`` with the ``spawn`` start method, not ``fork``.
A forked worker would inherit whatever the parent had at fork time: imported native
extensions (uvloop, granian's runtime, httptools), logging locks possibly held by
another thread, an event loop policy; restarting a worker later would fork a parent
that has been running for days. A spawned worker is a fresh interpreter that only
receives what it needs (the settings and the two sockets, passed as file descriptors
by multiprocessing), so the first worker and the hundredth restart start from the same
state. It is also what macOS requires and what Python is moving to by default. The cost
is about half a second of imports per worker start, paid at start-up and on restarts.

The parent does nothing but supervise:

* a worker that dies while the gateway is running is restarted, after a backoff that
  doubles with each quick failure (0.5 s up to 10 s); five quick failures in a row stop
  everything with exit code 1 rather than spinning, and a failed application start-up
  before the gateway ever became ready stops it at once with exit code 3 (as in the
  single-process mode);
* SIGTERM/SIGINT are forwarded to the workers as SIGTERM (each drains, see
  ``gateway.server``), and the parent closes its own copies of the sockets so the port
  stops accepting once every worker has closed its copy. Workers still running
  ``graceful_timeout`` + 5 s later are killed. A second SIGINT is forwarded as SIGINT,
  which makes the workers stop waiting for in-flight requests;
* a worker whose parent disappears drains by itself (it watches its parent pid).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from multiprocessing.process import BaseProcess
from typing import Any

from gateway.observability.metrics import MetricsDirectory
from gateway.server import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_STARTUP,
    KILL_GRACE,
    Listener,
    announce,
    run_in_process,
)

log = logging.getLogger("octopus")

#: A worker that lived at least this long is considered healthy; its next death
#: starts the backoff afresh.
STABLE_AFTER = 10.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0
MAX_QUICK_FAILURES = 5
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class _Slot:
    """One worker position: the current process in it and its restart history."""

    index: int
    process: BaseProcess | None = None
    ready: Connection | None = None
    started_at: float = 0.0
    became_ready: bool = False
    quick_failures: int = 0
    restart_at: float | None = None


def worker_main(
    index: int,
    settings: Any,
    listeners: list[Listener],
    ready: Connection,
    parent_pid: int,
) -> None:
    """Entry point of a worker process (module level so ``spawn`` can import it)."""
    from gateway.observability.logging import configure_logging

    configure_logging(settings)

    def on_ready() -> None:
        with contextlib.suppress(OSError):
            ready.send("ready")
        ready.close()

    log.info("worker started", extra={"worker": index, "pid": os.getpid()})
    sys.exit(run_in_process(settings, listeners, on_ready=on_ready, parent_pid=parent_pid))


class WorkerSupervisor:
    """Starts, watches, restarts and stops the worker processes."""

    def __init__(self, settings: Any, listeners: list[Listener], workers: int) -> None:
        self.settings = settings
        self.listeners = listeners
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot(index) for index in range(1, workers + 1)]
        self.stopping = False
        self.deadline = 0.0
        self.killed = False
        self.announced = False
        self.exit_code = EXIT_OK
        #: Where workers write metric values so one scrape shows all of them.
        self.metrics_dir: MetricsDirectory | None = None

    def run(self) -> int:
        """Supervise until stopped; the return value is the process exit code."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        previous = {signum: signal.signal(signum, _record_only) for signum in _STOP_SIGNALS}
        previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        if self.settings.observability.metrics.enabled:
            self.metrics_dir = MetricsDirectory.create()
        try:
            log.info(
                "starting workers",
                extra={"workers": len(self.slots), "start_method": "spawn"},
            )
            for slot in self.slots:
                self._spawn(slot)
            return self._supervise(wake_read)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(wake_read)
            os.close(wake_write)
            self._kill_all()
            if self.metrics_dir is not None:
                self.metrics_dir.close()

    def _supervise(self, wake_read: int) -> int:
        while True:
            now = time.monotonic()
            waitables: list[Any] = [wake_read]
            for slot in self.slots:
                if slot.process is not None:
                    waitables.append(slot.process.sentinel)
                if slot.ready is not None:
                    waitables.append(slot.ready)
            ready = wait_for(waitables, self._timeout(now))

            if wake_read in ready:
                for signum in _read_signals(wake_read):
                    self._on_signal(signum)
            for slot in self.slots:
                if slot.ready is not None and slot.ready in ready:
                    self._on_ready_message(slot)
            for slot in self.slots:
                process = slot.process
                if process is not None and (process.sentinel in ready or not process.is_alive()):
                    self._on_exit(slot)

            now = time.monotonic()
            if not self.stopping:
                for slot in self.slots:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        self._spawn(slot)
                if not self.announced and all(slot.became_ready for slot in self.slots):
                    self.announced = True
                    log.info("workers ready", extra={"workers": len(self.slots)})
                    for listener in self.listeners:
                        announce(listener.name, listener.url)
            else:
                if all(slot.process is None for slot in self.slots):
                    log.info("stopped", extra={"pid": os.getpid()})
                    return self.exit_code
                if now >= self.deadline and not self.killed:
                    self._kill_all()

    def _timeout(self, now: float) -> float | None:
        if self.stopping:
            # After the SIGKILLs only the workers' exits are left to wait for.
            return None if self.killed else max(0.0, self.deadline - now)
        times = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        if not times:
            return None
        return max(0.0, min(times) - now)

    def _spawn(self, slot: _Slot) -> None:
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=worker_main,
            args=(slot.index, self.settings, self.listeners, writer, os.getpid()),
            name=f"octopus-worker-{slot.index}",
        )
        process.start()
        writer.close()
        slot.process = process
        slot.ready = reader
        slot.started_at = time.monotonic()
        slot.became_ready = False
        slot.restart_at = None
        log.info("worker spawned", extra={"worker": slot.index, "pid": process.pid})

    def _on_ready_message(self, slot: _Slot) -> None:
        assert slot.ready is not None
        try:
            slot.ready.recv()
        except (EOFError, OSError):
            pass  # the worker died before it was ready; its exit is handled next
        else:
            slot.became_ready = True
            pid = slot.process.pid if slot.process is not None else None
            log.info("worker ready", extra={"worker": slot.index, "pid": pid})
        slot.ready.close()
        slot.ready = None

    def _on_exit(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        process.join()
        code = process.exitcode
        pid = process.pid
        process.close()
        slot.process = None
        if self.metrics_dir is not None and pid is not None:
            self.metrics_dir.process_exited(pid)
        if slot.ready is not None:
            slot.ready.close()
            slot.ready = None
        if self.stopping:
            clean = code in (0, -signal.SIGTERM, -signal.SIGINT)
            if not clean:
                self.exit_code = EXIT_FAILURE
            log.info("worker exited", extra={"worker": slot.index, "pid": pid, "exitcode": code})
            return

        lived = time.monotonic() - slot.started_at
        log.error(
            "worker died unexpectedly",
            extra={"worker": slot.index, "pid": pid, "exitcode": code, "lived_s": round(lived, 3)},
        )
        if code == EXIT_STARTUP and not self.announced:
            log.error("the gateway failed to start in a worker; stopping")
            self.exit_code = EXIT_STARTUP
            self._begin_stop(signal.SIGTERM)
            return
        slot.quick_failures = 0 if lived >= STABLE_AFTER else slot.quick_failures + 1
        if slot.quick_failures >= MAX_QUICK_FAILURES:
            log.error(
                "worker keeps failing; stopping",
                extra={"worker": slot.index, "failures": slot.quick_failures},
            )
            self.exit_code = EXIT_FAILURE
            self._begin_stop(signal.SIGTERM)
            return
        delay = min(FIRST_BACKOFF * 2 ** max(slot.quick_failures - 1, 0), MAX_BACKOFF)
        slot.restart_at = time.monotonic() + delay
        log.info("worker restart scheduled", extra={"worker": slot.index, "in_s": delay})

    def _on_signal(self, signum: int) -> None:
        if signum not in _STOP_SIGNALS:
            return
        if not self.stopping:
            log.info(
                "stopping workers",
                extra={"signal": signal.Signals(signum).name, "workers": len(self.slots)},
            )
        self._begin_stop(signum)

    def _begin_stop(self, signum: int) -> None:
        if self.stopping:
            if signum == signal.SIGINT:
                self._signal_all(signal.SIGINT)
            return
        self.stopping = True
        graceful = float(self.settings.server.graceful_timeout)
        self.deadline = time.monotonic() + graceful + KILL_GRACE
        for slot in self.slots:
            slot.restart_at = None
        self._signal_all(signal.SIGTERM)
        # Workers hold their own copies; once they close theirs the port refuses.
        for listener in self.listeners:
            listener.sock.close()

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)

    def _kill_all(self) -> None:
        """SIGKILL whatever still runs (drain deadline passed, or the parent is leaving)."""
        for slot in self.slots:
            process = slot.process
            if process is not None and process.is_alive():
                log.error(
                    "killing worker that did not stop in time",
                    extra={"worker": slot.index, "pid": process.pid},
                )
                process.kill()
                self.killed = True
                self.exit_code = EXIT_FAILURE


def _record_only(signum: int, frame: Any) -> None:
    """Signals are read from the wakeup pipe by the supervision loop; nothing to do here."""


def _read_signals(fd: int) -> list[int]:
    try:
        data = os.read(fd, 512)
    except BlockingIOError:
        return []
    return list(data)
