"""The ``kubernetes`` discovery backend against a fake API server.

No Kubernetes API server runs where these tests run, so they use
:class:`tests.discovery.fakes.kubernetes.FakeKubernetes`, an in-test HTTP server that
speaks the wire protocol the backend relies on: paged lists with a resourceVersion,
chunked newline-delimited JSON watch streams the test pushes events into, label-selector
transitions, bookmarks, a compacted history answered with 410 Gone (as an ERROR event or
as an HTTP status), bearer tokens, and TLS with a cluster CA and client certificates.
"""

from __future__ import annotations

import base64
import logging
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.discovery.kubernetes import (
    KubernetesBackend,
    KubernetesConfigError,
    kubeconfig_access,
)
from tests.discovery.fakes.common import Collector, addresses, until
from tests.discovery.fakes.kubernetes import FakeKubernetes

TOKEN = "k8s-token"
FARP = {"farp.io/enabled": "true"}
SERVICES = "/api/v1/namespaces/shop/services"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
RBAC = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "rbac.yaml"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("k8s-tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=Fake Cluster CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    for name, usage, subject in (
        ("server", "serverAuth\nsubjectAltName=IP:127.0.0.1", "/CN=127.0.0.1"),
        ("client", "clientAuth", "/CN=octopus/O=system:masters"),
    ):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
                cwd=folder)  # fmt: skip
        (folder / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\n"
        )
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext",
            cwd=folder,
        )  # fmt: skip
    return folder


@pytest.fixture
def cluster() -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes(token=TOKEN)
    fake.start()
    yield fake
    fake.stop()


