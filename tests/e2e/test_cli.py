"""``octopus validate`` and ``octopus routes``, and how ``run`` reports a bad config."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.helpers import minimal_config, run_octopus, write_config

UPSTREAM = "http://127.0.0.1:9"  # never contacted: these commands stay offline

BAD_YAML = """\
server:
  host: 127.0.0.1
  htp_port: 8080
discovery: {backend: static}
"""


def test_validate_accepts_a_good_file(tmp_path: Path) -> None:
    path = write_config(minimal_config(UPSTREAM), tmp_path)

    result = run_octopus("validate", "-c", str(path))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"OK: {path}"


def test_validate_names_file_line_and_key_of_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)

    result = run_octopus("validate", "--config", str(path))

    assert result.returncode == 1
    assert f"{path}:3" in result.stderr
    assert "server.htp_port" in result.stderr
    assert "Traceback" not in result.stderr
    assert "OK" not in result.stdout


def test_validate_prints_every_error_not_just_the_first(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML + "routes: [{name: r, match: {path: /a}, upstream: missing}]\n")

    result = run_octopus("validate", "-c", str(path))

    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) >= 2, result.stderr
    assert any("htp_port" in line for line in lines)
    assert any("missing" in line for line in lines)


def test_validate_reports_a_missing_file_clearly(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    result = run_octopus("validate", "-c", str(path))

    assert result.returncode == 1
    assert str(path) in result.stderr
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_reads_octopus_config_from_the_environment(tmp_path: Path) -> None:
    path = write_config(minimal_config(UPSTREAM), tmp_path)

    result = run_octopus("validate", env={"OCTOPUS_CONFIG": str(path)})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"OK: {path}"


def test_routes_prints_each_configured_route_in_aligned_columns(tmp_path: Path) -> None:
    config = minimal_config(UPSTREAM)
    config["routes"].insert(
        0,
        {
            "name": "users",
            "match": {"path": "/users/{id}", "methods": ["GET", "POST"], "host": "api.test"},
            "upstream": "echo",
            "priority": 7,
        },
    )
    path = write_config(config, tmp_path)

    result = run_octopus("routes", "-c", str(path))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "METHODS", "HOST", "PATH", "UPSTREAM", "PRIORITY"]
    users = next(line for line in lines if line.startswith("users "))
    name, source, methods, host, route_path, upstream, priority = users.split()
    assert (name, source, host, route_path, upstream, priority) == (
        "users",
        "static",
        "api.test",
        "/users/{id}",
        "echo",
        "7",
    )
    assert {"GET", "POST"} <= set(methods.split(","))
    catch_all = next(line for line in lines if line.startswith("all "))
    assert catch_all.split()[2:5] == ["*", "*", "/{rest:path}"]
    # Aligned: every column starts at the same offset on every line.
    assert lines[0].index("PATH") == users.index("/users/{id}") == catch_all.index("/{rest:path}")


def test_routes_json_has_the_admin_api_shape(tmp_path: Path) -> None:
    path = write_config(minimal_config(UPSTREAM), tmp_path)

    result = run_octopus("routes", "-c", str(path), "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["conflicts"] == []
    assert document["routes"] == [
        {
            "name": "all",
            "source": "static",
            "methods": [],
            "host": None,
            "path": "/{rest:path}",
            "upstream": "echo",
            "priority": 0,
        }
    ]


def test_routes_with_a_bad_file_fails_with_the_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)

    result = run_octopus("routes", "-c", str(path))

    assert result.returncode == 1
    assert "server.htp_port" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_bad_config_exits_2_with_the_errors_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)

    # No subcommand: ``run`` is the default.
    result = run_octopus("-c", str(path), timeout=30)

    assert result.returncode == 2
    assert f"{path}:3" in result.stderr
    assert "server.htp_port" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_run_with_a_missing_config_exits_2(tmp_path: Path) -> None:
    result = run_octopus("run", "-c", str(tmp_path / "absent.yaml"), timeout=30)

    assert result.returncode == 2
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_rejects_a_bad_workers_value(tmp_path: Path) -> None:
    path = write_config(minimal_config(UPSTREAM), tmp_path)

    result = run_octopus("run", "-c", str(path), "--workers", "zero", timeout=30)

    assert result.returncode == 2  # argparse usage error
    assert "--workers" in result.stderr
    assert "Traceback" not in result.stderr
