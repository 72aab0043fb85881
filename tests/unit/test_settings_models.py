"""Section-level rules of the settings models, checked through load_settings({...})."""

from __future__ import annotations

from typing import Any

import pytest

from settings import (
    ConfigError,
    EtcdDiscovery,
    FileDiscovery,
    KubernetesDiscovery,
    Settings,
    StaticDiscovery,
    load_settings,
)


def load(source: dict[str, Any]) -> Settings:
    return load_settings(source, env={})


def errors_of(source: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(source, env={})
    return info.value.errors


def one_error(source: dict[str, Any]) -> str:
    (error,) = errors_of(source)
    return error


def with_route(**route: Any) -> dict[str, Any]:
    """A config with one upstream ``u`` and one route built from ``route``."""
    base: dict[str, Any] = {"name": "r", "match": {"path": "/"}, "upstream": "u"}
    base.update(route)
    return {"upstreams": {"u": {"endpoints": ["http://a:1"]}}, "routes": [base]}


# --- server --------------------------------------------------------------------


def test_server_defaults() -> None:
    server = Settings().server
    assert (server.host, server.http_port, server.admin_port, server.grpc_port) == (
        "0.0.0.0",
        8080,
        9090,
        None,
    )
    assert server.workers == "auto"
    assert server.graceful_timeout == 30.0
    assert server.max_body_size == 10 * 1024 * 1024
    assert server.trusted_proxies == []


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("AUTO", "auto"), (4, 4)])
def test_workers_is_auto_or_a_positive_int(value: Any, expected: Any) -> None:
    assert load({"server": {"workers": value}}).server.workers == expected


@pytest.mark.parametrize("value", [0, -1, "many", True, 1.5])
def test_bad_workers_values_are_refused(value: Any) -> None:
    assert one_error({"server": {"workers": value}}).startswith(
        "<dict>: server.workers: must be 'auto' or an integer >= 1"
    )


def test_port_zero_is_allowed_for_ephemeral_ports() -> None:
    assert load({"server": {"http_port": 0, "admin_port": 0}}).server.http_port == 0


@pytest.mark.parametrize("port", [-1, 65536])
def test_ports_out_of_range_are_refused(port: int) -> None:
    assert one_error({"server": {"admin_port": port}}).startswith("<dict>: server.admin_port: ")


def test_boolean_is_not_a_port() -> None:
    assert one_error({"server": {"http_port": True}}) == (
        "<dict>: server.http_port: expected a number, got true"
    )


def test_trusted_proxies_accept_ips_and_cidrs() -> None:
    proxies = ["10.0.0.1", "10.0.0.0/8", "192.168.1.7/24", "::1", "fd00::/8"]
    assert load({"server": {"trusted_proxies": proxies}}).server.trusted_proxies == proxies


def test_section_of_the_wrong_shape_says_what_was_expected() -> None:
    assert one_error({"server": [1, 2]}) == "<dict>: server: expected a mapping (got a list)"
    assert one_error({"routes": {"a": 1}}) == "<dict>: routes: expected a list (got a mapping)"


# --- upstreams -------------------------------------------------------------------


