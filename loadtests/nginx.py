"""Start the two nginx instances the benchmark needs: the upstream and the baseline proxy.

Each instance gets its own prefix directory, config, pid file, error log and temp paths inside
the run's temporary directory, so it needs no system paths, works as root or not, and cannot
collide with a system nginx or with a concurrent benchmark run.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import string
import subprocess
from pathlib import Path

from loadtests.procs import HarnessError, ManagedProcess, free_port, wait_for_http_200

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

#: What the upstream returns to every request. Exactly 100 bytes, and only characters that
#: nginx passes through verbatim inside a quoted ``return`` string (no ``$``, quote or
#: backslash), so the probe can compare it byte for byte.
UPSTREAM_BODY = "0123456789" * 10
assert len(UPSTREAM_BODY.encode()) == 100


class _ConfTemplate(string.Template):
    """``@name`` placeholders, because ``$`` and ``{}`` are nginx syntax."""

    delimiter = "@"


def find_nginx(explicit: str | None = None) -> str:
    """Locate the nginx binary; /usr/sbin is often not on a non-root user's PATH."""
    for candidate in (explicit, shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise HarnessError("nginx not found (install nginx-light or pass --nginx PATH)")


def nginx_version(nginx: str) -> str:
    """The ``nginx -v`` banner, recorded with results so numbers can be compared later."""
    proc = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    return (proc.stderr or proc.stdout).strip()


def _user_directive() -> str:
    """Keep nginx workers running as the current user.

    As root, nginx would otherwise drop its workers to ``nobody``, which cannot read the
    0700 temporary directory; as non-root the ``user`` directive is ignored with a warning,
    so it is left out.
    """
    if os.geteuid() != 0:
        return "# not root: workers run as the current user"
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


def render_config(template_name: str, prefix: Path, **values: object) -> str:
    """Fill a template from ``loadtests/templates`` for an instance living in ``prefix``."""
    template = _ConfTemplate((TEMPLATE_DIR / template_name).read_text())
    return template.substitute(
        prefix=str(prefix),
        user_directive=_user_directive(),
        body=UPSTREAM_BODY,
        **{key: str(value) for key, value in values.items()},
    )


def start_nginx(
    nginx: str, name: str, template_name: str, workdir: Path, **values: object
) -> tuple[ManagedProcess, int]:
    """Render a config, check it with ``nginx -t``, start nginx and wait until it answers.

    Returns the process and the port it listens on. The upstream's own answer is verified to
    be the 100-byte body, so a misconfigured instance fails here rather than producing
    numbers for the wrong response.
    """
    prefix = workdir / name
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render_config(template_name, prefix, port=port, **values))
    # -e: the startup error log, used before the config is read; the default
    # /var/log/nginx/error.log is not writable for a normal user.
    base = [nginx, "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf)]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise HarnessError(f"nginx -t failed for {conf}:\n{check.stderr.strip()}")
    proc = ManagedProcess(name, base, log_dir=prefix).start()
    try:
        answer = wait_for_http_200(proc, port, deadline_s=10.0)
    except HarnessError as exc:
        raise HarnessError(f"{exc}\n--- error.log ---\n{_error_log(prefix)}") from None
    if answer.body != UPSTREAM_BODY.encode():
        raise HarnessError(
            f"{name} answered an unexpected body ({len(answer.body)} bytes): {answer.body[:120]!r}"
        )
    return proc, port


def _error_log(prefix: Path) -> str:
    try:
        return (prefix / "error.log").read_text(errors="replace")[-4000:]
    except FileNotFoundError:
        return "(no error.log)"
