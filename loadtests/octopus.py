"""Start Octopus as a benchmark target in front of the benchmark upstream.

The gateway is configured the way a user would (a YAML file and the CLI), not by importing the
app in-process: the benchmark should measure what ``octopus run`` ships, server and all.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from loadtests.nginx import UPSTREAM_BODY
from loadtests.procs import LOOPBACK, HarnessError, ManagedProcess, free_port, wait_for_http_200

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Octopus needs time to import, build routes and start its server; 20 s is generous on a
#: loaded CI box and still fails a hung startup within the attention span of a person.
STARTUP_DEADLINE_S = 20.0


def octopus_config(http_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """The minimal gateway config: one static upstream, one catch-all route, quiet logging.

    Access logging is off because nginx's is off too; a log line per request would be a cost
    of configuration, not of the proxy.
    """
    return {
        "server": {
            "host": LOOPBACK,
            "http_port": http_port,
            "admin_port": admin_port,
            "workers": 1,
        },
        "discovery": {"backend": "static"},
        "upstreams": {"bench": {"endpoints": [{"url": f"http://{LOOPBACK}:{upstream_port}"}]}},
        "routes": [{"name": "bench", "match": {"path": "/{rest:path}"}, "upstream": "bench"}],
        "observability": {"logging": {"level": "warning", "access_log": False}},
    }


def start_octopus(
    workdir: Path, upstream_port: int, server: str | None = None
) -> tuple[ManagedProcess, int]:
    """Write the config, run ``python -m gateway.cli run``, and wait until it really proxies.

    Ready means three things: the proxy port answers ``GET /`` with 200, the admin port's
    ``/_/health`` answers 200, and the proxied body is the upstream's exact 100 bytes (so we
    are not benchmarking a gateway that answers by itself). Any failure raises
    :class:`HarnessError` carrying the gateway's stderr tail.
    """
    prefix = workdir / "octopus"
    prefix.mkdir(parents=True, exist_ok=True)
    http_port, admin_port = free_port(), free_port()
    while admin_port == http_port:
        admin_port = free_port()
    config_path = prefix / "octopus.yaml"
    config_path.write_text(
        yaml.safe_dump(octopus_config(http_port, admin_port, upstream_port), sort_keys=False)
    )
    # sys.executable is the venv's python under `make bench`, so this runs the checkout's
    # gateway without depending on the console script being installed.
    argv = [sys.executable, "-m", "gateway.cli", "run", "-c", str(config_path), "--workers", "1"]
    if server:
        argv += ["--server", server]
    proc = ManagedProcess("octopus", argv, log_dir=prefix, cwd=REPO_ROOT).start()

    answer = wait_for_http_200(proc, http_port, "/", deadline_s=STARTUP_DEADLINE_S)
    wait_for_http_200(proc, admin_port, "/_/health", deadline_s=STARTUP_DEADLINE_S)
    if answer.body != UPSTREAM_BODY.encode():
        raise HarnessError(
            f"octopus answered GET / with 200 but not the upstream's body "
            f"({len(answer.body)} bytes: {answer.body[:120]!r})\n" + proc.describe_failure()
        )
    return proc, http_port