def test_endpoint_shorthand_and_default_ports() -> None:
    # model_validate, not load: h2c/h2 endpoints are valid but not supported yet.
    settings = Settings.model_validate(
        {
            "upstreams": {
                "u": {
                    "endpoints": [
                        "http://a",
                        {"url": "https://b/", "weight": 5},
                        "h2c://c",
                        "h2://d",
                        "http://[::1]:8081",
                    ]
                }
            }
        }
    )
    endpoints = settings.upstreams["u"].endpoints
    assert [e.url for e in endpoints] == [
        "http://a",
        "https://b",
        "h2c://c",
        "h2://d",
        "http://[::1]:8081",
    ]
    assert [e.port for e in endpoints] == [80, 443, 80, 443, 8081]
    assert [e.weight for e in endpoints] == [100, 5, 100, 100, 100]
    assert endpoints[4].host == "::1" and endpoints[4].address == "[::1]:8081"
    assert [e.tls for e in endpoints] == [False, True, False, True, False]
    assert [e.http2 for e in endpoints] == [False, False, True, True, False]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://a", "unsupported scheme in 'ftp://a' (use http://, https://, h2c:// or h2://)"),
        ("a:80", "unsupported scheme"),
        ("http://", "missing host in 'http://'"),
        ("http://a:99999", "invalid port in 'http://a:99999' (must be 1-65535)"),
        ("http://a/api", "must not have a path"),
        ("http://a/?x=1", "must not have a query or fragment"),
        ("http://u:p@a", "must not contain credentials"),
    ],
)
def test_bad_endpoint_urls_are_refused(url: str, message: str) -> None:
    error = one_error({"upstreams": {"u": {"endpoints": [url]}}})
    assert error.startswith("<dict>: upstreams.u.endpoints[0].url: ")
    assert message in error


@pytest.mark.parametrize("weight", [-1, 101])
def test_endpoint_weight_is_0_to_100(weight: int) -> None:
    error = one_error({"upstreams": {"u": {"endpoints": [{"url": "http://a", "weight": weight}]}}})
    assert error.startswith("<dict>: upstreams.u.endpoints[0].weight: input should be")


def test_upstream_needs_at_least_one_endpoint() -> None:
    assert errors_of({"upstreams": {"u": {"endpoints": []}, "v": {}}}) == [
        "<dict>: upstreams.u.endpoints: at least one endpoint is required",
        "<dict>: upstreams.v.endpoints: field required",
    ]


@pytest.mark.parametrize("hash_on", ["ip", "header:X-User-Id", "cookie:session"])
def test_hash_on_shapes(hash_on: str) -> None:
    settings = Settings.model_validate({"routing": {"hash_on": hash_on}})
    assert settings.routing.hash_on == hash_on


@pytest.mark.parametrize("hash_on", ["header:", "cookie", "body:x", "header:bad name"])
def test_bad_hash_on_is_refused(hash_on: str) -> None:
    assert one_error({"routing": {"hash_on": hash_on}}) == (
        f"<dict>: routing.hash_on: invalid hash_on {hash_on!r} (use ip, header:NAME or cookie:NAME)"
    )


def test_unknown_load_balancer_is_refused() -> None:
    assert one_error({"routing": {"load_balance": "random"}}) == (
        "<dict>: routing.load_balance: input should be 'round-robin', 'weighted', "
        "'least-conn', 'p2c-ewma' or 'consistent-hash' (got 'random')"
    )


def test_health_check_and_circuit_breaker_defaults() -> None:
    settings = Settings.model_validate(
        {"upstreams": {"u": {"endpoints": ["http://a"], "health_check": {}, "circuit_breaker": {}}}}
    )
    check = settings.upstreams["u"].health_check
    breaker = settings.upstreams["u"].circuit_breaker
    assert check is not None and breaker is not None
    assert (check.type, check.path, check.interval, check.timeout) == ("http", "/health", 10, 2)
    assert (check.healthy_threshold, check.unhealthy_threshold) == (2, 3)
    assert (breaker.failure_threshold, breaker.failure_ratio, breaker.min_requests) == (5, 0.5, 20)
    assert (breaker.window, breaker.timeout, breaker.half_open_requests) == (10, 60, 1)


def test_circuit_breaker_ratio_is_between_0_and_1() -> None:
    error = one_error({"routing": {"circuit_breaker": {"failure_ratio": 1.5}}})
    assert error.startswith("<dict>: routing.circuit_breaker.failure_ratio: input should be")


def test_routing_defaults_must_stay_concrete() -> None:
    assert one_error({"routing": {"timeout": None}}).startswith("<dict>: routing.timeout: ")


