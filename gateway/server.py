"""Running the gateway as a network server: listeners, graceful drain, and the ASGI server.

``serve()`` is what ``octopus run`` calls. With uvicorn, one process holds two listeners
in one event loop: the data plane (the gateway app) and, when enabled, the admin plane
(``/_/health``, ``/_/ready``, ``/metrics``...). They share one ``Gateway`` so the admin
answers describe exactly the table and pools that serve traffic. With more than one
worker the parent process binds the sockets and supervises worker processes
(``gateway.supervisor``); each worker runs the same two listeners on the inherited
sockets. With ``server.grpc_port`` set, each process also runs the gRPC listener
(``gateway.grpc.server``) in the same loop, on the same ``Gateway``; grpcio binds it
itself, on the port the parent reserved (``reserve_port``), announced as
``octopus listening: grpc grpc://HOST:PORT`` (``grpcs://`` with TLS).

Sockets are bound here, not by uvicorn, so that

* ``port: 0`` works and the real port can be announced (tests and tooling parse the
  ``octopus listening: ...`` lines on stderr);
* a bind error is reported before any worker starts;
* the multi-worker parent can hand the very same listening sockets to every worker.

Shutdown (SIGTERM or SIGINT) drains: readiness turns 503 at once, the data listener
stops accepting, in-flight requests get up to ``server.graceful_timeout`` to finish,
then the gateway shuts down its pools, and only then does the admin listener close, so
an orchestrator can watch ``/_/ready`` go 503 during the whole drain. A second SIGINT
stops waiting for in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn

from gateway.coalescing import CoalescingHttpToolsProtocol

log = logging.getLogger("octopus")

#: The ASGI servers ``octopus run --server`` accepts.
SERVERS = ("uvicorn", "granian")

EXIT_OK = 0
#: Something went wrong at run time (bind error, a worker crash loop, a forced kill).
EXIT_FAILURE = 1
#: The configuration is invalid (reported by the CLI before anything starts).
EXIT_CONFIG = 2
#: The application's own start-up failed (lifespan startup), same code as uvicorn uses.
EXIT_STARTUP = 3

#: Kernel accept queue per listener; large enough for a burst of a few thousand
#: connections while the workers are busy.
BACKLOG = 2048
#: How long the admin listener waits for its own in-flight requests when it finally stops.
ADMIN_GRACEFUL_TIMEOUT = 2.0
#: Extra time the multi-worker parent allows after ``graceful_timeout`` before SIGKILL.
KILL_GRACE = 5.0


class ListenError(Exception):
    """A listener could not be bound; the message names the address and the reason."""


@dataclass
class Listener:
    """A bound, listening socket and what it serves (``data`` or ``admin``)."""

    name: str
    sock: socket.socket
    scheme: str = "http"

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


def bind_socket(host: str, port: int, *, backlog: int = BACKLOG) -> socket.socket:
    """Bind and listen on ``host:port`` (IPv4, IPv6 or a name), ``port`` 0 = any free port.

    ``SO_REUSEADDR`` lets a restarted gateway bind while old connections sit in
    TIME_WAIT. ``::`` is made dual-stack so "all interfaces" means IPv4 too.

    Raises:
        ListenError: the address does not resolve or cannot be bound.
    """
    sock = _bound_socket(host, port, reuse_port=False)
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {_show(host, port)}: {exc.strerror or exc}") from None
    return sock


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` without listening, with ``SO_REUSEPORT``: a reservation.

    For the gRPC listener, which grpcio binds by itself in each process (it cannot
    adopt a socket). The reservation resolves ``port: 0`` to a real port once, in the
    parent, so every worker binds the same one (``SO_REUSEPORT`` lets them share it), and
    reports a taken port before any worker starts. A socket that does not listen takes
    no connections, so holding it steals nothing from the workers.

    Raises:
        ListenError: the address does not resolve or cannot be bound.
    """
    return _bound_socket(host, port, reuse_port=True)


