"""``jwt-auth`` through a real gateway and a real echo upstream; JWKS from a real server.

One gateway serves the module: each plugin entry guards ``/<entry>/...`` (see
``auth_support.auth_gateway``). JWKS tests that change the key set get their own server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.asgi import create_app
from gateway.extensions.chain import PluginChain
from plugins.jwt_auth import JwksKeys, JwtAuthConfig, JwtAuthPlugin
from settings import ConfigError
from tests.plugins.auth_support import (
    JwksServer,
    auth_gateway,
    bearer,
    claims,
    ec_key,
    ed_key,
    rsa_key,
    seen_header_values,
    seen_headers,
    sign,
    websocket_context,
)
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.servers import free_port
from tests.support.upstream import UpstreamServer
from tests.support.waiting import eventually

MODULE = "plugins.jwt_auth"
SECRET = "an-hmac-secret-long-enough-for-hs512-which-wants-64-bytes-of-key"
AUDIENCE = "octopus-tests"
ISSUER = "https://issuer.test"
FORWARDED = {"sub": "X-User", "email": "X-User-Email", "realm_access.roles": "X-Roles"}


def hs_claims(**extra: Any) -> dict[str, Any]:
    return claims(**{"aud": AUDIENCE, "iss": ISSUER, **extra})


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("backend") as server:
        yield server


@pytest.fixture(scope="module")
def ed_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "ed25519.pem"
    path.write_text(ed_key().public_pem)
    return path


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, ed_key_file: Path) -> Iterator[GatewayServer]:
    plugins: dict[str, dict[str, Any]] = {
        "hs": {
            "secret": SECRET,
            "audience": AUDIENCE,
            "issuer": ISSUER,
            "required_claims": ["exp", "sub"],
            "forward_claims": FORWARDED,
            "public_routes": ["/hs/public/**", "/hs/open/*"],
        },
        "leeway": {"secret": SECRET, "leeway": "30s"},
        "scoped": {"secret": SECRET, "required_scopes": ["orders:read", "orders:write"]},
        "hidden": {"secret": SECRET, "hide_credentials": True},
        "rsa": {"public_key": rsa_key().public_pem},
        "es256": {"public_key": ec_key("P-256").public_pem},
        "es384": {"public_key": ec_key("P-384").public_pem},
        "es512": {"public_key": ec_key("P-521").public_pem},
        "ed": {"public_key": str(ed_key_file)},
    }
    server = auth_gateway(upstream.url, plugins, MODULE)
    yield server
    server.stop()


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client


def challenge(response: httpx.Response) -> str:
    return response.headers["www-authenticate"]


# --- algorithms ------------------------------------------------------------------------

ALGORITHMS = {
    "HS256": ("hs", lambda: SECRET),
    "HS384": ("hs", lambda: SECRET),
    "HS512": ("hs", lambda: SECRET),
    "RS256": ("rsa", lambda: rsa_key().private),
    "RS384": ("rsa", lambda: rsa_key().private),
    "RS512": ("rsa", lambda: rsa_key().private),
    "PS256": ("rsa", lambda: rsa_key().private),
    "PS384": ("rsa", lambda: rsa_key().private),
    "PS512": ("rsa", lambda: rsa_key().private),
    "ES256": ("es256", lambda: ec_key("P-256").private),
    "ES384": ("es384", lambda: ec_key("P-384").private),
    "ES512": ("es512", lambda: ec_key("P-521").private),
    "EdDSA": ("ed", lambda: ed_key().private),
}


@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_a_token_signed_with_each_supported_algorithm_is_accepted(
    client: httpx.Client, alg: str
) -> None:
    prefix, key = ALGORITHMS[alg]
    token = sign(alg, key(), hs_claims())
    response = client.get(f"/{prefix}/orders", headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["path"] == f"/{prefix}/orders"


def test_a_public_key_given_as_a_file_path_verifies_tokens(client: httpx.Client) -> None:
    # The "ed" entry's public_key is the path of a PEM file.
    token = sign("EdDSA", ed_key().private, claims())
    assert client.get("/ed/x", headers=bearer(token)).status_code == 200


def test_an_ec_key_verifies_only_the_algorithm_of_its_curve(client: httpx.Client) -> None:
    token = sign("ES384", ec_key("P-384").private, claims())
    response = client.get("/es256/x", headers=bearer(token))
    assert response.status_code == 401
    assert "algorithm" in challenge(response)


# --- refusals --------------------------------------------------------------------------


def test_a_request_without_a_token_is_401_with_a_bearer_challenge(client: httpx.Client) -> None:
    response = client.get("/hs/orders")
    assert response.status_code == 401
    assert challenge(response) == (
        'Bearer realm="octopus", error="invalid_token", error_description="missing bearer token"'
    )
    body = response.json()
    assert set(body) == {"error", "message", "request_id"}
    assert body["error"] == "unauthorized"
    assert body["request_id"] == response.headers["x-request-id"]


def test_a_non_bearer_authorization_is_401(client: httpx.Client) -> None:
    response = client.get("/hs/orders", headers={"Authorization": "Basic YTpi"})
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenge(response)


def test_two_authorization_headers_are_401(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims())
    headers = [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")]
    response = client.get("/hs/orders", headers=headers)
    assert response.status_code == 401


def test_an_expired_token_is_401(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims(exp=int(time.time()) - 60))
    response = client.get("/hs/orders", headers=bearer(token))
    assert response.status_code == 401
    assert 'error_description="token expired"' in challenge(response)


def test_a_token_not_yet_valid_is_401(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims(nbf=int(time.time()) + 300))
    response = client.get("/hs/orders", headers=bearer(token))
    assert response.status_code == 401
    assert 'error_description="token not yet valid"' in challenge(response)


def test_leeway_accepts_a_token_that_expired_within_it(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, claims(exp=int(time.time()) - 10))
    assert client.get("/leeway/x", headers=bearer(token)).status_code == 200


def test_leeway_does_not_accept_a_token_that_expired_before_it(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, claims(exp=int(time.time()) - 120))
    assert client.get("/leeway/x", headers=bearer(token)).status_code == 401


def test_a_token_for_another_audience_is_401(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims(aud="someone-else"))
    response = client.get("/hs/orders", headers=bearer(token))
    assert response.status_code == 401
    assert "audience" in challenge(response)


def test_a_token_from_another_issuer_is_401(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims(iss="https://evil.test"))
    response = client.get("/hs/orders", headers=bearer(token))
    assert response.status_code == 401
    assert "issuer" in challenge(response)


@pytest.mark.parametrize(
    ("alg", "prefix", "key"),
    [
        ("HS256", "hs", lambda: "another-secret-of-sufficient-length-0123456789"),
        ("RS256", "rsa", lambda: rsa_key(1).private),
        ("ES256", "es256", lambda: ec_key("P-256", 1).private),
        ("EdDSA", "ed", lambda: ed_key(1).private),
    ],
)
def test_a_token_signed_with_another_key_is_401(
    client: httpx.Client, alg: str, prefix: str, key: Any
) -> None:
    token = sign(alg, key(), hs_claims())
    response = client.get(f"/{prefix}/orders", headers=bearer(token))
    assert response.status_code == 401
    assert 'error_description="invalid token signature"' in challenge(response)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_an_unsigned_alg_none_token_is_401(client: httpx.Client) -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(hs_claims()).encode())
    response = client.get("/hs/orders", headers=bearer(f"{header}.{payload}."))
    assert response.status_code == 401
    assert "algorithm" in challenge(response)


def test_a_token_with_a_hostile_alg_value_is_401_not_a_failure(client: httpx.Client) -> None:
    # The alg is echoed in the challenge: it must come out as safe header text.
    header = _b64(json.dumps({"alg": 'HS256"\r\n\u2603', "typ": "JWT"}).encode())
    payload = _b64(json.dumps(hs_claims()).encode())
    response = client.get("/hs/orders", headers=bearer(f"{header}.{payload}.c2ln"))
    assert response.status_code == 401
    assert "HS256" in challenge(response)


def test_an_hs256_token_keyed_with_the_rsa_public_key_is_401(client: httpx.Client) -> None:
    # Algorithm confusion: the public key (which attackers have) used as an HMAC secret.
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims()).encode())
    signing_input = f"{header}.{payload}".encode()
    mac = hmac.new(rsa_key().public_pem.encode(), signing_input, hashlib.sha256).digest()
    response = client.get("/rsa/orders", headers=bearer(f"{header}.{payload}.{_b64(mac)}"))
    assert response.status_code == 401


def test_a_garbage_token_is_401(client: httpx.Client) -> None:
    response = client.get("/hs/orders", headers=bearer("not.a.jwt"))
    assert response.status_code == 401
    assert 'error_description="malformed token"' in challenge(response)


def test_a_token_missing_a_required_claim_is_401(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims(sub=None))
    response = client.get("/hs/orders", headers=bearer(token))
    assert response.status_code == 401
    assert "sub" in challenge(response)


def test_exp_is_required_by_default(client: httpx.Client) -> None:
    token = sign("RS256", rsa_key().private, claims(exp=None))
    response = client.get("/rsa/orders", headers=bearer(token))
    assert response.status_code == 401
    assert "exp" in challenge(response)


# --- scopes ----------------------------------------------------------------------------


def test_a_token_missing_a_required_scope_is_403_insufficient_scope(
    client: httpx.Client,
) -> None:
    token = sign("HS256", SECRET, claims(scope="orders:read"))
    response = client.get("/scoped/orders", headers=bearer(token))
    assert response.status_code == 403
    assert challenge(response) == (
        'Bearer realm="octopus", error="insufficient_scope", '
        'error_description="token lacks scope orders:write", scope="orders:read orders:write"'
    )
    assert response.json()["error"] == "forbidden"


@pytest.mark.parametrize(
    "granted",
    [
        {"scope": "profile orders:read orders:write"},
        {"scp": ["orders:read", "orders:write"]},
        {"scopes": ["orders:write", "orders:read", "extra"]},
        {"scope": "orders:read", "scp": ["orders:write"]},
    ],
    ids=["scope-string", "scp-list", "scopes-list", "scope-and-scp"],
)
def test_required_scopes_are_read_from_scope_scp_and_scopes(
    client: httpx.Client, granted: dict[str, Any]
) -> None:
    token = sign("HS256", SECRET, claims(**granted))
    assert client.get("/scoped/orders", headers=bearer(token)).status_code == 200


# --- forwarded claims and header hygiene -----------------------------------------------


def test_configured_claims_are_forwarded_as_headers(client: httpx.Client) -> None:
    body = hs_claims(email="alice@example.test", realm_access={"roles": ["admin", "ops"]})
    response = client.get("/hs/orders", headers=bearer(sign("HS256", SECRET, body)))
    assert response.status_code == 200
    seen = seen_headers(response)
    assert seen["x-user"] == "alice"
    assert seen["x-user-email"] == "alice@example.test"
    assert json.loads(seen["x-roles"]) == ["admin", "ops"]


def test_client_copies_of_forwarded_claim_headers_are_stripped(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims())  # no email, no roles
    spoofed = {"X-User": "mallory", "X-User-Email": "root@evil.test", "X-Roles": '["admin"]'}
    response = client.get("/hs/orders", headers={**bearer(token), **spoofed})
    assert response.status_code == 200
    assert seen_header_values(response, "x-user") == ["alice"]
    assert seen_header_values(response, "x-user-email") == []
    assert seen_header_values(response, "x-roles") == []


def test_client_copies_of_forwarded_claim_headers_are_stripped_on_public_routes(
    client: httpx.Client,
) -> None:
    response = client.get("/hs/public/docs", headers={"X-User": "mallory", "X-Roles": "admin"})
    assert response.status_code == 200
    assert seen_header_values(response, "x-user") == []
    assert seen_header_values(response, "x-roles") == []


def test_a_claim_value_with_a_line_break_is_forwarded_json_encoded(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims(email="a@b.test\r\nX-Admin: yes"))
    response = client.get("/hs/orders", headers=bearer(token))
    assert response.status_code == 200
    seen = seen_headers(response)
    assert json.loads(seen["x-user-email"]) == "a@b.test\r\nX-Admin: yes"
    assert "x-admin" not in seen


def test_the_authorization_header_goes_upstream_by_default(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, hs_claims())
    response = client.get("/hs/orders", headers=bearer(token))
    assert seen_headers(response)["authorization"] == f"Bearer {token}"


def test_hide_credentials_removes_the_authorization_header(client: httpx.Client) -> None:
    token = sign("HS256", SECRET, claims())
    response = client.get("/hidden/orders", headers=bearer(token))
    assert response.status_code == 200
    assert "authorization" not in seen_headers(response)


# --- public routes ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/hs/public", "/hs/public/docs", "/hs/public/a/b", "/hs/open/x"])
def test_public_routes_skip_authentication(client: httpx.Client, path: str) -> None:
    assert client.get(path).status_code == 200


def test_a_single_star_public_glob_does_not_cross_path_segments(client: httpx.Client) -> None:
    assert client.get("/hs/open/x/admin").status_code == 401


# --- configuration ---------------------------------------------------------------------


def _config_with(plugin_config: dict[str, Any]) -> dict[str, Any]:
    return gateway_config(
        {"backend": "http://127.0.0.1:9"},
        [route("r", "/r", "backend", plugins=["jwt-auth"])],
        plugins=[{"name": "jwt-auth", "config": plugin_config}],
    )


@pytest.mark.parametrize(
    "plugin_config",
    [
        {},
        {"secret": SECRET, "public_key": rsa_key().public_pem},
        {"secret": SECRET, "jwks_url": "http://127.0.0.1:9/jwks"},
    ],
    ids=["none", "secret-and-public-key", "secret-and-jwks"],
)
def test_exactly_one_key_source_is_required(plugin_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="exactly one of secret, public_key, jwks_url"):
        create_app(_config_with(plugin_config))


@pytest.mark.parametrize(
    ("plugin_config", "message"),
    [
        ({"secret": "short"}, "at least 32 bytes"),
        ({"secret": SECRET, "algorithms": ["none"]}, "never accepted"),
        ({"secret": SECRET, "algorithms": ["RS256"]}, "HS256/HS384/HS512 only"),
        ({"public_key": ec_key("P-256").public_pem, "algorithms": ["RS256"]}, "EC secp256r1"),
        ({"public_key": "/no/such/key.pem"}, "neither a PEM block nor the path"),
        ({"public_key": rsa_key(bits=1024).public_pem}, "at least 2048 bits"),
        ({"jwks_url": "ftp://keys.test/jwks"}, "http:// or https://"),
        ({"secret": SECRET, "forward_claims": {"sub": "Bad Header"}}, "not a valid header"),
        ({"secret": SECRET, "public_routes": ["no-slash"]}, "must start with '/'"),
    ],
)
def test_bad_configurations_are_refused_naming_the_key(
    plugin_config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        create_app(_config_with(plugin_config))
    assert "jwt-auth" in str(raised.value)


# --- JWKS ------------------------------------------------------------------------------


def jwks_gateway(upstream: UpstreamServer, url: str, **config: Any) -> GatewayServer:
    return auth_gateway(upstream.url, {"jwks": {"jwks_url": url, **config}}, MODULE)


@pytest.fixture(scope="module")
def jwks_keys() -> list[dict[str, Any]]:
    return [
        rsa_key().jwk("rsa-1"),
        ec_key("P-256").jwk("ec-1", "ES256"),
        ed_key().jwk("ed-1"),
    ]


@pytest.fixture(scope="module")
def jwks(jwks_keys: list[dict[str, Any]]) -> Iterator[JwksServer]:
    with JwksServer(jwks_keys) as server:
        yield server


@pytest.fixture(scope="module")
def jwks_client(upstream: UpstreamServer, jwks: JwksServer) -> Iterator[httpx.Client]:
    server = jwks_gateway(upstream, jwks.url)
    with server.client() as client:
        yield client
    server.stop()


@pytest.mark.parametrize(
    ("alg", "kid", "key"),
    [
        ("RS256", "rsa-1", lambda: rsa_key().private),
        ("PS384", "rsa-1", lambda: rsa_key().private),
        ("ES256", "ec-1", lambda: ec_key("P-256").private),
        ("EdDSA", "ed-1", lambda: ed_key().private),
    ],
)
def test_a_token_signed_by_a_jwks_key_is_accepted(
    jwks_client: httpx.Client, alg: str, kid: str, key: Any
) -> None:
    token = sign(alg, key(), claims(), kid=kid)
    assert jwks_client.get("/jwks/x", headers=bearer(token)).status_code == 200


def test_a_jwks_token_without_kid_is_checked_against_every_key(
    jwks_client: httpx.Client,
) -> None:
    token = sign("ES256", ec_key("P-256").private, claims())
    assert jwks_client.get("/jwks/x", headers=bearer(token)).status_code == 200


def test_a_jwks_key_is_used_only_with_its_declared_alg(jwks_client: httpx.Client) -> None:
    # "ec-1" declares alg ES256; an RSA signature under its kid must not be tried.
    token = sign("RS256", rsa_key().private, claims(), kid="ec-1")
    assert jwks_client.get("/jwks/x", headers=bearer(token)).status_code == 401


def test_a_rotated_key_with_a_new_kid_is_accepted_after_a_refetch(
    upstream: UpstreamServer,
) -> None:
    with JwksServer([rsa_key().jwk("old")]) as keys:
        server = jwks_gateway(upstream, keys.url, jwks_refresh_interval="0s")
        try:
            eventually(lambda: keys.app.hits == 1, message="no JWKS fetch at start-up")
            keys.app.keys = [rsa_key().jwk("old"), rsa_key(1).jwk("new")]
            token = sign("RS256", rsa_key(1).private, claims(), kid="new")
            with server.client() as client:
                assert client.get("/jwks/x", headers=bearer(token)).status_code == 200
                assert keys.app.hits == 2
                # Known now: no further fetch.
                assert client.get("/jwks/x", headers=bearer(token)).status_code == 200
            assert keys.app.hits == 2
        finally:
            server.stop()


def test_unknown_kids_do_not_refetch_the_jwks_within_the_refresh_interval(
    upstream: UpstreamServer,
) -> None:
    with JwksServer([rsa_key().jwk("old")]) as keys:
        server = jwks_gateway(upstream, keys.url, jwks_refresh_interval="1h")
        try:
            eventually(lambda: keys.app.hits == 1, message="no JWKS fetch at start-up")
            keys.app.keys = [rsa_key().jwk("old"), rsa_key(1).jwk("new")]
            with server.client() as client:
                for index in range(5):
                    token = sign("RS256", rsa_key(1).private, claims(), kid=f"unknown-{index}")
                    response = client.get("/jwks/x", headers=bearer(token))
                    assert response.status_code == 401
                    assert "no key known" in challenge(response)
            assert keys.app.hits == 1
        finally:
            server.stop()


def test_an_unreachable_jwks_answers_503_not_401(upstream: UpstreamServer) -> None:
    server = jwks_gateway(upstream, f"http://127.0.0.1:{free_port()}/jwks.json")
    try:
        token = sign("RS256", rsa_key().private, claims(), kid="rsa-1")
        with server.client() as client:
            response = client.get("/jwks/x", headers=bearer(token))
        assert response.status_code == 503
        assert response.json()["error"] == "service_unavailable"
    finally:
        server.stop()


class SteppedClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def jwks_keys_for(url: str, clock: SteppedClock, *, ttl: float = 3600.0) -> JwksKeys:
    return JwksKeys(url, ["RS256"], refresh_interval=30.0, ttl=ttl, timeout=5.0, clock=clock)


async def test_unknown_kid_refetches_happen_at_most_once_per_refresh_interval() -> None:
    clock = SteppedClock()
    with JwksServer([rsa_key().jwk("a")]) as server:
        keys = jwks_keys_for(server.url, clock)
        try:
            assert [k.kid for k in await keys.candidates("a")] == ["a"]
            assert server.app.hits == 1
            for _ in range(3):
                assert await keys.candidates("b") == []
            assert server.app.hits == 1  # inside the interval: no refetch
            clock.now += 31
            server.app.keys = [rsa_key().jwk("a"), rsa_key(1).jwk("b")]
            assert [k.kid for k in await keys.candidates("b")] == ["b"]
            assert await keys.candidates("c") == []
            assert server.app.hits == 2  # one refetch for the new interval, not two
        finally:
            await keys.stop()


async def test_concurrent_requests_for_a_new_kid_share_one_jwks_fetch() -> None:
    clock = SteppedClock()
    with JwksServer([rsa_key().jwk("a")]) as server:
        keys = jwks_keys_for(server.url, clock)
        try:
            await keys.candidates("a")
            clock.now += 31
            server.app.keys = [rsa_key().jwk("a"), rsa_key(1).jwk("b")]
            found = await asyncio.gather(*(keys.candidates("b") for _ in range(20)))
            assert all([k.kid for k in keys_found] == ["b"] for keys_found in found)
            assert server.app.hits == 2
        finally:
            await keys.stop()


async def test_a_key_dropped_from_the_jwks_is_revoked_after_the_cache_ttl() -> None:
    clock = SteppedClock()
    with JwksServer([rsa_key().jwk("a"), rsa_key(1).jwk("b")]) as server:
        keys = jwks_keys_for(server.url, clock, ttl=600.0)
        try:
            assert await keys.candidates("a")
            server.app.keys = [rsa_key(1).jwk("b")]
            clock.now += 601
            # The stale set still answers while the background refresh runs ...
            await keys.candidates("b")
            assert keys._task is not None
            await keys._task
            # ... and once it lands, "a" is gone (and no refetch inside the interval).
            assert await keys.candidates("a") == []
            assert server.app.hits == 2
        finally:
            await keys.stop()


# --- WebSocket -------------------------------------------------------------------------


def _ws_chain() -> PluginChain:
    plugin = JwtAuthPlugin()
    plugin.configure(
        JwtAuthConfig.model_validate(
            {"secret": SECRET, "forward_claims": {"sub": "X-User"}, "required_scopes": ["chat"]}
        )
    )
    return PluginChain([plugin])


async def test_a_websocket_upgrade_without_a_token_is_refused_401() -> None:
    answer = await _ws_chain().run_request(websocket_context({}))
    assert answer is not None
    assert answer.status == 401
    assert answer.header("www-authenticate") is not None


async def test_a_websocket_upgrade_without_the_required_scope_is_refused_403() -> None:
    token = sign("HS256", SECRET, claims(scope="other"))
    answer = await _ws_chain().run_request(websocket_context(bearer(token)))
    assert answer is not None
    assert answer.status == 403


async def test_a_websocket_upgrade_with_a_valid_token_continues_with_claims_forwarded() -> None:
    token = sign("HS256", SECRET, claims(scope="chat"))
    ctx = websocket_context({**bearer(token), "X-User": "mallory"})
    assert await _ws_chain().run_request(ctx) is None
    assert ctx.header_values("x-user") == ["alice"]
    assert ctx.state["auth"]["consumer"] == "alice"
    assert ctx.state["claims"]["sub"] == "alice"