def test_upstream_extensions_validate() -> None:
    settings = load(
        {
            "upstreams": {
                "u": {"endpoints": ["http://a"], "max_connections": 8, "idle_timeout": "90s"}
            }
        }
    )
    assert settings.upstream_config("u").max_connections == 8
    assert settings.upstream_config("u").idle_timeout == 90.0
    error = one_error({"upstreams": {"u": {"endpoints": ["http://a"], "max_connections": 0}}})
    assert error.startswith("<dict>: upstreams.u.max_connections: input should be greater")


# --- routes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/", "/users", "/users/", "/users/{id}", "/u/{id}/posts/{post_id}", "/files/{rest:path}"],
)
def test_valid_path_templates(path: str) -> None:
    assert load(with_route(match={"path": path})).routes[0].match.path == path


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("users", "path 'users' must start with '/'"),
        ("/users/{id", "unbalanced braces in path template '/users/{id'"),
        ("/users/id}", "unbalanced braces"),
        ("/users/x{id}", "a parameter must be a whole segment, {name} or {name:path}"),
        ("/users/{}", "invalid parameter name ''"),
        ("/users/{1d}", "invalid parameter name '1d'"),
        ("/files/{rest:path}/x", "'{rest:path}' must be the last segment of"),
        (
            "/users/{id:int}",
            "unknown parameter type 'int' in '{id:int}' (only ':path' is supported)",
        ),
        ("/a/{id}/b/{id}", "parameter 'id' appears twice"),
        ("/a/{{id}}", "a parameter must be a whole segment"),
    ],
)
def test_bad_path_templates_are_refused(path: str, message: str) -> None:
    error = one_error(with_route(match={"path": path}))
    assert error.startswith("<dict>: routes[0].match.path: ")
    assert message in error


def test_methods_are_upper_cased_and_validated() -> None:
    route = load(with_route(match={"path": "/", "methods": ["get", "Post", "GET"]})).routes[0]
    assert route.match.methods == ["GET", "POST"]
    assert one_error(with_route(match={"path": "/", "methods": ["GET", "FETCH"]})) == (
        "<dict>: routes[0].match.methods: unknown HTTP method(s) FETCH "
        "(use GET HEAD POST PUT DELETE PATCH OPTIONS TRACE CONNECT)"
    )
    assert "empty list matches nothing" in one_error(with_route(match={"path": "/", "methods": []}))


@pytest.mark.parametrize(
    ("host", "stored"),
    [
        ("api.example.com", "api.example.com"),
        ("*.Example.com", "*.example.com"),
        ("a:8080", "a:8080"),
    ],
)
def test_host_is_exact_or_wildcard(host: str, stored: str) -> None:
    assert load(with_route(match={"path": "/", "host": host})).routes[0].match.host == stored


@pytest.mark.parametrize("host", ["api.*.com", "*", "bad host", "a..b", "*example.com"])
def test_bad_hosts_are_refused(host: str) -> None:
    assert one_error(with_route(match={"path": "/", "host": host})).startswith(
        f"<dict>: routes[0].match.host: invalid host {host!r}"
    )


def test_header_names_are_lower_cased_and_query_kept() -> None:
    match = (
        load(with_route(match={"path": "/", "headers": {"X-Version": 2}, "query": {"v": "1"}}))
        .routes[0]
        .match
    )
    assert match.headers == {"x-version": "2"}
    assert match.query == {"v": "1"}


def test_rewrite_patterns_must_compile_and_groups_must_exist() -> None:
    ok = load(with_route(rewrite=[{"pattern": "^/api/(.*)$", "replacement": "/$1"}]))
    assert ok.routes[0].rewrite[0].replacement == "/$1"
    assert one_error(with_route(rewrite=[{"pattern": "(unclosed", "replacement": "/"}])) == (
        "<dict>: routes[0].rewrite[0].pattern: invalid regex '(unclosed': "
        "missing ), unterminated subpattern at position 0"
    )
    assert one_error(with_route(rewrite=[{"pattern": "^/(a)$", "replacement": "/$2"}])) == (
        "<dict>: routes[0].rewrite[0].replacement: refers to group(s) $2 "
        "but the pattern has 1 group(s)"
    )