def _bound_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``host:port`` (resolved for a passive open), inheritable."""
    host = host or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {_show(host, port)}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {_show(host, port)}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listeners(settings: Any) -> list[Listener]:
    """The data listener, the admin listener when the admin plane is enabled, and the
    gRPC port reservation (``reserve_port``) when ``server.grpc_port`` is set.

    Raises:
        ListenError: one could not be bound (nothing stays bound then).
    """
    server = settings.server
    scheme = "https" if settings.tls.enabled else "http"
    listeners = [Listener("data", bind_socket(server.host, server.http_port), scheme)]
    try:
        if settings.admin.enabled:
            host, port = settings.admin.listen_address(server)
            listeners.append(Listener("admin", bind_socket(host, port)))
        if server.grpc_port is not None:
            grpc_scheme = "grpcs" if settings.tls.enabled else "grpc"
            sock = reserve_port(server.host, server.grpc_port)
            listeners.append(Listener("grpc", sock, grpc_scheme))
    except ListenError:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def announce(name: str, url: str, note: str = "") -> None:
    """Tell humans and tooling where a listener is, with its real port.

    Printed as a plain ``octopus listening: NAME URL`` line (whatever the log format,
    so scripts can parse it) and logged as a structured record.
    """
    suffix = f" ({note})" if note else ""
    # One write(2) of the whole line: workers share stderr, and print() writes the text
    # and the newline separately, so another process's log line could land between them.
    line = f"octopus listening: {name} {url}{suffix}\n".encode()
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), line)
    log.info("listening", extra={"listener": name, "url": url, "pid": os.getpid()})


def resolve_workers(value: int | str | None) -> int:
    """``auto`` (or nothing) means one worker per CPU; anything else must be >= 1."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return os.cpu_count() or 1
    count = int(value)
    if count < 1:
        raise ValueError(f"workers must be 'auto' or an integer >= 1 (got {value!r})")
    return count


def serve(settings: Any, *, workers: int, server: str = "uvicorn") -> int:
    """Run the gateway until SIGTERM/SIGINT and return the process exit code.

    Args:
        settings: validated settings (``settings.load_settings``).
        workers: number of worker processes (1 = everything in this process).
        server: ``uvicorn`` (data and admin listeners) or ``granian`` (one listener,
            admin API under ``/_/`` on it).
    """
    from gateway.observability.logging import configure_logging

    configure_logging(settings)
    if server == "granian":
        return serve_granian(settings, workers=workers)
    if server != "uvicorn":
        raise ValueError(f"unknown server {server!r} (use one of {', '.join(SERVERS)})")
    try:
        listeners = bind_listeners(settings)
    except ListenError as exc:
        print(f"octopus: {exc}", file=sys.stderr)
        log.error("cannot start", extra={"reason": str(exc)})
        return EXIT_FAILURE
    try:
        if workers > 1:
            from gateway.supervisor import WorkerSupervisor

            return WorkerSupervisor(settings, listeners, workers).run()
        return run_in_process(settings, listeners)
    finally:
        for listener in listeners:
            listener.sock.close()


def run_in_process(
    settings: Any,
    listeners: list[Listener],
    *,
    on_ready: Callable[[], None] | None = None,
    parent_pid: int | None = None,
) -> int:
    """Serve ``listeners`` in this process on one event loop (uvloop when installed).

    ``on_ready`` runs once both listeners accept; by default it announces them.
    ``parent_pid`` (workers only) makes the process drain when its parent disappears,
    so a SIGKILLed supervisor does not leave orphans holding the port.
    """
    if on_ready is None:

        def on_ready() -> None:
            for listener in listeners:
                announce(listener.name, listener.url)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve_listeners(settings, listeners, on_ready, parent_pid))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def _uvicorn_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        return "asyncio"
    return "uvloop"


def _data_config(settings: Any, app: Any) -> uvicorn.Config:
    """uvicorn settings for the data listener.

    ``access_log`` is off because the gateway logs each request itself (with route,
    upstream and request id); ``proxy_headers`` is off because the gateway decides
    which ``X-Forwarded-*`` values to trust (``server.trusted_proxies``); ``log_config``
    is None so uvicorn does not replace the gateway's log formatting.
    """
    tls = settings.tls
    options: dict[str, Any] = {}
    if tls.enabled:
        options.update(ssl_certfile=tls.cert, ssl_keyfile=tls.key)
        client_ca = getattr(tls, "client_ca", None)
        if client_ca:
            options.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return uvicorn.Config(
        app,
        http=CoalescingHttpToolsProtocol,
        loop=_uvicorn_loop_name(),
        lifespan="on",
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        # uvicorn writes the Date header; the gateway drops the upstream's.
        date_header=True,
        timeout_graceful_shutdown=settings.server.graceful_timeout,
        backlog=BACKLOG,
        **options,
    )


def _admin_config(app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http="httptools",
        loop=_uvicorn_loop_name(),
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=ADMIN_GRACEFUL_TIMEOUT,
        backlog=BACKLOG,
    )


