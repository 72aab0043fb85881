"""load_settings: sources, ${VAR} substitution, OCTOPUS_* overrides and located errors."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from settings import (
    DEFAULT_CONFIG_YAML,
    ConfigError,
    Settings,
    load_settings,
    unsupported_features,
)

UPSTREAM = {"users": {"endpoints": ["http://127.0.0.1:9001"]}}
ROUTE = {"name": "users", "match": {"path": "/users/{id}"}, "upstream": "users"}


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """Write a dedented config file and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based number of the first line of ``path`` containing ``needle``."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def errors_of(source: Any, env: dict[str, str] | None = None) -> list[str]:
    """The error lines load_settings reports for ``source`` (it must fail)."""
    with pytest.raises(ConfigError) as info:
        load_settings(source, env={} if env is None else env)
    return info.value.errors


@pytest.fixture
def all_features_supported(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Empty the not-supported-yet table, to test validation of those sections."""
    monkeypatch.setattr("settings.unsupported.UNSUPPORTED", [])
    yield


# --- sources -----------------------------------------------------------------


def test_no_source_loads_the_embedded_default() -> None:
    settings = load_settings(None, env={})
    assert settings.source == "<default>"
    assert (settings.server.host, settings.server.http_port) == ("0.0.0.0", 8080)
    assert settings.server.admin_port == 9090
    assert settings.discovery.entries()[0][0] == "file"
    assert settings.discovery.entries()[0][1].path == "./services"  # type: ignore[attr-defined]
    assert settings.farp.enabled is True
    assert settings.upstreams == {} and settings.routes == []
    assert settings.observability.metrics.enabled is True
    assert settings.observability.logging.level == "info"
    assert settings.observability.logging.format == "json"


def test_default_yaml_text_is_the_shipped_file_and_matches_model_defaults() -> None:
    shipped = Path(__file__).parents[2] / "settings" / "default.yaml"
    assert shipped.read_text(encoding="utf-8") == DEFAULT_CONFIG_YAML
    assert load_settings(None, env={}).model_dump() == Settings().model_dump()


def test_yaml_file_loads_and_remembers_its_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        server: {http_port: 0, graceful_timeout: 2s, max_body_size: 1MiB}
        upstreams:
          users:
            endpoints: [http://127.0.0.1:9001]
        routes:
          - {name: users, match: {path: "/users/{id}"}, upstream: users}
        """,
    )
    settings = load_settings(path, env={})
    assert settings.source == str(path)
    assert settings.server.http_port == 0
    assert settings.server.graceful_timeout == 2.0
    assert settings.server.max_body_size == 1024 * 1024
    assert settings.routes[0].upstream == "users"
    assert load_settings(str(path), env={}).model_dump() == settings.model_dump()


def test_json_file_works_including_tabs_and_exponents(tmp_path: Path) -> None:
    document = {
        "server": {"http_port": 8081, "graceful_timeout": 1e1},
        "upstreams": UPSTREAM,
        "routes": [ROUTE],
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document, indent="\t").replace("10.0", "1e1"), encoding="utf-8")
    settings = load_settings(path, env={})
    assert settings.server.http_port == 8081
    assert settings.server.graceful_timeout == 10.0
    assert settings.upstreams["users"].endpoints[0].url == "http://127.0.0.1:9001"


def test_json_errors_have_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "server": {\n    "htp_port": 1\n  }\n}\n', encoding="utf-8")
    assert errors_of(path) == [
        f"{path}:3: server.htp_port: unknown key (did you mean 'http_port'?)"
    ]


def test_unknown_extension_is_read_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {http_port: 1234}\n", name="octopus.conf")
    assert load_settings(path, env={}).server.http_port == 1234


def test_dict_source_works_and_is_not_mutated() -> None:
    source = {
        "server": {"http_port": "${PORT:-8081}"},
        "upstreams": UPSTREAM,
        "routes": [ROUTE],
    }
    snapshot = json.loads(json.dumps(source))
    settings = load_settings(source, env={"OCTOPUS_SERVER__ADMIN_PORT": "9999"})
    assert settings.source == "<dict>"
    assert settings.server.http_port == 8081
    assert settings.server.admin_port == 9999
    assert source == snapshot


def test_dict_source_errors_say_dict_and_have_no_line() -> None:
    errors = errors_of({"routes": [{"name": "r", "match": {}, "upstream": "x"}]})
    assert errors == ["<dict>: routes[0].match.path: field required"]