@pytest.mark.parametrize(
    ("strip_prefix", "path", "prefix"),
    [
        (False, "/strip/{rest:path}", None),
        (True, "/strip/{rest:path}", "/strip"),
        (True, "/api/v1", "/api/v1"),
        (True, "/{rest:path}", None),
        ("/api", "/api/{rest:path}", "/api"),
    ],
)
def test_strip_prefix(strip_prefix: bool | str, path: str, prefix: str | None) -> None:
    route = load(with_route(match={"path": path}, strip_prefix=strip_prefix)).routes[0]
    assert route.strip_prefix == strip_prefix
    assert route.prefix_to_strip == prefix


@pytest.mark.parametrize("value", [3, "api", "/api/{x}", None])
def test_bad_strip_prefix_is_one_clear_error(value: Any) -> None:
    assert one_error(with_route(strip_prefix=value)).startswith(
        "<dict>: routes[0].strip_prefix: must be true, false or a literal path prefix"
    )


def test_route_defaults_and_durations() -> None:
    route = load(with_route(timeout="1500ms", retries=1, add_prefix="/v2")).routes[0]
    assert (route.priority, route.strip_prefix, route.rewrite, route.plugins) == (0, False, [], [])
    assert (route.timeout, route.retries, route.add_prefix) == (1.5, 1, "/v2")
    assert one_error(with_route(add_prefix="v2")) == (
        "<dict>: routes[0].add_prefix: must start with '/' (got 'v2')"
    )


def test_route_requires_name_match_and_upstream() -> None:
    assert errors_of({"routes": [{}]}) == [
        "<dict>: routes[0].name: field required",
        "<dict>: routes[0].match: field required",
        "<dict>: routes[0].upstream: field required",
    ]


# --- discovery --------------------------------------------------------------------


def test_single_backend_entries_fill_in_defaults() -> None:
    discovery = Settings.model_validate({"discovery": {"backend": "kubernetes"}}).discovery
    ((name, config),) = discovery.entries()
    assert name == "kubernetes"
    assert config == KubernetesDiscovery()
    assert isinstance(config, KubernetesDiscovery)
    assert config.label_selector == "farp.io/enabled=true" and config.namespace == ""


def test_several_backends() -> None:
    discovery = Settings.model_validate(
        {
            "discovery": {
                "backends": [
                    {"backend": "file", "file": {"path": "/srv/a"}},
                    {"backend": "static"},
                    {"backend": "etcd", "etcd": {"endpoints": ["http://e:2379"]}},
                ]
            }
        }
    ).discovery
    entries = discovery.entries()
    assert [name for name, _ in entries] == ["file", "static", "etcd"]
    assert entries[0][1] == FileDiscovery(path="/srv/a")
    assert entries[1][1] == StaticDiscovery()
    assert isinstance(entries[2][1], EtcdDiscovery) and entries[2][1].prefix == "/farp"


def test_unused_backend_blocks_are_allowed_so_env_can_switch() -> None:
    source = {"discovery": {"backend": "file", "static": {"manifests": [{"service_name": "a"}]}}}
    assert load(source).discovery.entries()[0][0] == "file"
    switched = load_settings(source, env={"OCTOPUS_DISCOVERY__BACKEND": "static"})
    assert switched.discovery.entries()[0][1] == StaticDiscovery(manifests=[{"service_name": "a"}])


def test_null_backend_disables_discovery() -> None:
    assert load({"discovery": {"backend": None}}).discovery.entries() == []


def test_unknown_backend_is_refused() -> None:
    assert one_error({"discovery": {"backend": "zookeeper"}}).startswith(
        "<dict>: discovery.backend: input should be 'file', 'static', 'etcd'"
    )


