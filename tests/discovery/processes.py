"""Real registry servers for the discovery tests: etcd, redis-server and dnsmasq, each
started by the tests on free 127.0.0.1 ports in a temporary directory, killable and
restartable on the same ports (to test outages), and stopped at teardown.

A missing binary skips the test with the package to install, except under ``CI=true``,
where it is a failure: CI must not go green by testing nothing.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.servers import free_port
from tests.support.waiting import eventually


def require_binary(name: str, package: str) -> str:
    """The path of ``name``; skip (or fail under CI) when it is not installed."""
    path = shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{name}", os.X_OK)),
        None,
    )
    if path:
        return path
    message = (
        f"{name} is not installed: install the Debian package {package} "
        "(bash .ci/system-deps.sh does it)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ServerProcess:
    """A server child process; subclasses give its command line and readiness check."""

    name = "server"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> ServerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        eventually(self._up, timeout=20, interval=0.05, message=f"{self.name} did not start")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
        return self.ready()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """An abrupt outage: SIGKILL, no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """Kill (if running) and start again on the same ports with the same data."""
        self.kill()
        self.start()


def make_certificates(directory: Path) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate
    (P-256 keys: fast to make), with the ``openssl`` command line tool."""
    openssl = require_binary("openssl", "openssl")
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: str(directory / name) for name in ("ca.pem", "ca.key")}

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=directory)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=octopus test CA")  # fmt: skip
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (directory / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"
        )
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
            "-extfile", f"{name}.ext")  # fmt: skip
        files[f"{name}.pem"] = str(directory / f"{name}.pem")
        files[f"{name}.key"] = str(directory / f"{name}.key")
    return files


class EtcdServer(ServerProcess):
    """A one-member etcd cluster; keys written and read through its JSON gateway.

    With ``tls`` (from :func:`make_certificates`) it serves HTTPS only and requires a
    client certificate signed by the test CA.
    """

    name = "etcd"

    def __init__(self, binary: str, workdir: Path, tls: dict[str, str] | None = None) -> None:
        super().__init__(binary, workdir)
        self.port = free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.token: str | None = None

    def _client_options(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        context = ssl.create_default_context(cafile=self.tls["ca.pem"])
        context.load_cert_chain(self.tls["client.pem"], self.tls["client.key"])
        return {"verify": context}

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name=test",
            f"--data-dir={self.workdir / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--logger=zap",
            "--log-level=error",
            *(
                [
                    f"--cert-file={self.tls['server.pem']}",
                    f"--key-file={self.tls['server.key']}",
                    f"--trusted-ca-file={self.tls['ca.pem']}",
                    "--client-cert-auth",
                ]
                if self.tls
                else []
            ),
        ]

    def ready(self) -> bool:
        try:
            response = httpx.get(f"{self.url}/health", timeout=1, **self._client_options())
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json().get("health") == "true"

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"authorization": self.token} if self.token else {}
        response = httpx.post(
            f"{self.url}{path}", json=body, headers=headers, timeout=5, **self._client_options()
        )
        data = response.json()
        assert response.status_code == 200 and not data.get("error"), data
        return data

    def put(self, key: str, value: bytes | str) -> int:
        """Write ``key``; returns the new revision."""
        raw = value.encode() if isinstance(value, str) else value
        reply = self.call(
            "/v3/kv/put",
            {
                "key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(raw).decode(),
            },
        )
        return int(reply["header"]["revision"])

    def delete(self, key: str) -> int:
        reply = self.call("/v3/kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})
        return int(reply["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def enable_auth(self, user: str, password: str) -> None:
        """Create ``user`` with the root role and turn authentication on."""
        self.call("/v3/auth/role/add", {"name": "root"})
        self.call("/v3/auth/user/add", {"name": user, "password": password})
        self.call("/v3/auth/user/grant", {"user": user, "role": "root"})
        self.call("/v3/auth/enable", {})
        reply = self.call("/v3/auth/authenticate", {"name": user, "password": password})
        self.token = reply["token"]


class RedisServer(ServerProcess):
    """redis-server without persistence: a restart starts empty, as a cache does."""

    name = "redis"

    def __init__(self, binary: str, workdir: Path) -> None:
        super().__init__(binary, workdir)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
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
        ]

    def ready(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


class DnsmasqServer(ServerProcess):
    """dnsmasq answering only from its configuration file (no upstream, no hosts file).

    dnsmasq re-reads hosts files on SIGHUP but not ``srv-host``/``txt-record`` lines of
    its configuration file, so ``configure()`` rewrites the file and restarts it.
    """

    name = "dnsmasq"

    def __init__(self, binary: str, workdir: Path, domain: str = "example.test") -> None:
        super().__init__(binary, workdir)
        self.port = free_port()
        self.domain = domain
        self.conf = workdir / "dnsmasq.conf"
        self.ttl = 0
        self.lines: list[str] = []
        self._write()

    def _write(self) -> None:
        # local=/domain/: names under it that are not configured are NXDOMAIN, not REFUSED.
        self.conf.write_text("\n".join([f"local=/{self.domain}/", *self.lines]) + "\n")

    def command(self) -> list[str]:
        return [
            self.binary,
            "--no-daemon",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            f"--local-ttl={self.ttl}",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
            f"--conf-file={self.conf}",
        ]

    def ready(self) -> bool:
        return _port_open(self.port)

    def configure(self, lines: list[str], *, ttl: int | None = None) -> None:
        """Replace the records and (re)start dnsmasq so they take effect."""
        self.lines = list(lines)
        if ttl is not None:
            self.ttl = ttl
        self._write()
        if self.running:
            self.restart()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"
