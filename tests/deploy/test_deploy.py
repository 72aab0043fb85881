"""The deployment files (``deploy/``): the Dockerfile, the plain Kubernetes manifests and
the Helm chart.

No Docker daemon, cluster or ``helm`` binary is available, so these tests check what can
be checked without them: hadolint on the Dockerfile, yamllint on the YAML, the manifests'
internal consistency (selectors, ports, probes, service account), the chart's structure
(``Chart.yaml``, ``values.schema.json`` against ``values.yaml``, every ``.Values`` path a
template uses, balanced template actions and blocks), and ``octopus validate`` on every
gateway configuration shipped here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import bcrypt
import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
MANIFESTS = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "octopus"
TEMPLATES = CHART / "templates"
BIN = Path(sys.executable).parent

#: yamllint's "relaxed" preset with room for the comments these files carry.
YAMLLINT_CONFIG = """
extends: relaxed
rules:
  line-length:
    max: 120
"""


def tool(name: str) -> str:
    """A dev-extra command (hadolint, yamllint, octopus) from this interpreter's venv."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OCTOPUS_")}
    environment.update(env or {})
    return subprocess.run(
        args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=60, check=False
    )


def validate_config(config: str | dict[str, Any], tmp_path: Path, **env: str) -> None:
    """``octopus validate -c FILE`` accepts the configuration."""
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    result = run(tool("octopus"), "validate", "-c", str(path), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK"), result.stdout


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# ---- Dockerfile -----------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_builds_a_slim_non_root_image_running_octopus() -> None:
    instructions = dockerfile_instructions()
    args = {
        value.split("=", 1)[0]: value.split("=", 1)[1] for op, value in instructions if op == "ARG"
    }
    stages = [value for op, value in instructions if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: build, then runtime"
    for stage in stages:
        image = stage.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image), image
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    runtime = instructions[last_from:]
    runtime_ops = dict(runtime)
    user = runtime_ops["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(runtime_ops["ENTRYPOINT"]) == ["octopus"]
    assert json.loads(runtime_ops["CMD"]) == ["run", "--config", "/etc/octopus/config.yaml"]
    assert "/_/health" in runtime_ops["HEALTHCHECK"]
    assert any(op == "COPY" and value.endswith("/etc/octopus/config.yaml") for op, value in runtime)
    assert any(op == "COPY" and value.startswith("--from=build") for op, value in runtime)


def test_dockerfile_copies_only_what_exists_and_the_context_sends() -> None:
    """COPY sources exist in the repo (the build context) and are not ignored."""
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for op, value in dockerfile_instructions():
        if op != "COPY" or value.startswith("--from"):
            continue
        *sources, _dest = value.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") in allowed or source.startswith("./"), source


def test_the_image_config_validates(tmp_path: Path) -> None:
    validate_config((DEPLOY / "docker" / "config.yaml").read_text(), tmp_path)


# ---- YAML lint ------------------------------------------------------------------------


def test_yamllint_passes_on_manifests_and_chart_values(tmp_path: Path) -> None:
    config = tmp_path / "yamllint.yaml"
    config.write_text(YAMLLINT_CONFIG)
    files = [
        *sorted(MANIFESTS.glob("*.yaml")),
        CHART / "Chart.yaml",
        CHART / "values.yaml",
        DEPLOY / "docker" / "config.yaml",
    ]
    result = run(tool("yamllint"), "-c", str(config), "-f", "parsable", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


# ---- plain manifests ------------------------------------------------------------------


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of ``deploy/kubernetes`` by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in load_all(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, key
            objects[key] = doc
    return objects


def test_plain_manifests_hold_every_piece() -> None:
    kinds = {kind for kind, _ in manifests()}
    assert kinds >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    }
    for (kind, name), doc in manifests().items():
        if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace") == "octopus", (kind, name)


def test_plain_deployment_is_consistent_with_its_config_services_and_rbac() -> None:
    objects = manifests()
    deployment = objects[("Deployment", "octopus-gateway")]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    # The service account rbac.yaml grants discovery access to.
    assert ("ServiceAccount", spec["serviceAccountName"]) in objects
    binding = objects[("ClusterRoleBinding", "octopus-gateway-discovery")]
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]

    config_map = objects[("ConfigMap", "octopus-gateway")]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config["server"]["http_port"], "admin": config["server"]["admin_port"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/_/health", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/_/ready", "port": "admin"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/octopus"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "octopus-gateway"
    assert "/etc/octopus/config.yaml" in container["args"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config["server"]["admin_port"])
    assert annotations["prometheus.io/path"] == config["observability"]["metrics"]["path"]
    assert spec["terminationGracePeriodSeconds"] > 30  # server.graceful_timeout

    for (kind, name), doc in objects.items():
        if kind == "Service":
            assert doc["spec"]["selector"].items() <= pod_labels.items(), name
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in ports, name
        if kind == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert config["discovery"]["backend"] == "kubernetes"


def test_the_plain_manifests_config_validates(tmp_path: Path) -> None:
    config_map = manifests()[("ConfigMap", "octopus-gateway")]
    validate_config(config_map["data"]["config.yaml"], tmp_path)


# ---- Helm chart -----------------------------------------------------------------------


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def test_chart_has_its_files_and_metadata() -> None:
    for name in ("Chart.yaml", "values.yaml", "values.schema.json", "README.md", ".helmignore"):
        assert (CHART / name).is_file(), name
    for name in (
        "_helpers.tpl",
        "NOTES.txt",
        "deployment.yaml",
        "service.yaml",
        "configmap.yaml",
        "secret.yaml",
        "serviceaccount.yaml",
        "rbac.yaml",
        "pdb.yaml",
        "hpa.yaml",
        "servicemonitor.yaml",
    ):
        assert (TEMPLATES / name).is_file(), name
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "octopus" == CHART.name
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["description"]
    readme = (CHART / "README.md").read_text()
    assert "No `helm` binary" in readme


def test_values_schema_accepts_the_shipped_values() -> None:
    jsonschema.Draft7Validator.check_schema(schema())
    jsonschema.Draft7Validator(schema()).validate(values())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("replicaCount",), "two"),
        (("service", "type"), "Ingress"),
        (("unknownKey",), True),
        (("adminAuth", "passwordHash"), "plaintext-password"),
        (("redis", "url"), "http://redis:6379"),
        (("config", "admin", "enabled"), False),
        (("config", "discovery", "backend"), "zookeeper"),
        (("config", "server", "admin_port"), 70000),
        (("secrets", "env"), {"not a name": "x"}),
        (("metrics", "serviceMonitor", "interval"), "often"),
    ],
)
def test_values_schema_rejects_bad_values(path: tuple[str, ...], value: Any) -> None:
    bad = values()
    target = bad
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema()).validate(bad)