def test_backend_entry_with_another_backends_block_is_refused() -> None:
    assert one_error({"discovery": {"backends": [{"backend": "file", "static": {}}]}}) == (
        "<dict>: discovery.backends[0].static: does not match backend 'file' of this entry"
    )


def test_backend_and_backends_together_are_refused() -> None:
    assert one_error({"discovery": {"backend": "file", "backends": [{"backend": "file"}]}}) == (
        "<dict>: discovery.backend: set either backend or backends, not both"
    )


def test_unknown_key_in_a_backend_block_is_refused() -> None:
    assert one_error({"discovery": {"backend": "file", "file": {"dir": "/x"}}}) == (
        "<dict>: discovery.file.dir: unknown key"
    )


# --- farp, admin, observability --------------------------------------------------


def test_farp_defaults() -> None:
    farp = Settings().farp
    assert (farp.enabled, farp.watch_interval, farp.schema_cache_ttl) == (True, 5.0, 300.0)
    assert (farp.registration_token, farp.heartbeat_timeout, farp.trust_auth_hints) == (
        None,
        30.0,
        False,
    )


def test_admin_listen_address() -> None:
    settings = load({"server": {"host": "127.0.0.1", "admin_port": 9191}})
    assert settings.admin.listen_address(settings.server) == ("127.0.0.1", 9191)
    for address, expected in [
        ("0.0.0.0:9090", ("0.0.0.0", 9090)),
        ("[::1]:9000", ("::1", 9000)),
        (":9001", ("0.0.0.0", 9001)),
    ]:
        settings = load({"admin": {"address": address}})
        assert settings.admin.listen_address(settings.server) == expected


@pytest.mark.parametrize("address", ["localhost", "host:http", "::1:9000", "h:70000"])
def test_bad_admin_address_is_refused(address: str) -> None:
    assert one_error({"admin": {"address": address}}).startswith(
        f"<dict>: admin.address: invalid address {address!r}"
    )


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_admin_password_hash_must_be_bcrypt(prefix: str) -> None:
    hashed = f"{prefix}10$" + "c" * 53
    auth = load({"admin": {"auth": {"username": "a", "password_hash": hashed}}}).admin.auth
    assert auth is not None and auth.type == "basic"
    assert one_error(
        {"admin": {"auth": {"type": "digest", "username": "a", "password_hash": hashed}}}
    )


def test_admin_auth_requires_username_and_hash() -> None:
    assert errors_of({"admin": {"auth": {"type": "basic"}}}) == [
        "<dict>: admin.auth.username: field required",
        "<dict>: admin.auth.password_hash: field required",
    ]


@pytest.mark.parametrize(
    ("level", "stored"), [("INFO", "info"), ("Warning", "warning"), ("warn", "warning")]
)
def test_log_level_accepts_any_case(level: str, stored: str) -> None:
    assert (
        load({"observability": {"logging": {"level": level}}}).observability.logging.level == stored
    )


def test_observability_defaults_and_checks() -> None:
    observability = Settings().observability
    assert (observability.metrics.enabled, observability.metrics.path) == (True, "/metrics")
    tracing = observability.tracing
    assert (tracing.enabled, tracing.exporter, tracing.endpoint) == (False, "otlp", None)
    assert (tracing.sample_ratio, tracing.service_name) == (1.0, "octopus")
    assert observability.logging.access_log is True
    assert one_error({"observability": {"metrics": {"path": "metrics"}}}) == (
        "<dict>: observability.metrics.path: must start with '/' (got 'metrics')"
    )
    assert one_error({"observability": {"tracing": {"sample_ratio": -0.1}}}).startswith(
        "<dict>: observability.tracing.sample_ratio: input should be greater than or equal to 0"
    )
    assert one_error({"observability": {"tracing": {"exporter": "jaeger"}}}).startswith(
        "<dict>: observability.tracing.exporter: input should be 'otlp'"
    )
