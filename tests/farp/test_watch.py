"""Watching discovery and swapping routing tables in a running gateway (FARP.md §5, §7).

Every test runs a real gateway with the ``file`` backend polling a temporary directory
every 100 ms, writes manifest files the way a publisher would, and waits (with a
deadline) for the effect to show through the admin API, the metrics or the data plane.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.farp.publish import http_schema, inline_schema, make_manifest
from tests.farp.support import (
    RunningGateway,
    SchemaServer,
    Upstream,
    eventually,
    file_config,
    openapi,
    write_json,
)
from tests.support.servers import ThreadedServer

Start = Callable[[dict[str, Any]], RunningGateway]

V1 = openapi("/users", "/users/{id}", title="v1")
V2 = openapi("/users", "/users/{id}", "/orders", title="v2")


def manifest_for(upstream: Upstream, name: str = "shop", document: Any = V1, **options: Any) -> Any:
    options.setdefault("routing", {"strategy": "service"})
    return make_manifest(
        name, f"{name}-1", upstream.address, [inline_schema("openapi", document)], **options
    )


def fetched_from(upstream: Upstream, url: str, document: Any) -> Any:
    """A ``shop`` manifest whose OpenAPI document is fetched from ``url``."""
    return make_manifest(
        "shop",
        "shop-1",
        upstream.address,
        [http_schema("openapi", document, url)],
        routing={"strategy": "service"},
    )


def watching(start: Start, directory: Path) -> RunningGateway:
    return start(file_config(directory)).wait_ready()


def status(gateway: RunningGateway, path: str) -> int:
    return gateway.get(path).status_code


def test_routes_appear_after_a_manifest_file_is_written(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream
) -> None:
    gateway = watching(start_gateway, manifest_dir)
    assert status(gateway, "/shop/users/1") == 404

    write_json(manifest_dir, "shop.json", manifest_for(alpha))

    gateway.wait_route("/shop/users/{id}")
    assert status(gateway, "/shop/users/1") == 200
    assert alpha.paths == ["/users/1"]


def test_yaml_manifest_files_and_files_with_several_manifests_are_read(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream, beta: Upstream
) -> None:
    import yaml

    gateway = watching(start_gateway, manifest_dir)
    (manifest_dir / "pair.yaml").write_text(
        yaml.safe_dump([manifest_for(alpha, "one"), manifest_for(beta, "two")])
    )

    gateway.wait_route("/two/users")
    assert status(gateway, "/one/users") == 200
    assert status(gateway, "/two/users") == 200
    assert (alpha.paths, beta.paths) == (["/users"], ["/users"])


def test_a_manifest_with_a_wrong_checksum_is_rejected_and_the_old_routes_keep_serving(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream
) -> None:
    gateway = watching(start_gateway, manifest_dir)
    write_json(manifest_dir, "shop.json", manifest_for(alpha))
    gateway.wait_route("/shop/users")

    tampered = manifest_for(alpha, document=V2)
    tampered["checksum"] = manifest_for(alpha)["checksum"]  # the v1 checksum over v2 schemas
    write_json(manifest_dir, "shop.json", tampered)

    eventually(
        lambda: gateway.metric("octopus_farp_manifests_rejected_total", reason="checksum") == 1,
        message="the tampered manifest was not rejected for its checksum",
    )
    assert status(gateway, "/shop/users") == 200
    assert status(gateway, "/shop/orders") == 404
    assert "/shop/orders" not in gateway.route_paths()


def test_an_invalid_manifest_is_rejected_once_not_again_on_every_rebuild(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream
) -> None:
    gateway = watching(start_gateway, manifest_dir)
    invalid = manifest_for(alpha, "broken")
    del invalid["instance_id"]
    write_json(manifest_dir, "broken.json", invalid)
    eventually(lambda: gateway.metric("octopus_farp_manifests_rejected_total", reason="invalid"))

    # Later rebuilds (other services arriving, each after a few 100 ms retry intervals)
    # do not validate and count the same document again.
    for name in ("later", "later-still", "last"):
        write_json(manifest_dir, f"{name}.json", manifest_for(alpha, name))
        gateway.wait_route(f"/{name}/users")

    assert gateway.metric("octopus_farp_manifests_rejected_total", reason="invalid") == 1


def test_a_schema_server_that_goes_down_keeps_the_last_good_routes(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream
) -> None:
    schemas = SchemaServer({})
    schemas.put("/v1.json", V1)
    schemas.put("/v2.json", V2)
    server = ThreadedServer(schemas).start()
    try:
        gateway = watching(start_gateway, manifest_dir)
        first = fetched_from(alpha, f"{server.url}/v1.json", V1)
        write_json(manifest_dir, "shop.json", first)
        gateway.wait_route("/shop/users/{id}")
    finally:
        server.stop()

    second = fetched_from(alpha, f"{server.url}/v2.json", V2)
    write_json(manifest_dir, "shop.json", second)

    eventually(
        lambda: gateway.metric("octopus_farp_schema_fetch_failures_total", reason="unreachable"),
        message="the gateway never tried the schema server that went down",
    )
    assert status(gateway, "/shop/users/7") == 200
    assert status(gateway, "/shop/orders") == 404
    assert alpha.paths == ["/users/7"]


def test_a_schema_that_failed_to_fetch_is_retried_until_it_arrives(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream
) -> None:
    schemas = SchemaServer({})
    schemas.put("/v1.json", V1)
    schemas.put("/v2.json", V2)
    with ThreadedServer(schemas) as server:
        gateway = watching(start_gateway, manifest_dir)
        first = fetched_from(alpha, f"{server.url}/v1.json", V1)
        write_json(manifest_dir, "shop.json", first)
        gateway.wait_route("/shop/users")

        schemas.status = 503
        second = fetched_from(alpha, f"{server.url}/v2.json", V2)
        write_json(manifest_dir, "shop.json", second)
        eventually(
            lambda: gateway.metric(
                "octopus_farp_schema_fetch_failures_total", reason="http_status"
            ),
            message="the failing schema server was never asked",
        )
        assert "/shop/orders" not in gateway.route_paths()

        schemas.status = 200  # the manifest file does not change again

        gateway.wait_route("/shop/orders")
        assert status(gateway, "/shop/orders") == 200


def test_a_removed_file_removes_the_services_routes(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream, beta: Upstream
) -> None:
    gateway = watching(start_gateway, manifest_dir)
    write_json(manifest_dir, "shop.json", manifest_for(alpha, "shop"))
    write_json(manifest_dir, "blog.json", manifest_for(beta, "blog"))
    gateway.wait_route("/shop/users")
    gateway.wait_route("/blog/users")

    (manifest_dir / "shop.json").unlink()

    gateway.wait_route("/shop/users", present=False)
    assert status(gateway, "/shop/users") == 404
    assert status(gateway, "/blog/users") == 200
    assert gateway.metric("octopus_farp_services_total") == 1
    assert "shop" not in {u["name"] for u in gateway.services()["upstreams"]}


def test_an_unparseable_file_keeps_its_last_good_content(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream, beta: Upstream
) -> None:
    gateway = watching(start_gateway, manifest_dir)
    write_json(manifest_dir, "shop.json", manifest_for(alpha))
    gateway.wait_route("/shop/users")

    (manifest_dir / "shop.json").write_text('{"version": "1.0.0", "service_na')  # half-saved
    # A marker written after it: once its route shows, the scan has read the broken file.
    write_json(manifest_dir, "marker.json", manifest_for(beta, "marker"))
    gateway.wait_route("/marker/users")

    assert status(gateway, "/shop/users") == 200
    assert alpha.paths == ["/users"]

    write_json(manifest_dir, "shop.json", manifest_for(alpha, document=V2))  # fixed
    gateway.wait_route("/shop/orders")


def test_a_replaced_file_of_the_same_size_and_timestamp_is_still_reread(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream, beta: Upstream
) -> None:
    first, second = manifest_for(alpha), manifest_for(beta)
    size = max(len(json.dumps(first)), len(json.dumps(second))) + 10
    for document in (first, second):  # pad both to the same size
        document["x-pad"] = ""
        document["x-pad"] = "p" * (size - len(json.dumps(document)))
    assert len(json.dumps(first)) == len(json.dumps(second))
    gateway = watching(start_gateway, manifest_dir)
    target = write_json(manifest_dir, "shop.json", first)
    gateway.wait_route("/shop/users")
    stamp = target.stat()

    # A publisher renames a new file over the old one within the timestamp granularity.
    replacement = manifest_dir / ".shop.json.next"
    replacement.write_text(json.dumps(second))
    os.utime(replacement, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    os.replace(replacement, target)
    assert (target.stat().st_mtime_ns, target.stat().st_size) == (
        stamp.st_mtime_ns,
        stamp.st_size,
    )

    eventually(
        lambda: gateway.get("/shop/users").status_code == 200 and beta.requests,
        message="the replaced file was never read again",
    )


def test_a_routing_change_alone_rebuilds_routes_though_the_checksum_is_unchanged(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream
) -> None:
    gateway = watching(start_gateway, manifest_dir)
    write_json(manifest_dir, "shop.json", manifest_for(alpha))
    gateway.wait_route("/shop/users")

    moved = manifest_for(alpha, routing={"strategy": "custom", "base_path": "/store"})
    assert moved["checksum"] == manifest_for(alpha)["checksum"]
    write_json(manifest_dir, "shop.json", moved)

    gateway.wait_route("/store/users")
    assert status(gateway, "/shop/users") == 404
    assert status(gateway, "/store/users/3") == 200
    assert alpha.paths == ["/users/3"]


def test_ready_answers_503_until_the_first_sync_completes(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream
) -> None:
    schemas = SchemaServer({})
    schemas.put("/openapi.json", V1)
    schemas.gate.clear()  # schema requests wait: the first sync cannot finish
    with ThreadedServer(schemas) as server:
        descriptor = http_schema("openapi", V1, f"{server.url}/openapi.json")
        manifest = make_manifest(
            "shop", "shop-1", alpha.address, [descriptor], routing={"strategy": "service"}
        )
        write_json(manifest_dir, "shop.json", manifest)
        gateway = start_gateway(file_config(manifest_dir))
        try:
            eventually(lambda: schemas.seen, message="the gateway never asked for the schema")
            not_ready = gateway.get("/_/ready")
            assert not_ready.status_code == 503
            assert not_ready.json()["status"] == "starting"
            assert gateway.get("/_/health").status_code == 200  # alive, just not ready
        finally:
            schemas.gate.set()

        eventually(gateway.ready, message="the gateway never became ready after the sync")
        assert "/shop/users/{id}" in gateway.route_paths()  # ready means routed


def test_tables_swap_under_load_without_a_failed_request(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream, beta: Upstream, gamma: Upstream
) -> None:
    """A client loop runs for ~5 s while the manifest flips 20 times between two valid
    versions routing the same path to different upstreams; nothing may fail or stray."""
    versions = [manifest_for(alpha, "swap"), manifest_for(beta, "swap")]
    gateway = watching(start_gateway, manifest_dir)
    write_json(manifest_dir, "swap.json", versions[0])
    gateway.wait_route("/swap/users/{id}")

    stop = threading.Event()
    outcomes: list[tuple[str, int | str]] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            sent = 0
            while not stop.is_set():
                seq = f"{worker}-{sent}"
                sent += 1
                try:
                    result: int | str = http.get(
                        "/swap/users/9", headers={"x-seq": seq}
                    ).status_code
                except httpx.HTTPError as exc:
                    result = repr(exc)
                with lock:
                    outcomes.append((seq, result))

    workers = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        first_version = gateway.gateway.table.version
        for change in range(1, 21):
            target = versions[change % 2]
            write_json(manifest_dir, "swap.json", target)
            port = int(target["instance"]["address"].rsplit(":", 1)[1])
            eventually(
                lambda port=port: (
                    gateway.gateway.table.upstreams["swap"].endpoints[0].address.port == port
                ),
                message=f"change {change} never took effect",
            )
            # Spread the 20 changes over about five seconds of traffic.
            pause_until = started + change * 0.25
            while time.monotonic() < pause_until:
                time.sleep(0.01)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=15)

    failures = [(seq, result) for seq, result in outcomes if result != 200]
    assert failures == [], f"{len(failures)} of {len(outcomes)} requests failed: {failures[:5]}"
    assert len(outcomes) > 200
    assert gateway.gateway.table.version >= first_version + 20
    seqs = {seq for seq, _ in outcomes}
    by_alpha = {alpha.header(r, "x-seq") for r in alpha.requests}
    by_beta = {beta.header(r, "x-seq") for r in beta.requests}
    assert by_alpha | by_beta == seqs  # every response came from one of the two
    assert not by_alpha & by_beta  # exactly one
    assert by_alpha and by_beta
    assert gamma.requests == []
    assert {r["path"] for r in alpha.requests + beta.requests} == {"/users/9"}


def test_a_service_that_leaves_and_returns_registers_anew(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream, beta: Upstream
) -> None:
    def claim(upstream: Upstream, name: str) -> Any:
        return manifest_for(
            upstream, name, document=openapi("/items"), routing={"strategy": "root"}
        )

    def winner() -> str | None:
        conflicts = gateway.routes()["conflicts"]
        return conflicts[0]["winner"] if conflicts else None

    gateway = watching(start_gateway, manifest_dir)
    write_json(manifest_dir, "zeta.json", claim(alpha, "zeta"))
    gateway.wait_route("/items")
    write_json(manifest_dir, "alpha.json", claim(beta, "alpha"))
    eventually(lambda: winner() == "zeta", message="zeta registered first and should win")

    (manifest_dir / "zeta.json").unlink()
    eventually(lambda: winner() is None and status(gateway, "/items") == 200)
    write_json(manifest_dir, "zeta.json", claim(alpha, "zeta"))

    eventually(lambda: gateway.routes()["conflicts"], message="the conflict did not come back")
    assert winner() == "alpha"


def test_farp_metrics_describe_services_routes_updates_and_rejections(
    start_gateway: Start, manifest_dir: Path, alpha: Upstream, beta: Upstream
) -> None:
    asyncapi = {
        "asyncapi": "3.0.0",
        "info": {"title": "live", "version": "1"},
        "servers": {"ws": {"host": "x", "protocol": "ws"}},
        "channels": {"feed": {"address": "/feed"}},
    }
    gateway = watching(start_gateway, manifest_dir)
    assert gateway.metric("octopus_farp_services_total") == 0

    shop = make_manifest(
        "shop",
        "shop-1",
        alpha.address,
        [inline_schema("openapi", V1), inline_schema("asyncapi", asyncapi)],
        routing={"strategy": "service"},
    )
    write_json(manifest_dir, "shop.json", shop)
    write_json(manifest_dir, "blog.json", manifest_for(beta, "blog", document=V2))
    gateway.wait_route("/blog/orders")
    gateway.wait_route("/shop/feed")

    metric = gateway.metric
    assert metric("octopus_farp_services_total") == 2
    assert metric("octopus_farp_routes_total", service="shop", type="http") == 2
    assert metric("octopus_farp_routes_total", service="shop", type="websocket") == 1
    assert metric("octopus_farp_routes_total", service="blog", type="http") == 3
    assert metric("octopus_farp_schema_updates_total", service="shop") == 1
    assert metric("octopus_farp_schema_updates_total", service="blog") == 1

    write_json(manifest_dir, "blog.json", manifest_for(beta, "blog", document=V1))  # new schema
    gateway.wait_route("/blog/orders", present=False)
    assert metric("octopus_farp_schema_updates_total", service="blog") == 2
    assert metric("octopus_farp_routes_total", service="blog", type="http") == 2

    bad = manifest_for(beta, "blog", document=V2)
    bad["checksum"] = "0" * 64
    write_json(manifest_dir, "blog.json", bad)
    eventually(lambda: metric("octopus_farp_manifests_rejected_total", reason="checksum") == 1)
    assert metric("octopus_farp_schema_updates_total", service="blog") == 2

    (manifest_dir / "shop.json").unlink()
    eventually(lambda: metric("octopus_farp_services_total") == 1)
    assert metric("octopus_farp_routes_total", service="shop", type="http") is None