class _Listeners:
    """The running uvicorn servers of one process and the order they stop in.

    uvicorn's ``Server.serve()`` installs its own signal handlers (one server would
    steal them from the other) and calls ``sys.exit`` inside the loop when lifespan
    startup fails. So the servers are driven step by step with the same public
    methods ``serve()`` is made of (``startup``, ``main_loop``, ``shutdown``), and this
    class owns the signals.
    """

    def __init__(self, gateway: Any, data: uvicorn.Server, admin: uvicorn.Server | None) -> None:
        self.gateway = gateway
        self.data = data
        self.admin = admin
        self.stopping = False

    def request_stop(self, signum: int) -> None:
        """First signal: drain. A later SIGINT: stop waiting for in-flight requests."""
        if not self.stopping:
            self.stopping = True
            # Before anything else, so /_/ready answers 503 for the whole drain.
            self.gateway.draining = True
            self.data.should_exit = True
            log.info(
                "draining",
                extra={
                    "signal": signal.Signals(signum).name,
                    "graceful_timeout": self.data.config.timeout_graceful_shutdown,
                },
            )
        elif signum == signal.SIGINT:
            log.warning("forced shutdown: in-flight requests are cut")
            for server in (self.data, self.admin):
                if server is not None:
                    server.should_exit = True
                    server.force_exit = True


async def _serve_listeners(
    settings: Any,
    listeners: list[Listener],
    on_ready: Callable[[], None],
    parent_pid: int | None,
) -> int:
    from gateway.asgi import create_app

    by_name = {listener.name: listener for listener in listeners}
    data_app = create_app(settings, serve_admin=False)
    gateway = data_app.gateway
    data = uvicorn.Server(_data_config(settings, data_app))
    admin = None
    if "admin" in by_name:
        from app.admin import create_admin_app

        admin = uvicorn.Server(_admin_config(create_admin_app(gateway)))
    running = _Listeners(gateway, data, admin)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, running.request_stop, signum)

    data_sockets = [by_name["data"].sock]
    if not await _start(data, data_sockets):
        log.error("start-up failed; not serving", extra={"pid": os.getpid()})
        return EXIT_STARTUP
    admin_sockets: list[socket.socket] = []
    if admin is not None:
        admin_sockets = [by_name["admin"].sock]
        if not await _start(admin, admin_sockets):
            data.should_exit = True
            await data.shutdown(sockets=data_sockets)
            return EXIT_STARTUP

    grpc_server = None
    if "grpc" in by_name:
        grpc_server = await _start_grpc(gateway, settings, by_name["grpc"].port)
        if grpc_server is None:
            for server, sockets in ((data, data_sockets), (admin, admin_sockets)):
                if server is not None:
                    server.should_exit = True
                    await server.shutdown(sockets=sockets)
            return EXIT_FAILURE

    # Everything imported and built so far lives as long as the process: keep it out of
    # the garbage collector's full passes, which otherwise stall the loop for tens of
    # milliseconds at a time under load (seen as a p99 of ~50 ms in make bench).
    gc.collect()
    gc.freeze()
    data_ticks = asyncio.create_task(data.main_loop(), name="octopus-data-ticks")
    admin_ticks = (
        asyncio.create_task(admin.main_loop(), name="octopus-admin-ticks") if admin else None
    )
    orphan_watch = (
        asyncio.create_task(_watch_parent(parent_pid, running), name="octopus-parent-watch")
        if parent_pid is not None
        else None
    )
    on_ready()

    await data_ticks
    # The gRPC listener stops taking calls now and drains beside the data listener; the
    # gateway's shutdown (lifespan, in data.shutdown) waits for its calls before closing
    # the upstream channels (gateway.grpc.forwarder).
    grpc_stopped = (
        asyncio.create_task(grpc_server.stop(settings.server.graceful_timeout))
        if grpc_server is not None
        else None
    )
    # The data listener closes first; the admin listener keeps answering (503 on
    # /_/ready) until in-flight requests are done and the gateway has shut down.
    await data.shutdown(sockets=data_sockets)
    if grpc_stopped is not None:
        await grpc_stopped
    if admin is not None and admin_ticks is not None:
        admin.should_exit = True
        await admin_ticks
        await admin.shutdown(sockets=admin_sockets)
    if orphan_watch is not None:
        orphan_watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await orphan_watch
    log.info("stopped", extra={"pid": os.getpid()})
    return EXIT_OK


async def _start_grpc(gateway: Any, settings: Any, port: int) -> Any:
    """Start the gRPC listener on the reserved port; None (logged) when it cannot bind."""
    from gateway.grpc.server import GrpcListenError, start_grpc_listener

    try:
        server, _ = await start_grpc_listener(gateway, settings.server.host, port)
    except (GrpcListenError, OSError) as exc:
        print(f"octopus: {exc}", file=sys.stderr)
        log.error("cannot start the gRPC listener", extra={"reason": str(exc)})
        return None
    return server


