"""The ``octopus`` command: run the gateway, validate a configuration, show its routes.

``octopus [run] [-c FILE] [--workers N] [--server uvicorn|granian] [--host H] [--port P]``
``octopus validate [-c FILE]``
``octopus routes [-c FILE] [--json]``

``run`` is the default, so ``octopus -c config.yaml`` starts the gateway. The
configuration comes from ``-c``, else ``$OCTOPUS_CONFIG``, else the embedded default.

Exit codes: 0 success; 1 a check failed (``validate``/``routes``) or the server failed at
run time; 2 ``run`` was given an invalid configuration; 3 the application failed to
start. Configuration problems are printed one per line, never as a traceback: they are
the user's to fix, and a traceback would bury the one line that says where.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

COMMANDS = ("run", "validate", "routes")
DEFAULT_SOURCE = "(embedded default)"
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_CONFIG = 2


class _UsageError(Exception):
    """A command-line value argparse could not check by itself (printed as a usage error)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (public so docs and tests can render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="octopus",
        description="Octopus API gateway. Without a command, 'run' is assumed.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="start the gateway (the default command)")
    _add_config_option(run)
    run.add_argument(
        "--workers",
        metavar="N",
        help="worker processes, an integer or 'auto' (one per CPU); overrides server.workers",
    )
    run.add_argument(
        "--server",
        choices=("uvicorn", "granian"),
        default="uvicorn",
        help="ASGI server (default uvicorn; granian serves the admin API under /_/ "
        "on the data port)",
    )
    run.add_argument("--host", metavar="H", help="listen address; overrides server.host")
    run.add_argument(
        "--port", metavar="P", type=_port, help="data port (0 = any); overrides server.http_port"
    )
    run.add_argument(
        "--admin-port",
        metavar="P",
        type=_port,
        help="admin port (0 = any); overrides server.admin_port",
    )

    validate = commands.add_parser("validate", help="check a configuration file and exit")
    _add_config_option(validate)

    routes = commands.add_parser("routes", help="print the compiled routing table")
    _add_config_option(routes)
    routes.add_argument(
        "--json", action="store_true", help="print the /_/routes JSON document instead"
    )
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="YAML or JSON configuration (default: $OCTOPUS_CONFIG, else the embedded default)",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("octopus-gateway")
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``octopus`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "validate":
            return command_validate(args)
        if args.command == "routes":
            return command_routes(args)
        return command_run(args)
    except _UsageError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 130
    return EXIT_CHECK_FAILED  # pragma: no cover - parser.error exits


def _config_source(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get("OCTOPUS_CONFIG") or None


def _load(source: str | None) -> Any:
    """Load settings, or print every problem (one per line) and return None.

    A missing file is checked here so the message is the same whatever the loader
    would have said about it.
    """
    from settings import ConfigError, load_settings

    if source is not None and not os.path.isfile(source):
        what = "is a directory" if os.path.isdir(source) else "not found"
        print(f"{source}: configuration file {what}", file=sys.stderr)
        return None
    try:
        return load_settings(source)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
    except OSError as exc:
        print(f"{source}: cannot read: {exc.strerror or exc}", file=sys.stderr)
    return None


def command_validate(args: argparse.Namespace) -> int:
    """``octopus validate``: ``OK: FILE`` on stdout, or every error on stderr and 1.

    Beyond the schema, the routing table is built too (offline: no sockets, no event
    loop), so a file that validates is one that ``run`` will accept.
    """
    source = _config_source(args)
    settings = _load(source)
    if settings is None:
        return EXIT_CHECK_FAILED
    problem = _build_problem(settings)
    if problem is not None:
        print(f"{source or DEFAULT_SOURCE}: {problem}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"OK: {source or DEFAULT_SOURCE}")
    return EXIT_OK


def _build_problem(settings: Any) -> str | None:
    from settings import ConfigError

    try:
        _build_app(settings)
    except ConfigError as exc:
        return str(exc)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        return f"cannot build the routing table: {exc}"
    return None


def _build_app(settings: Any) -> Any:
    from gateway.asgi import create_app

    return create_app(settings, serve_admin=False)


def command_routes(args: argparse.Namespace) -> int:
    """``octopus routes``: the compiled table as aligned columns, or ``--json``."""
    from app.admin import route_view, routes_document

    source = _config_source(args)
    settings = _load(source)
    if settings is None:
        return EXIT_CHECK_FAILED
    try:
        gateway = _build_app(settings).gateway
    except (ValueError, TypeError, KeyError) as exc:
        print(f"{source or DEFAULT_SOURCE}: cannot build the routing table: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    document = routes_document(gateway)
    if args.json:
        print(json.dumps(document, indent=2))
        return EXIT_OK
    ordered = sorted(gateway.table.routes, key=lambda route: route.order)
    print(format_routes([route_view(route) for route in ordered]))
    for conflict in document.get("conflicts", []):
        print(f"conflict: {json.dumps(conflict, sort_keys=True)}")
    return EXIT_OK


ROUTE_COLUMNS = ("NAME", "SOURCE", "METHODS", "HOST", "PATH", "UPSTREAM", "PRIORITY")


def format_routes(routes: Sequence[dict[str, Any]]) -> str:
    """Routes (``/_/routes`` entries) as a table; ``*`` means any method or host."""
    rows = [ROUTE_COLUMNS]
    for route in routes:
        rows.append(
            (
                str(route["name"]),
                str(route["source"]),
                ",".join(route["methods"]) if route["methods"] else "*",
                route["host"] or "*",
                str(route["path"]),
                str(route["upstream"]),
                str(route["priority"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(ROUTE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def command_run(args: argparse.Namespace) -> int:
    """``octopus run``: exit 2 on an invalid configuration, else the server's exit code."""
    from gateway.server import resolve_workers, serve

    source = _config_source(args)
    settings = _load(source)
    if settings is None:
        return EXIT_CONFIG
    # Build the table once here (offline, cheap) so a configuration the schema accepts
    # but the table builder rejects fails now, as a message, not in every worker.
    problem = _build_problem(settings)
    if problem is not None:
        print(f"{source or DEFAULT_SOURCE}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    settings = _apply_overrides(settings, args)
    try:
        workers = resolve_workers(
            args.workers if args.workers is not None else settings.server.workers
        )
    except ValueError as exc:
        raise _UsageError(f"--workers: {exc}") from None
    return serve(settings, workers=workers, server=args.server)


def _apply_overrides(settings: Any, args: argparse.Namespace) -> Any:
    """Command-line values win over the file and the environment for this run only."""
    update: dict[str, Any] = {}
    if args.host is not None:
        update["host"] = args.host
    if args.port is not None:
        update["http_port"] = args.port
    if args.admin_port is not None:
        update["admin_port"] = args.admin_port
    if not update:
        return settings
    server = settings.server.model_copy(update=update)
    return settings.model_copy(update={"server": server})


if __name__ == "__main__":
    sys.exit(main())
