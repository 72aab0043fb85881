"""HTTPS upstreams: the certificate is verified against the configured CA."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import MakeGateway, gateway_config, route
from tests.support.upstream import UpstreamServer


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    folder = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=Octopus Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
            cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=folder,
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def tls_upstream(certificates: Path) -> Iterator[UpstreamServer]:
    with UpstreamServer(
        "tls",
        ssl_certfile=str(certificates / "server.pem"),
        ssl_keyfile=str(certificates / "server.key"),
    ) as server:
        yield server


def https_config(url: str, tls: dict[str, Any] | None) -> dict[str, Any]:
    upstream: dict[str, Any] = {"endpoints": [url], "retries": 0}
    if tls is not None:
        upstream["tls"] = tls
    return gateway_config({"secure": upstream}, [route("all", "/{rest:path}", "secure")])


def test_an_https_upstream_signed_by_the_configured_ca_is_reached(
    make_gateway: MakeGateway, tls_upstream: UpstreamServer, certificates: Path
) -> None:
    assert tls_upstream.url.startswith("https://")
    gw = make_gateway(https_config(tls_upstream.url, {"ca": str(certificates / "ca.pem")}))
    tls_upstream.app.reset()
    with gw.client() as client:
        response = client.get("/secure/data")
    assert response.status_code == 200
    assert response.json()["server"] == "tls"
    assert tls_upstream.app.paths == ["/secure/data"]


def test_an_https_upstream_with_an_unknown_ca_gets_502(
    make_gateway: MakeGateway, tls_upstream: UpstreamServer
) -> None:
    gw = make_gateway(https_config(tls_upstream.url, None))
    tls_upstream.app.reset()
    with gw.client() as client:
        response = client.get("/secure/data")
    assert response.status_code == 502
    assert response.json()["error"] == "bad_gateway"
    assert tls_upstream.app.requests == []


def test_an_https_upstream_is_reached_without_verification_when_turned_off(
    make_gateway: MakeGateway, tls_upstream: UpstreamServer
) -> None:
    gw = make_gateway(https_config(tls_upstream.url, {"verify": False}))
    with gw.client() as client:
        response = client.get("/secure/data")
    assert response.status_code == 200
    assert response.json()["server"] == "tls"


def test_https_connections_to_the_upstream_are_kept_alive(
    make_gateway: MakeGateway, tls_upstream: UpstreamServer, certificates: Path
) -> None:
    gw = make_gateway(https_config(tls_upstream.url, {"ca": str(certificates / "ca.pem")}))
    tls_upstream.app.reset()
    with gw.client() as client:
        for index in range(3):
            assert client.get(f"/again/{index}").status_code == 200
    assert len(tls_upstream.app.peers) == 1