def test_settings_source_is_returned_as_is() -> None:
    settings = Settings()
    assert load_settings(settings, env={"OCTOPUS_SERVER__HTTP_PORT": "not even an int"}) is settings


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCTOPUS_SERVER__HTTP_PORT", "8123")
    assert load_settings().server.http_port == 8123


def test_empty_file_means_all_defaults(tmp_path: Path) -> None:
    loaded = load_settings(write(tmp_path, "# nothing here\n"), env={})
    assert loaded.model_dump() == Settings().model_dump()


def test_other_source_types_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="source must be"):
        load_settings(42, env={})  # type: ignore[arg-type]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert errors_of(path) == [f"{path}: cannot read config file: No such file or directory"]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  http_port: 8080\n  host: [unclosed\n")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:4: invalid YAML: ")


def test_unquoted_braces_in_flow_style_get_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "routes:\n  - {name: u, match: {path: /users/{id}}, upstream: u}\n")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:2: invalid YAML: ")
    assert error.endswith('quote values that contain braces, e.g. "/users/{id}"')


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- server\n- routes\n")
    assert errors_of(path) == [
        f"{path}: the top level must be a mapping of sections "
        "(server:, upstreams:, routes:, ...), not a list"
    ]


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  http_port: 1\n  http_port: 2\n")
    assert errors_of(path) == [
        f"{path}:3: server.http_port: duplicate key (first written on line 2)"
    ]