def write_kubeconfig(
    folder: Path,
    server: str,
    cluster: dict[str, Any] | None = None,
    user: dict[str, Any] | None = None,
) -> Path:
    """A kubeconfig whose current context points at ``server``, with a decoy context first."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "fake",
        "contexts": [
            {"name": "elsewhere", "context": {"cluster": "other", "user": "nobody"}},
            {"name": "fake", "context": {"cluster": "fake", "user": "octopus"}},
        ],
        "clusters": [
            {"name": "other", "cluster": {"server": "https://203.0.113.1:6443"}},
            {"name": "fake", "cluster": {"server": server, **(cluster or {})}},
        ],
        "users": [
            {"name": "nobody", "user": {"token": "wrong"}},
            {"name": "octopus", "user": user if user is not None else {"token": TOKEN}},
        ],
    }
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump(document))
    return path


def backend_for(fake: FakeKubernetes, folder: Path, **options: Any) -> KubernetesBackend:
    options.setdefault("namespace", "shop")
    return KubernetesBackend(
        kubeconfig=str(write_kubeconfig(folder, fake.url)),
        backoff_initial=0.02,
        backoff_max=0.2,
        **options,
    )


def one_service(fake: FakeKubernetes, *endpoints: tuple[str, bool | None]) -> None:
    fake.put_service("shop", "orders", labels=FARP)
    fake.put_slice("shop", "orders-1", service="orders", endpoints=list(endpoints))


async def test_initial_list_keeps_ready_endpoints_of_labelled_services(
    cluster: FakeKubernetes, tmp_path: Path
) -> None:
    cluster.page_size = 1  # the server answers in pages: the backend must follow `continue`
    cluster.put_service(
        "shop",
        "orders",
        labels=FARP,
        annotations={
            "farp.io/manifest-url": "http://orders/_farp/manifest",
            "farp.openapi.path": "/openapi.json",
            "unrelated": "x",
        },
    )
    ready, not_ready, unknown = ("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None)
    cluster.put_slice("shop", "orders-a", service="orders", endpoints=[ready, not_ready, unknown])
    cluster.put_slice("shop", "orders-b", service="orders", endpoints=[("10.0.0.4", True)])
    cluster.put_service("shop", "billing", labels=FARP, annotations={"farp.io/port-name": "admin"})
    cluster.put_slice(
        "shop",
        "billing-a",
        service="billing",
        endpoints=[("10.0.1.1", True)],
        ports=[("http", 8080), ("admin", 9090)],
    )
    cluster.put_service("shop", "plain")  # not labelled: not FARP's business
    cluster.put_slice("shop", "plain-a", service="plain", endpoints=[("10.0.2.1", True)])
    cluster.put_service("other", "orders", labels=FARP)  # another namespace
    cluster.put_slice("other", "orders-a", service="orders", endpoints=[("10.9.0.1", True)])

    backend = backend_for(cluster, tmp_path)
    async with Collector(backend) as seen:
        snapshot = await seen.wait_for(lambda s: len(s) == 4)

    assert addresses(snapshot, "orders") == {"10.0.0.1:8080", "10.0.0.3:8080", "10.0.0.4:8080"}
    assert addresses(snapshot, "billing") == {"10.0.1.1:9090"}
    orders = next(i for i in snapshot if i.address == "10.0.0.1:8080")
    assert orders.key == "k8s:shop/orders/10.0.0.1:8080"
    assert orders.instance_id == "orders-10-0-0-1"
    assert orders.manifest is None
    assert orders.metadata == {
        "farp.manifest": "http://orders/_farp/manifest",
        "farp.enabled": "true",
        "farp.openapi.path": "/openapi.json",
    }
    assert backend.state == "synced" and backend.last_sync is not None
    requests = cluster.requests()
    assert requests and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in requests)
    service_lists = [r for r in cluster.requests(SERVICES) if "watch" not in r.query]
    assert len(service_lists) == 2  # two labelled services, one per page
    assert service_lists[0].query["labelSelector"] == "farp.io/enabled=true"
    assert "continue" in service_lists[1].query


async def test_watch_delivers_additions_changes_and_removals(
    cluster: FakeKubernetes, tmp_path: Path
) -> None:
    one_service(cluster, ("10.0.0.1", True))
    backend = backend_for(cluster, tmp_path)
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})

        cluster.put_slice(
            "shop", "orders-1", service="orders", endpoints=[("10.0.0.1", True), ("10.0.0.2", True)]
        )
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.0.2:8080"})

        cluster.put_service("shop", "billing", labels=FARP)
        cluster.put_slice("shop", "billing-1", service="billing", endpoints=[("10.0.1.1", True)])
        await seen.wait_for(lambda s: addresses(s, "billing") == {"10.0.1.1:8080"})

        # Readiness lost: the endpoint leaves the snapshot.
        cluster.put_slice(
            "shop",
            "orders-1",
            service="orders",
            endpoints=[("10.0.0.1", True), ("10.0.0.2", False)],
        )
        await seen.wait_for(lambda s: addresses(s, "orders") == {"10.0.0.1:8080"})

        # Label removed: the selector watch reports the Service as DELETED.
        cluster.put_service("shop", "billing")
        await seen.wait_for(lambda s: addresses(s, "billing") == set())

        cluster.delete_slice("shop", "orders-1")
        await seen.wait_for(lambda s: s == [])

    # All of that arrived over watches: one list of each resource, no polling.
    assert len([r for r in cluster.requests(SERVICES) if "watch" not in r.query]) == 1
    assert len([r for r in cluster.requests(SLICES) if "watch" not in r.query]) == 1
    watch = next(r for r in cluster.requests(SERVICES) if "watch" in r.query)
    assert watch.query["allowWatchBookmarks"] == "true"
    assert int(watch.query["resourceVersion"]) > 0


async def test_empty_namespace_means_every_namespace(
    cluster: FakeKubernetes, tmp_path: Path
) -> None:
    one_service(cluster, ("10.0.0.1", True))
    cluster.put_service("other", "orders", labels=FARP)
    cluster.put_slice("other", "orders-1", service="orders", endpoints=[("10.9.0.1", True)])
    backend = backend_for(cluster, tmp_path, namespace="")
    async with Collector(backend) as seen:
        snapshot = await seen.wait_for(lambda s: len(s) == 2)
    assert {i.key for i in snapshot} == {
        "k8s:shop/orders/10.0.0.1:8080",
        "k8s:other/orders/10.9.0.1:8080",
    }
    assert cluster.requests("/api/v1/services")
    assert cluster.requests("/apis/discovery.k8s.io/v1/endpointslices")


async def test_bookmark_moves_the_resume_point(cluster: FakeKubernetes, tmp_path: Path) -> None:
    one_service(cluster, ("10.0.0.1", True))
    backend = backend_for(cluster, tmp_path)
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
        await until(lambda: cluster.open_watches == 2)
        # Changes the namespaced watch does not see move the cluster's resourceVersion.
        cluster.put_service("elsewhere", "noise", labels=FARP)
        cluster.bookmark()
        await until(lambda: cluster.bookmarks_sent == 2)
        marked = cluster.rv
        cluster.end_watches()  # as timeoutSeconds does
        await until(
            lambda: any(
                r.query.get("resourceVersion") == str(marked) for r in cluster.requests(SERVICES)
            )
        )
    assert len([r for r in cluster.requests(SERVICES) if "watch" not in r.query]) == 1
    assert backend.relists == 0


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
async def test_missed_window_relists(
    cluster: FakeKubernetes, tmp_path: Path, as_status: bool
) -> None:
    cluster.gone_as_status = as_status
    one_service(cluster, ("10.0.0.1", True))
    backend = backend_for(cluster, tmp_path)
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
        await until(lambda: cluster.open_watches == 2)
        # A change whose event is lost with the compacted history: only a re-list finds it.
        cluster.expire(
            lambda: cluster.put_slice(
                "shop",
                "orders-1",
                service="orders",
                endpoints=[("10.0.0.1", True), ("10.0.0.2", True)],
            )
        )
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.0.2:8080"})
        assert backend.state == "synced"
    assert backend.relists == 2  # both resources' watches were behind the compaction
    assert len([r for r in cluster.requests(SLICES) if "watch" not in r.query]) == 2


async def test_outage_keeps_the_last_snapshot_and_recovers(
    cluster: FakeKubernetes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="octopus.discovery")
    one_service(cluster, ("10.0.0.1", True))
    backend = backend_for(cluster, tmp_path)
    async with Collector(backend) as seen:
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
        yielded = len(seen.snapshots)

        cluster.stop()
        await until(lambda: backend.failures >= 4)
        assert backend.state == "unavailable"
        assert backend.last_error
        assert len(seen.snapshots) == yielded  # nothing yielded: the last snapshot stands
        down = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(down) == 1  # one line for the outage, not one per retry
        assert backend.outages == 1

        # A change made while the gateway could not see it.
        cluster.put_slice(
            "shop", "orders-1", service="orders", endpoints=[("10.0.0.1", True), ("10.0.0.9", True)]
        )
        cluster.start()  # same port
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080", "10.0.0.9:8080"})
        await until(lambda: backend.state == "synced")
        assert backend.last_error is None
    assert len([r for r in caplog.records if "recovered" in r.getMessage()]) == 1


async def test_rejected_token_is_an_outage_with_a_reason(
    cluster: FakeKubernetes, tmp_path: Path
) -> None:
    one_service(cluster, ("10.0.0.1", True))
    cluster.token = "another-token"
    backend = backend_for(cluster, tmp_path)
    async with Collector(backend) as seen:
        await until(lambda: backend.state == "unavailable")
        assert "401" in str(backend.last_error)
        cluster.token = TOKEN  # credentials fixed: the retries get through
        await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})


async def test_in_cluster_service_account_and_ca(certificates: Path, tmp_path: Path) -> None:
    fake = FakeKubernetes(
        token="sa-token-1",
        ssl_certfile=str(certificates / "server.pem"),
        ssl_keyfile=str(certificates / "server.key"),
    )
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("sa-token-1\n")
    (account / "ca.crt").write_bytes((certificates / "ca.pem").read_bytes())
    (account / "namespace").write_text("shop")
    with fake:
        one_service(fake, ("10.0.0.1", True))
        backend = KubernetesBackend(
            namespace="shop",
            environ={
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(fake.port),
            },
            service_account_dir=account,
            backoff_initial=0.02,
            backoff_max=0.2,
        )
        async with Collector(backend) as seen:
            await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})
            # The kubelet rotates the projected token: the next requests must use the new one.
            (account / "token").write_text("sa-token-2\n")
            fake.token = "sa-token-2"
            fake.end_watches()
            fake.put_slice(
                "shop",
                "orders-1",
                service="orders",
                endpoints=[("10.0.0.1", True), ("10.0.0.2", True)],
            )
            await seen.wait_for(lambda s: len(s) == 2)
        assert fake.requests()[-1].headers["authorization"] == "Bearer sa-token-2"


async def test_kubeconfig_with_client_certificate_and_inline_ca(
    certificates: Path, tmp_path: Path
) -> None:
    fake = FakeKubernetes(
        ssl_certfile=str(certificates / "server.pem"),
        ssl_keyfile=str(certificates / "server.key"),
        ssl_ca_certs=str(certificates / "ca.pem"),
        ssl_cert_reqs=ssl.CERT_REQUIRED,  # mutual TLS: no client certificate, no connection
    )

    def inline(name: str) -> str:
        return base64.b64encode((certificates / name).read_bytes()).decode()

    with fake:
        one_service(fake, ("10.0.0.1", True))
        kubeconfig = write_kubeconfig(
            tmp_path,
            fake.url,
            cluster={"certificate-authority-data": inline("ca.pem")},
            user={
                "client-certificate-data": inline("client.pem"),
                "client-key-data": inline("client.key"),
            },
        )
        backend = KubernetesBackend(namespace="shop", kubeconfig=str(kubeconfig))
        async with Collector(backend) as seen:
            await seen.wait_for(lambda s: addresses(s) == {"10.0.0.1:8080"})


def test_kubeconfig_paths_are_relative_to_the_file(certificates: Path, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes((certificates / "ca.pem").read_bytes())
    (tmp_path / "token").write_text("from-file\n")
    path = write_kubeconfig(
        tmp_path,
        "https://127.0.0.1:6443/",
        cluster={"certificate-authority": "ca.pem"},
        user={"tokenFile": "token"},
    )
    access = kubeconfig_access(path)
    assert access.server == "https://127.0.0.1:6443"
    assert access.authorization() == "Bearer from-file"
    assert access.tls is not None and access.tls.verify_mode == ssl.CERT_REQUIRED

    insecure = kubeconfig_access(
        write_kubeconfig(
            tmp_path, "https://127.0.0.1:6443", cluster={"insecure-skip-tls-verify": True}
        )
    )
    assert insecure.tls is not None and insecure.tls.verify_mode == ssl.CERT_NONE
    assert insecure.authorization() == f"Bearer {TOKEN}"

    basic = kubeconfig_access(
        write_kubeconfig(tmp_path, "http://127.0.0.1:8001", user={"username": "u", "password": "p"})
    )
    assert basic.tls is None and basic.authorization() == "Basic dTpw"


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"exec": {"command": "aws"}}, "not supported"),
        (None, "no cluster"),
    ],
)
def test_kubeconfig_errors_are_explained(
    tmp_path: Path, user: dict[str, Any] | None, message: str
) -> None:
    path = write_kubeconfig(tmp_path, "https://127.0.0.1:6443", user=user)
    if user is None:
        document = yaml.safe_load(path.read_text())
        document["contexts"][1]["context"]["cluster"] = "missing"
        path.write_text(yaml.safe_dump(document))
    with pytest.raises(KubernetesConfigError, match=message):
        kubeconfig_access(path)


async def test_missing_configuration_is_reported_not_raised(tmp_path: Path) -> None:
    backend = KubernetesBackend(
        kubeconfig=str(tmp_path / "absent"), backoff_initial=0.02, backoff_max=0.2
    )
    async with Collector(backend) as seen:
        await until(lambda: backend.failures >= 2)
        assert backend.state == "unavailable"
        assert "absent" in str(backend.last_error)
        assert seen.snapshots == []

    in_cluster = KubernetesBackend(environ={}, backoff_initial=0.02, backoff_max=0.2)
    async with Collector(in_cluster):
        await until(lambda: in_cluster.state == "unavailable")
        assert "KUBERNETES_SERVICE_HOST" in str(in_cluster.last_error)


def test_rbac_manifest_grants_what_the_backend_uses() -> None:
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(RBAC.read_text())}
    account = documents["ServiceAccount"]["metadata"]
    rules = {
        (group, resource): set(rule["verbs"])
        for rule in documents["ClusterRole"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules[("", "services")] >= {"get", "list", "watch"}
    assert rules[("discovery.k8s.io", "endpointslices")] >= {"get", "list", "watch"}
    binding = documents["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == documents["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