async def _start(server: uvicorn.Server, sockets: list[socket.socket]) -> bool:
    """Load the app, run lifespan startup and start accepting; False if startup failed."""
    config = server.config
    if not config.loaded:
        config.load()
    server.lifespan = config.lifespan_class(config)
    try:
        await server.startup(sockets=sockets)
    except SystemExit:
        # uvicorn exits the process when lifespan startup fails; report it instead.
        return False
    return True


async def _watch_parent(parent_pid: int, running: _Listeners) -> None:
    """Drain when the supervisor is gone (re-parented), instead of serving forever."""
    while not running.stopping:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            log.warning("supervisor is gone; draining", extra={"parent_pid": parent_pid})
            running.request_stop(signal.SIGTERM)
            return


def serve_granian(settings: Any, *, workers: int) -> int:
    """Run ``gateway.asgi:app`` under granian (ASGI, HTTP/1.1 and HTTP/2 negotiated).

    granian imports the app in each of its worker processes, where the module-level
    ``app`` reads the configuration file named by ``OCTOPUS_CONFIG``. That is why this
    mode needs settings that came from a file (or the embedded default), and why it has
    a single listener: the admin API is served under ``/_/`` on the data port.
    """
    from granian.constants import HTTPModes, Interfaces, SSLProtocols
    from granian.log import LogLevels
    from granian.server import Server

    if settings.server.grpc_port is not None:
        print(
            "octopus: the gRPC listener (server.grpc_port) needs --server uvicorn",
            file=sys.stderr,
        )
        return EXIT_FAILURE

    source = str(getattr(settings, "source", "<default>"))
    if source == "<default>":
        os.environ.pop("OCTOPUS_CONFIG", None)
    elif source.startswith("<"):
        print(
            "octopus: --server granian needs a configuration file (granian loads the app "
            "in its own worker processes)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    else:
        os.environ["OCTOPUS_CONFIG"] = os.path.abspath(source)

    host = settings.server.host or "0.0.0.0"
    port = settings.server.http_port
    if port == 0:
        # granian binds by itself and does not report the port it got; reserve one
        # (a tiny race with other processes is accepted for this convenience).
        try:
            probe = bind_socket("127.0.0.1" if host in ("0.0.0.0", "::") else host, 0)
        except ListenError as exc:
            print(f"octopus: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        port = probe.getsockname()[1]
        probe.close()

    tls = settings.tls
    options: dict[str, Any] = {}
    if tls.enabled:
        from pathlib import Path

        options.update(
            ssl_cert=Path(tls.cert), ssl_key=Path(tls.key), ssl_protocol_min=SSLProtocols.tls12
        )
        client_ca = getattr(tls, "client_ca", None)
        if client_ca:
            options.update(ssl_ca=Path(client_ca), ssl_client_verify=True)

    granian = Server(
        "gateway.asgi:granian_app",
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        http=HTTPModes.auto,
        websockets=True,
        backlog=BACKLOG,
        log_access=False,
        log_level=LogLevels(settings.observability.logging.level),
        log_dictconfig=_granian_logging(settings),
        respawn_failed_workers=True,
        workers_kill_timeout=math.ceil(settings.server.graceful_timeout + KILL_GRACE),
        **options,
    )
    scheme = "https" if tls.enabled else "http"
    url = f"{scheme}://{_show(host, port)}"

    def announce_granian() -> None:
        announce("data", url)
        if settings.admin.enabled:
            announce("admin", url, "granian: admin API under /_/ on the data port")

    # The port only accepts once granian's workers are up, after its start-up hooks ran;
    # announce when it really accepts, so the line means the same as in uvicorn mode.
    granian.on_startup(lambda: _when_accepting(host, port, announce_granian))
    log.info(
        "starting granian",
        extra={"workers": workers, "url": url, "admin": "under /_/ on the data port"},
    )
    try:
        granian.serve()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    return EXIT_OK


def _when_accepting(host: str, port: int, then: Callable[[], None], timeout: float = 60.0) -> None:
    """Call ``then`` from a background thread once ``host:port`` accepts connections."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)

    def probe() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((target, port), timeout=1.0):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            log.warning("listener did not accept in time", extra={"port": port})
            return
        then()

    threading.Thread(target=probe, name="octopus-announce", daemon=True).start()


def _granian_logging(settings: Any) -> dict[str, Any]:
    """A dictConfig that sends granian's own loggers through the gateway's formatter."""
    formatter = (
        {"()": "gateway.observability.logging.JsonFormatter"}
        if settings.observability.logging.format == "json"
        else {
            "()": "gateway.observability.logging.TextFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        }
    )
    return {
        "formatters": {"octopus": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "octopus",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "_granian": {"handlers": ["stderr"], "propagate": False},
            "granian.access": {"handlers": ["stderr"], "propagate": False},
        },
    }