def test_yaml_merge_keys_may_override_merged_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        x-base: &base {endpoints: [http://a:1], retries: 1}
        upstreams:
          users: {<<: *base, retries: 4}
        """,
    )
    upstream = load_settings(path, env={}).upstreams["users"]
    assert (upstream.retries, upstream.endpoints[0].url) == (4, "http://a:1")


# --- errors ------------------------------------------------------------------


def test_unknown_key_names_file_line_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: 127.0.0.1\n  htp_port: 8081\n")
    assert errors_of(path) == [
        f"{path}:3: server.htp_port: unknown key (did you mean 'http_port'?)"
    ]


def test_unknown_top_level_section_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {}\nroutez: []\n")
    assert errors_of(path) == [f"{path}:2: routez: unknown key (did you mean 'routes'?)"]


def test_missing_required_key_points_at_its_parent_block(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstreams:
          users: {endpoints: [http://a:1]}
        routes:
          - name: users
            match:
              methods: [GET]
            upstream: users
        """,
    )
    assert errors_of(path) == [
        f"{path}:{line_of(path, 'match:')}: routes[0].match.path: field required"
    ]


def test_all_errors_are_collected_not_just_the_first(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        server:
          http_port: 70000
          graceful_timeout: 5 parsecs
          max_body_size: 10 zB
          workers: 0
          trusted_proxies: [10.0.0.0/8, not-an-ip]
        observability:
          logging: {level: loud}
        """,
    )
    errors = errors_of(path)
    assert errors == [
        f"{path}:2: server.http_port: input should be less than or equal to 65535 (got 70000)",
        f"{path}:3: server.graceful_timeout: invalid duration '5 parsecs' "
        "(use e.g. 250ms, 5s, 5m, 1h)",
        f"{path}:4: server.max_body_size: invalid size '10 zB' (use e.g. 512KiB, 10MiB, 1GB)",
        f"{path}:5: server.workers: must be 'auto' or an integer >= 1 (got 0)",
        f"{path}:6: server.trusted_proxies: not an IP address or CIDR: 'not-an-ip'",
        f"{path}:8: observability.logging.level: input should be 'debug', 'info', 'warning', "
        "'error' or 'critical' (got 'loud')",
    ]


def test_null_and_booleans_are_shown_as_written_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "routing:\n  timeout: null\nserver:\n  host: yes\n")
    assert errors_of(path) == [
        f"{path}:2: routing.timeout: input should be a valid number (got null)",
        f"{path}:4: server.host: input should be a valid string (got true)",
    ]


def test_config_error_str_is_all_lines_joined(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {htp_port: 1, admin_prt: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert len(info.value.errors) == 2
    assert str(info.value) == "\n".join(info.value.errors)


def test_x_extension_keys_are_ignored_at_any_level(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        x-owner: platform-team
        server: {x-comment: ignored, http_port: 8081}
        upstreams:
          users:
            x-farp-service: users
            endpoints: [{url: "http://a:1", x-zone: eu}]
        routes:
          - name: users
            x-note: hi
            match: {path: /users, x-why: because, headers: {x-api-version: "2"}}
            upstream: users
        """,
    )
    settings = load_settings(path, env={})
    assert settings.server.http_port == 8081
    # Header names are data, not keys of the schema: an x- header is kept.
    assert settings.routes[0].match.headers == {"x-api-version": "2"}
    assert "x-owner" not in settings.model_dump()


def test_plugin_config_and_inline_manifests_are_free_form(all_features_supported: None) -> None:
    settings = load_settings(
        {
            "plugins": [{"name": "jwt-auth", "config": {"anything": {"goes": [1, 2]}}}],
            "discovery": {
                "backend": "static",
                "static": {"manifests": [{"service_name": "users", "x-custom": True}]},
            },
        },
        env={},
    )
    assert settings.plugins[0].config == {"anything": {"goes": [1, 2]}}
    assert settings.discovery.static is not None
    assert settings.discovery.static.manifests == [{"service_name": "users", "x-custom": True}]


def test_duplicate_route_names_are_an_error_naming_both_indexes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstreams: {users: {endpoints: [http://a:1]}}
        routes:
          - {name: users, match: {path: /a}, upstream: users}
          - {name: other, match: {path: /b}, upstream: users}
          - {name: users, match: {path: /c}, upstream: users}
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: routes[2].name: duplicate route name 'users' (routes[0] and routes[2])"
    ]


def test_route_naming_unknown_upstream_is_an_error_naming_the_route(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstreams: {users: {endpoints: [http://a:1]}}
        routes:
          - name: orders
            match: {path: /orders}
            upstream: order
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: routes[0].upstream: route 'orders' names unknown upstream 'order' "
        "(known: users)"
    ]


def test_route_plugins_must_name_top_level_plugins(all_features_supported: None) -> None:
    source = {
        "upstreams": UPSTREAM,
        "plugins": [{"name": "cors"}],
        "routes": [{**ROUTE, "plugins": ["cors", "jwt-auth"]}],
    }
    assert errors_of(source) == [
        "<dict>: routes[0].plugins[1]: route 'users' names unknown plugin 'jwt-auth' "
        "(it must be an entry of the top-level plugins list)"
    ]


def test_middleware_must_name_a_plugin_or_a_builtin(all_features_supported: None) -> None:
    ok = load_settings(
        {
            "plugins": [{"name": "my-audit", "module": "acme.audit"}],
            "middleware": ["my-audit", "jwt-auth", "auth", "rate_limit", "cors", "compression"],
        },
        env={},
    )
    assert ok.middleware[0] == "my-audit"
    (error,) = errors_of({"middleware": ["cors", "gzip"]})
    assert error.startswith("<dict>: middleware[1]: unknown plugin 'gzip' (name a plugins entry")


def test_duplicate_plugin_names_are_an_error(all_features_supported: None) -> None:
    assert errors_of({"plugins": [{"name": "cors"}, {"name": "cors"}]}) == [
        "<dict>: plugins[1].name: duplicate plugin name 'cors' (plugins[0] and plugins[1])"
    ]


def test_tls_enabled_requires_cert_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "tls:\n  enabled: true\n  key: /etc/key.pem\n")
    assert errors_of(path) == [f"{path}:1: tls.cert: required when tls.enabled is true"]


def test_error_messages_never_echo_secret_values() -> None:
    errors = errors_of({"admin": {"auth": {"username": "admin", "password_hash": "hunter2"}}})
    assert errors == [
        "<dict>: admin.auth.password_hash: must be a bcrypt hash "
        "($2a$, $2b$ or $2y$ followed by cost and salt)"
    ]
    assert "hunter2" not in "\n".join(errors)
    errors = errors_of({"farp": {"registration_token": ["s3cret"]}})
    assert "s3cret" not in "\n".join(errors)


# --- ${VAR} substitution ------------------------------------------------------


def test_substitution_uses_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: ${BIND}\n")
    assert load_settings(path, env={"BIND": "127.0.0.2"}).server.host == "127.0.0.2"


def test_substitution_default_applies_when_unset_or_empty(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: ${BIND:-127.0.0.3}\n")
    assert load_settings(path, env={}).server.host == "127.0.0.3"
    assert load_settings(path, env={"BIND": ""}).server.host == "127.0.0.3"
    assert load_settings(path, env={"BIND": "::1"}).server.host == "::1"


def test_unset_variable_without_default_names_variable_and_file_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        server:
          host: ${BIND}
        farp:
          registration_token: ${FARP_TOKEN}
        """,
    )
    assert errors_of(path) == [
        f"{path}:2: server.host: environment variable BIND is not set "
        "(set it, or give a default with ${BIND:-default})",
        f"{path}:4: farp.registration_token: environment variable FARP_TOKEN is not set "
        "(set it, or give a default with ${FARP_TOKEN:-default})",
    ]


def test_double_dollar_escapes_a_literal_reference(tmp_path: Path) -> None:
    path = write(tmp_path, 'farp:\n  registration_token: "$${NOT_A_VAR}-$$x"\n')
    assert load_settings(path, env={}).farp.registration_token == "${NOT_A_VAR}-$$x"


def test_substitution_inside_a_larger_string(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        discovery:
          backend: file
          file: {path: "${BASE:-/srv}/services/${ENV_NAME}"}
        observability:
          tracing: {endpoint: "http://${OTEL_HOST:-localhost}:4317"}
        """,
    )
    settings = load_settings(path, env={"ENV_NAME": "prod"})
    assert settings.discovery.file is not None
    assert settings.discovery.file.path == "/srv/services/prod"
    assert settings.observability.tracing.endpoint == "http://localhost:4317"


def test_defaults_may_nest_references(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: ${BIND:-${FALLBACK:-10.0.0.1}}\n")
    assert load_settings(path, env={}).server.host == "10.0.0.1"
    assert load_settings(path, env={"FALLBACK": "10.0.0.2"}).server.host == "10.0.0.2"


def test_whole_value_substitution_is_retyped_like_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        server:
          http_port: ${PORT:-8080}
          grpc_port: ${GRPC_PORT:-}
        farp:
          trust_auth_hints: ${TRUST:-true}
          registration_token: token-${PORT:-8080}
        """,
    )
    loaded = load_settings(path, env={"PORT": "9001"})
    assert loaded.server.http_port == 9001
    assert loaded.server.grpc_port is None
    assert loaded.farp.trust_auth_hints is True
    assert loaded.farp.registration_token == "token-9001"


def test_quoted_whole_value_substitution_stays_a_string(
    tmp_path: Path, all_features_supported: None
) -> None:
    path = write(
        tmp_path,
        """
        plugins:
          - name: jwt-auth
            config:
              plain: ${N:-12}
              quoted: "${N:-12}"
              flag: ${F:-yes}
              quoted_flag: '${F:-yes}'
        """,
    )
    config = load_settings(path, env={}).plugins[0].config
    assert config == {"plain": 12, "quoted": "12", "flag": True, "quoted_flag": "yes"}


def test_numeric_secret_still_validates_as_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, "farp:\n  registration_token: ${TOKEN}\n")
    assert load_settings(path, env={"TOKEN": "123456"}).farp.registration_token == "123456"


def test_bcrypt_hashes_are_not_mistaken_for_references(tmp_path: Path) -> None:
    hashed = "$2b$12$" + "a" * 53
    path = write(
        tmp_path, f"admin:\n  auth: {{type: basic, username: admin, password_hash: '{hashed}'}}\n"
    )
    auth = load_settings(path, env={}).admin.auth
    assert auth is not None and auth.password_hash == hashed


def test_malformed_reference_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: ${1BAD}\n  workers: ${OPEN\n")
    assert errors_of(path) == [
        f"{path}:2: server.host: invalid variable reference at '${{1BAD}}' "
        "(expected ${NAME} or ${NAME:-default}; write $${ for a literal ${)",
        f"{path}:3: server.workers: unterminated ${{OPEN}} (missing '}}')",
    ]


def test_keys_are_never_substituted(tmp_path: Path) -> None:
    path = write(tmp_path, "upstreams:\n  ${NAME}: {endpoints: [http://a:1]}\n")
    assert list(load_settings(path, env={"NAME": "x"}).upstreams) == ["${NAME}"]


def test_dict_sources_are_substituted_too() -> None:
    settings = load_settings({"server": {"http_port": "${P}", "host": "h-${P}"}}, env={"P": "8088"})
    assert (settings.server.http_port, settings.server.host) == (8088, "h-8088")


# --- OCTOPUS_* environment overrides -----------------------------------------


def test_env_override_int(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  http_port: 8080\n")
    settings = load_settings(path, env={"OCTOPUS_SERVER__HTTP_PORT": "8081"})
    assert settings.server.http_port == 8081


def test_env_override_bool_and_nested_key() -> None:
    settings = load_settings(
        None,
        env={
            "OCTOPUS_FARP__ENABLED": "false",
            "OCTOPUS_OBSERVABILITY__LOGGING__LEVEL": "DEBUG",
            "OCTOPUS_OBSERVABILITY__LOGGING__ACCESS_LOG": "no",
        },
    )
    assert settings.farp.enabled is False
    assert settings.observability.logging.level == "debug"
    assert settings.observability.logging.access_log is False


def test_env_override_list_and_mapping_values() -> None:
    settings = load_settings(
        None,
        env={
            "OCTOPUS_SERVER__TRUSTED_PROXIES": "[10.0.0.0/8, '::1']",
            "OCTOPUS_UPSTREAMS": "{users: {endpoints: ['http://a:1']}}",
        },
    )
    assert settings.server.trusted_proxies == ["10.0.0.0/8", "::1"]
    assert settings.upstreams["users"].endpoints[0].port == 1


def test_env_override_creates_missing_blocks_and_indexes_lists(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        upstreams:
          Users: {endpoints: [http://a:1]}
        routes:
          - {name: users, match: {path: /u}, upstream: Users}
        """,
    )
    settings = load_settings(
        path,
        env={
            "OCTOPUS_ROUTES__0__TIMEOUT": "5s",
            "OCTOPUS_UPSTREAMS__USERS__RETRIES": "4",
            "OCTOPUS_ADMIN__ADDRESS": "127.0.0.1:9999",
        },
    )
    assert settings.routes[0].timeout == 5.0
    assert settings.upstreams["Users"].retries == 4  # matched case-insensitively
    assert settings.admin.listen_address(settings.server) == ("127.0.0.1", 9999)


def test_env_override_keeps_strings_literal() -> None:
    settings = load_settings(None, env={"OCTOPUS_FARP__REGISTRATION_TOKEN": "a#b: c"})
    assert settings.farp.registration_token == "a#b: c"


def test_octopus_config_is_not_an_override() -> None:
    loaded = load_settings(None, env={"OCTOPUS_CONFIG": "/etc/octopus.yaml"})
    assert loaded.model_dump() == load_settings(None, env={}).model_dump()


def test_unknown_env_override_key_is_an_error_naming_the_variable() -> None:
    assert errors_of(None, {"OCTOPUS_SERVER__HTP_PORT": "1"}) == [
        "env OCTOPUS_SERVER__HTP_PORT: server.htp_port: unknown key (did you mean 'http_port'?)"
    ]
    assert errors_of(None, {"OCTOPUS_SERVR__HTTP_PORT": "1"}) == [
        "env OCTOPUS_SERVR__HTTP_PORT: servr: unknown key (did you mean 'server'?)"
    ]


def test_bad_env_override_value_is_an_error_naming_the_variable() -> None:
    assert errors_of(None, {"OCTOPUS_SERVER__HTTP_PORT": "eighty"}) == [
        "env OCTOPUS_SERVER__HTTP_PORT: server.http_port: input should be a valid integer, "
        "unable to parse string as an integer (got 'eighty')"
    ]


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("OCTOPUS_SERVER__HTTP_PORT__X", "cannot set a key below server.http_port"),
        ("OCTOPUS_ROUTES__3__TIMEOUT", "routes is a list of 0 item(s); '3' is not a valid index"),
        ("OCTOPUS_SERVER____HOST", "malformed override name"),
    ],
)
def test_unapplicable_env_overrides_are_errors(variable: str, message: str) -> None:
    (error,) = errors_of(None, {variable: "1"})
    assert error.startswith(f"env {variable}: ")
    assert message in error


def test_unparseable_env_override_value_is_an_error() -> None:
    (error,) = errors_of(None, {"OCTOPUS_SERVER__TRUSTED_PROXIES": "[unclosed"})
    assert error.startswith("env OCTOPUS_SERVER__TRUSTED_PROXIES: not a valid YAML value")


# --- derived views -------------------------------------------------------------


def test_redacted_hides_secrets() -> None:
    hashed = "$2b$12$" + "b" * 53
    settings = Settings.model_validate(
        {
            "tls": {"enabled": True, "cert": "/c.pem", "key": "/k.pem"},
            "farp": {"registration_token": "farp-token"},
            "discovery": {
                "backend": "etcd",
                "etcd": {"password": "etcd-pw", "tls": {"key": "/etcd-key.pem"}},
                "redis": {"url": "redis://:redis-pw@cache:6379/0"},
                "consul": {"token": "consul-token"},
            },
            "plugins": [
                {
                    "name": "jwt-auth",
                    "config": {
                        "secret": "jwt-secret",
                        "private_key": "pk",
                        "algorithms": ["HS256"],
                    },
                },
                {"name": "api-key", "config": {"api_keys": ["k1", "k2"], "header": "X-Key"}},
                {"name": "cache", "config": {"redis_url": "redis://user:cache-pw@r:6379"}},
            ],
            "admin": {"auth": {"username": "admin", "password_hash": hashed}},
        }
    )
    dump = settings.redacted()
    text = json.dumps(dump)
    for secret in ("farp-token", "etcd-pw", "redis-pw", "consul-token", "jwt-secret", "pk",
                   "k1", "cache-pw", hashed, "/k.pem", "/etcd-key.pem"):  # fmt: skip
        assert secret not in text, secret
    assert dump["tls"]["key"] == "***"
    assert dump["tls"]["cert"] == "/c.pem"
    assert dump["discovery"]["redis"]["url"] == "redis://:***@cache:6379/0"
    assert dump["plugins"][1]["config"] == {"api_keys": "***", "header": "X-Key"}
    assert dump["plugins"][2]["config"]["redis_url"] == "redis://user:***@r:6379"
    assert dump["admin"]["auth"] == {"type": "basic", "username": "admin", "password_hash": "***"}
    assert dump["farp"]["heartbeat_timeout"] == 30.0  # non-secrets untouched
    json.dumps(dump)  # JSON-able


def test_redacted_keeps_unset_secrets_as_null() -> None:
    assert Settings().redacted()["farp"]["registration_token"] is None


def test_source_is_not_part_of_dumps() -> None:
    assert "source" not in load_settings(None, env={}).model_dump()


def test_upstream_config_resolves_against_routing_defaults() -> None:
    settings = load_settings(
        {
            "upstreams": {
                "users": {"endpoints": ["http://a:1"], "timeout": "2s", "retries": 0},
                "orders": {"endpoints": ["http://b:2"]},
            },
            "routing": {"connect_timeout": "1s", "max_connections": 64},
        },
        env={},
    )
    users = settings.upstream_config("users")
    assert users.name == "users"
    assert [endpoint.url for endpoint in users.endpoints] == ["http://a:1"]
    assert (users.timeout, users.retries, users.connect_timeout) == (2.0, 0, 1.0)
    orders = settings.upstream_config("orders")
    assert orders.load_balance == "round-robin"
    assert (orders.timeout, orders.read_timeout, orders.retries) == (30.0, 60.0, 2)
    assert (orders.max_connections, orders.idle_timeout) == (64, 60.0)
    assert orders.health_check is None and orders.circuit_breaker is None
    with pytest.raises(KeyError):
        settings.upstream_config("missing")


# --- not supported yet ---------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            {"tls": {"enabled": True, "cert": "c", "key": "k", "client_ca": "ca"}},
            "tls.client_ca: client certificate verification is not supported yet",
        ),
    ],
)
def test_valid_but_unsupported_features_are_refused(source: dict[str, Any], expected: str) -> None:
    assert unsupported_features(Settings.model_validate(source)) == [expected]
    assert errors_of(source) == [f"<dict>: {expected}"]


def test_supported_choices_are_not_reported() -> None:
    settings = load_settings(
        {
            "discovery": {"backends": [{"backend": "file"}, {"backend": "static"}]},
            "upstreams": {
                "u": {"endpoints": ["https://a"], "load_balance": "weighted"},
                "g": {"endpoints": ["h2c://grpc:50051", "h2://secure:443"]},
            },
            "routing": {"load_balance": "round-robin"},
            "observability": {"tracing": {"enabled": True, "exporter": "otlp-http"}},
            "server": {"grpc_port": 50051},
        },
        env={},
    )
    assert unsupported_features(settings) == []


def test_unsupported_feature_errors_name_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        server:
          http_port: 8080
          grpc_port: 50051
        tls:
          enabled: true
          cert: c
          key: k
          client_ca: ca
        """,
    )
    # server.grpc_port (line 3) is supported: only tls.client_ca is reported.
    assert errors_of(path) == [
        f"{path}:8: tls.client_ca: client certificate verification is not supported yet",
    ]


def test_unsupported_features_are_checked_only_after_validation_passes(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  grpc_port: 50051\n  htp_port: 1\n")
    assert errors_of(path) == [
        f"{path}:3: server.htp_port: unknown key (did you mean 'http_port'?)"
    ]