def template_files() -> list[Path]:
    return sorted(p for p in TEMPLATES.iterdir() if p.is_file())


ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def test_every_values_reference_exists_in_values_yaml() -> None:
    defined = values()
    seen = 0
    for path in template_files():
        for match in VALUES_REF.finditer(path.read_text()):
            node: Any = defined
            for key in match.group(1).strip(".").split("."):
                assert isinstance(node, dict) and key in node, (
                    f"{path.name}: .Values{match.group(1)} is not in values.yaml"
                )
                node = node[key]
            seen += 1
    assert seen > 50


def test_every_included_template_is_defined() -> None:
    text = "\n".join(p.read_text() for p in template_files())
    defined = set(re.findall(r'define\s+"([^"]+)"', text))
    used = set(re.findall(r'(?:include|template)\s+"([^"]+)"', text))
    assert used, "templates use the helpers"
    assert used <= defined, used - defined


def check_template_syntax(text: str) -> None:
    """Actions are closed, none nests, and if/range/with/define blocks end."""
    stack: list[str] = []
    position = 0
    for match in ACTION.finditer(text):
        outside = text[position : match.start()]
        assert "{{" not in outside and "}}" not in outside, outside
        position = match.end()
        body = match.group(1)
        assert "{{" not in body, body
        inner = body.strip("-").strip()
        if inner.startswith("/*"):
            assert inner.endswith("*/"), body
            continue
        words = inner.split()
        assert words, f"empty action {match.group(0)!r}"
        keyword = words[0]
        if keyword in ("if", "range", "with", "define", "block"):
            stack.append(keyword)
        elif keyword == "else":
            assert stack and stack[-1] in ("if", "range", "with"), "else outside a block"
        elif keyword == "end":
            assert stack, "end without a block"
            stack.pop()
        assert inner.count("(") == inner.count(")"), body
        assert inner.count('"') % 2 == 0, body
    tail = text[position:]
    assert "{{" not in tail and "}}" not in tail, tail
    assert stack == [], f"unclosed blocks: {stack}"


@pytest.mark.parametrize("name", [p.name for p in template_files()])
def test_templates_have_balanced_actions_and_blocks(name: str) -> None:
    check_template_syntax((TEMPLATES / name).read_text())


