"""The demo service (``examples/demo_service``) and its committed manifest
``services/demo-users.json``, which the gateway's default file discovery reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from examples.demo_service.app import build_manifest, create_app
from examples.demo_service.openapi import OPENAPI
from examples.demo_service.write_manifest import DEFAULT_OUTPUT, write_manifest
from gateway.farp.canonical import schema_hash
from gateway.farp.manifest import parse_manifest
from gateway.farp.routes import routes_for_manifest
from tests.farp.support import RunningGateway, eventually, file_config, write_json
from tests.support.servers import ThreadedServer

REPO = Path(__file__).resolve().parents[2]
MANIFEST_FILE = REPO / "services" / "demo-users.json"

#: The public API behind the gateway, as the README documents it.
PUBLIC_ROUTES = {
    ("/demo-users/users", frozenset({"GET", "POST"})),
    ("/demo-users/users/{id}", frozenset({"GET"})),
}


def committed_manifest() -> dict[str, Any]:
    return json.loads(MANIFEST_FILE.read_text(encoding="utf-8"))


def test_the_committed_manifest_is_valid_and_inlines_the_demo_openapi_document() -> None:
    manifest = parse_manifest(committed_manifest())

    assert (manifest.service_name, manifest.instance_id) == ("demo-users", "demo-users-1")
    assert manifest.instance is not None and manifest.instance.address == "127.0.0.1:9001"
    assert manifest.routing.strategy == "service"
    [schema] = manifest.schemas
    assert (schema.type, schema.location_type) == ("openapi", "inline")
    assert schema.inline_schema == OPENAPI, (
        "stale: run python -m examples.demo_service.write_manifest"
    )
    assert schema.hash == schema_hash(OPENAPI)


def test_the_committed_manifest_routes_the_documented_public_paths() -> None:
    manifest = parse_manifest(committed_manifest())

    routes = routes_for_manifest(manifest, {"openapi": manifest.schemas[0].inline_schema})

    assert {(r.public_path, r.methods) for r in routes} == PUBLIC_ROUTES
    assert {r.upstream_path for r in routes} == {"/users", "/users/{id}"}


def test_write_manifest_reproduces_the_committed_file(tmp_path: Path) -> None:
    assert DEFAULT_OUTPUT == MANIFEST_FILE
    copy = tmp_path / "demo-users.json"
    shutil.copy(MANIFEST_FILE, copy)

    assert write_manifest(copy) is False, (
        "stale: run python -m examples.demo_service.write_manifest"
    )
    assert copy.read_bytes() == MANIFEST_FILE.read_bytes()


def test_write_manifest_writes_a_valid_manifest_for_another_address(tmp_path: Path) -> None:
    output = tmp_path / "services" / "demo.json"

    assert write_manifest(output, "10.1.2.3:8000") is True

    manifest = parse_manifest(json.loads(output.read_text()))
    assert manifest.instance is not None and manifest.instance.address == "10.1.2.3:8000"


def test_the_demo_serves_its_openapi_document_and_a_valid_manifest() -> None:
    with ThreadedServer(create_app("127.0.0.1:9999")) as server:
        document = httpx.get(f"{server.url}/openapi.json").json()
        manifest = parse_manifest(httpx.get(f"{server.url}/_farp/manifest").json())
        health = httpx.get(f"{server.url}/health")

    assert document == OPENAPI
    assert manifest.schemas[0].hash == schema_hash(document)
    assert manifest.instance is not None and manifest.instance.address == "127.0.0.1:9999"
    assert health.json() == {"status": "ok"}


def test_the_demo_api_works_through_the_gateway(
    start_gateway: Callable[[dict[str, Any]], RunningGateway], manifest_dir: Path
) -> None:
    with ThreadedServer(create_app()) as demo:
        address = f"127.0.0.1:{demo.port}"
        write_json(manifest_dir, "demo-users.json", build_manifest(address))
        gateway = start_gateway(file_config(manifest_dir)).wait_ready()
        gateway.wait_route("/demo-users/users/{id}")

        listed = gateway.get("/demo-users/users")
        created = gateway.request("POST", "/demo-users/users", json={"name": "Alan Turing"})
        fetched = gateway.get(f"/demo-users/users/{created.json()['id']}")
        missing = gateway.get("/demo-users/users/999")
        invalid = gateway.request("POST", "/demo-users/users", json={"email": "x@y"})
        unpublished = gateway.get("/demo-users/health")

    assert listed.status_code == 200
    assert [u["name"] for u in listed.json()] == ["Ada Lovelace", "Grace Hopper"]
    assert created.status_code == 201
    assert fetched.json() == {"id": 3, "name": "Alan Turing", "email": None}
    assert missing.status_code == 404 and missing.json() == {"error": "no user with id 999"}
    assert invalid.status_code == 422
    assert unpublished.status_code == 404  # only the API is published, not /health


def test_python_m_examples_demo_service_starts_the_service(tmp_path: Path) -> None:
    from tests.support.servers import bind_socket

    probe = bind_socket()
    port = probe.getsockname()[1]
    probe.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCTOPUS_")}
    log = (tmp_path / "demo.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.demo_service", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def answers() -> dict[str, Any] | None:
        assert process.poll() is None, (tmp_path / "demo.log").read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/_farp/manifest", timeout=1).json()
        except httpx.TransportError:
            return None

    try:
        manifest = eventually(answers, timeout=20, interval=0.05)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
    assert manifest["instance"]["address"] == f"127.0.0.1:{port}"