@pytest.mark.parametrize(
    "text",
    [
        "{{ if .Values.a }}x",
        "{{ end }}",
        "{{ .Values.a }",
        "a }} b",
        "{{ if .Values.a }}{{ else }}{{ end }}{{ end }}",
        '{{ include "x . }}',
    ],
)
def test_the_template_checker_catches_mistakes(text: str) -> None:
    with pytest.raises(AssertionError):
        check_template_syntax(text)


def test_templates_declare_the_expected_objects() -> None:
    expected = {
        "deployment.yaml": [("apps/v1", "Deployment")],
        "service.yaml": [("v1", "Service"), ("v1", "Service")],
        "configmap.yaml": [("v1", "ConfigMap")],
        "secret.yaml": [("v1", "Secret")],
        "serviceaccount.yaml": [("v1", "ServiceAccount")],
        "rbac.yaml": [
            ("rbac.authorization.k8s.io/v1", "{{ $kind }}"),
            ("rbac.authorization.k8s.io/v1", "{{ $kind }}Binding"),
        ],
        "pdb.yaml": [("policy/v1", "PodDisruptionBudget")],
        "hpa.yaml": [("autoscaling/v2", "HorizontalPodAutoscaler")],
        "servicemonitor.yaml": [("monitoring.coreos.com/v1", "ServiceMonitor")],
    }
    for name, objects in expected.items():
        text = (TEMPLATES / name).read_text()
        found = re.findall(r"^apiVersion: (\S+)\nkind: (.+)$", text, re.MULTILINE)
        assert found == objects, name
    deployment = (TEMPLATES / "deployment.yaml").read_text()
    assert "path: /_/health" in deployment and "path: /_/ready" in deployment
    assert "prometheus.io/scrape" in deployment
    assert "mountPath: /etc/octopus" in deployment
    # Optional pieces are conditional on their values.
    for name, condition in {
        "hpa.yaml": ".Values.autoscaling.enabled",
        "pdb.yaml": ".Values.podDisruptionBudget.enabled",
        "servicemonitor.yaml": ".Values.metrics.serviceMonitor.enabled",
        "serviceaccount.yaml": ".Values.serviceAccount.create",
        "rbac.yaml": '.Values.rbac.create (include "octopus.kubernetesDiscovery" .)',
    }.items():
        first = next(
            line
            for line in (TEMPLATES / name).read_text().splitlines()
            if line.startswith("{{- if")
        )
        assert condition in first, name


def test_chart_rbac_grants_what_the_plain_rbac_grants() -> None:
    text = (TEMPLATES / "rbac.yaml").read_text()
    rules_text = text.split("rules:\n", 1)[1].split("---", 1)[0]
    chart_rules = yaml.safe_load(rules_text)
    plain = next(doc for doc in load_all(MANIFESTS / "rbac.yaml") if doc["kind"] == "ClusterRole")
    assert chart_rules == plain["rules"]


def test_the_chart_config_validates(tmp_path: Path) -> None:
    """``config`` is rendered verbatim (``toYaml``) into the ConfigMap's config.yaml."""
    configmap = (TEMPLATES / "configmap.yaml").read_text()
    assert "toYaml .Values.config" in configmap
    validate_config(values()["config"], tmp_path)


def test_the_chart_secret_overrides_turn_admin_auth_on(tmp_path: Path) -> None:
    """The Secret's OCTOPUS_ADMIN__AUTH__* keys are real config overrides."""
    secret = (TEMPLATES / "secret.yaml").read_text()
    assert "OCTOPUS_ADMIN__AUTH__USERNAME" in secret
    assert "OCTOPUS_ADMIN__AUTH__PASSWORD_HASH" in secret
    password_hash = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    config = values()["config"]
    validate_config(
        config,
        tmp_path,
        OCTOPUS_ADMIN__AUTH__USERNAME="admin",
        OCTOPUS_ADMIN__AUTH__PASSWORD_HASH=password_hash,
    )
    path = tmp_path / "config.yaml"
    refused = run(
        tool("octopus"),
        "validate",
        "-c",
        str(path),
        env={
            "OCTOPUS_ADMIN__AUTH__USERNAME": "admin",
            "OCTOPUS_ADMIN__AUTH__PASSWORD_HASH": "not-a-hash",
        },
    )
    assert refused.returncode != 0
    assert "password_hash" in refused.stdout + refused.stderr


def test_the_chart_config_with_redis_from_the_secret_validates(tmp_path: Path) -> None:
    """The documented ``${REDIS_URL}`` use: redis discovery fed by ``redis.url``."""
    config = values()["config"]
    config["discovery"] = {"backend": "redis", "redis": {"url": "${REDIS_URL}"}}
    validate_config(config, tmp_path, REDIS_URL="redis://redis-master:6379/0")
