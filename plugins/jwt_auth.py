"""``jwt-auth``: bearer JWTs checked at the gateway (RFC 7519, RFC 6750 challenges).

The verification key comes from exactly one of ``secret`` (HMAC), ``public_key`` (a PEM
string or a file holding one) or ``jwks_url``. Which algorithms a token may use is
decided by the configuration and the key, never by the token: an RSA key only ever
verifies ``RS*``/``PS*``, an EC key only the ``ES*`` of its curve, an Ed25519 key only
``EdDSA``, a secret only ``HS*``, and ``none`` is never accepted. That closes the classic
algorithm-confusion attacks (an RS256 public key used as an HS256 secret).

JWKS keys are fetched with httpx when the plugin starts (in the background: a slow
identity provider must not hold up the gateway), refreshed in the background once
``jwks_cache_ttl`` has passed, and refetched at once when a token names an unknown
``kid`` (key rotation), at most once per ``jwks_refresh_interval``: garbage ``kid``
values must not turn the gateway into a traffic amplifier against the identity
provider. Concurrent requests share one fetch.

What the plugin tells others: the claims in ``ctx.state["claims"]`` (``rate-limit``'s
``claim:NAME`` keys read them), and
``ctx.state["auth"] = {"plugin", "consumer" (the ``sub``), "scopes", "claims"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import PrivateAttr, field_validator, model_validator

from plugins._auth import AuthConfig, AuthPlugin, check_header_name, quoted, safe_header_value
from plugins.api import PluginMetadata, RequestContext, Response
from settings.fields import Duration

log = logging.getLogger("octopus.plugins.jwt_auth")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
OKP_ALGORITHMS = ("EdDSA",)
ASYMMETRIC_ALGORITHMS = (*RSA_ALGORITHMS, *EC_ALGORITHMS.values(), *OKP_ALGORITHMS)
SUPPORTED_ALGORITHMS = (*HMAC_ALGORITHMS, *ASYMMETRIC_ALGORITHMS)
#: RFC 7518 §3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
#: JWK ``crv`` → the ``ES*`` algorithm that curve signs.
_JWK_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_RSA_MIN_BITS = 2048
#: Largest JWKS document accepted (a real one is a few KiB).
_MAX_JWKS_BYTES = 1024 * 1024


class JwtAuthConfig(AuthConfig):
    """``jwt-auth`` options; CONFIG.md pins the spellings."""

    #: HMAC secret (HS256/384/512). At least 32 bytes.
    secret: str | None = None
    #: PEM public key or X.509 certificate, inline or as a file path.
    public_key: str | None = None
    #: JSON Web Key Set URL (http or https).
    jwks_url: str | None = None
    #: Accepted ``alg`` values; default: every one the key source can verify.
    algorithms: list[str] | None = None
    #: Accepted ``aud`` (one of them must be in the token); unchecked when unset.
    audience: str | list[str] | None = None
    #: Accepted ``iss``; unchecked when unset.
    issuer: str | list[str] | None = None
    #: Clock skew allowed on ``exp``/``nbf``/``iat``.
    leeway: Duration = 0.0
    #: Claims a token must carry. ``exp`` by default: a token that never expires is
    #: a credential that cannot be revoked.
    required_claims: list[str] = ["exp"]
    #: Scopes the token must grant (all of them), read from ``scope``/``scp``/``scopes``.
    required_scopes: list[str] = []
    #: ``{claim: header}``: claims sent upstream as request headers. Dotted claim names
    #: reach into objects (``realm_access.roles``).
    forward_claims: dict[str, str] = {}
    #: Remove the ``Authorization`` header before the request goes upstream.
    hide_credentials: bool = False
    #: Least time between two JWKS fetches (unknown ``kid`` refetches included).
    jwks_refresh_interval: Duration = 30.0
    #: Age after which the JWKS is refreshed in the background.
    jwks_cache_ttl: Duration = 600.0
    #: Time limit of one JWKS fetch.
    jwks_timeout: Duration = 5.0

    _key: Any = PrivateAttr(default=None)

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one algorithm")
        for alg in value:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted: unsigned tokens prove nothing")
            if alg not in SUPPORTED_ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}; supported: {SUPPORTED_ALGORITHMS}")
        return value

    @field_validator("forward_claims")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for claim, header in value.items():
            if not claim:
                raise ValueError("claim names must not be empty")
            check_header_name(header)
        if len({h.lower() for h in value.values()}) != len(value):
            raise ValueError("two claims are forwarded under the same header")
        return value

    @field_validator("required_scopes")
    @classmethod
    def _scope_tokens(cls, value: list[str]) -> list[str]:
        for scope in value:
            if not scope or any(c.isspace() for c in scope):
                raise ValueError(f"{scope!r} is not a scope (no spaces, not empty)")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtAuthConfig:
        given = [k for k in ("secret", "public_key", "jwks_url") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "exactly one of secret, public_key, jwks_url is required"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.secret is not None:
            self._check_secret(self.secret)
        elif self.public_key is not None:
            self._key = load_public_key(self.public_key)
            usable = algorithms_for_key(self._key)
            if self.algorithms is not None and not set(self.algorithms) & set(usable):
                raise ValueError(
                    f"public_key is a {key_kind(self._key)} key; it verifies {list(usable)}, "
                    f"none of algorithms {self.algorithms}"
                )
        elif self.algorithms is not None and set(self.algorithms) <= set(HMAC_ALGORITHMS):
            raise ValueError("a JWKS carries public keys: algorithms must include RS/PS/ES/EdDSA")
        return self

    def _check_secret(self, secret: str) -> None:
        if self.algorithms is not None and not set(self.algorithms) & set(HMAC_ALGORITHMS):
            raise ValueError("a secret verifies HS256/HS384/HS512 only; algorithms names none")
        size = len(secret.encode())
        if size < _HMAC_MIN_BYTES["HS256"]:
            # Never echo the secret itself.
            raise ValueError(f"secret must be at least 32 bytes (RFC 7518 §3.2); got {size}")


def load_public_key(value: str) -> Any:
    """A public key object from a PEM string or the path of a PEM file."""
    text = value.strip()
    if not text.startswith("-----BEGIN"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError("public_key is neither a PEM block nor the path of a file")
        text = path.read_text().strip()
    data = text.encode()
    if "PRIVATE KEY-----" in text:
        raise ValueError("public_key holds a private key; give the public key only")
    try:
        if text.startswith("-----BEGIN CERTIFICATE-----"):
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"public_key is not a readable PEM public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"public_key type {type(key).__name__} is not supported")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _RSA_MIN_BITS:
        raise ValueError(f"RSA keys need at least {_RSA_MIN_BITS} bits (RFC 7518 §3.3)")
    return key


def key_kind(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return "Ed25519"


def algorithms_for_key(key: Any) -> tuple[str, ...]:
    """The algorithms a public key can verify (an EC key: only its curve's)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        return (alg,) if alg else ()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return OKP_ALGORITHMS
    return ()


@dataclass(frozen=True)
class VerificationKey:
    """A key and the algorithms it may verify (configuration ∩ what the key is)."""

    key: Any
    algorithms: frozenset[str]
    kid: str | None = None


class KeysUnavailable(Exception):
    """No JWKS has ever been fetched: tokens cannot be checked either way."""


class JwksKeys:
    """The signing keys of a JWKS URL, cached, refreshed, refetched on rotation."""

    def __init__(
        self,
        url: str,
        algorithms: Iterable[str],
        *,
        refresh_interval: float,
        ttl: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        #: Injected so tests can step time across the refresh interval.
        self.clock = clock
        self.algorithms = frozenset(algorithms)
        self.refresh_interval = refresh_interval
        self.ttl = ttl
        self.timeout = timeout
        self.by_kid: dict[str, VerificationKey] = {}
        self.unnamed: list[VerificationKey] = []
        self.fetched_at: float | None = None
        self.attempted_at = float("-inf")
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._refresh_soon()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def candidates(self, kid: str | None) -> list[VerificationKey]:
        """Keys that may have signed a token with this ``kid`` (all of them without one).

        Raises :class:`KeysUnavailable` while no JWKS could be fetched yet.
        """
        if self.fetched_at is not None and self.clock() - self.fetched_at >= self.ttl:
            self._refresh_soon()
        found = self._find(kid)
        if found:
            return found
        task = self._task if self._task is not None and not self._task.done() else None
        if task is None and self._may_fetch():
            task = self._refresh_soon()
        if task is not None:
            # Shielded: a client that hangs up must not cancel the fetch others wait on.
            await asyncio.shield(task)
            found = self._find(kid)
        if not found and self.fetched_at is None:
            raise KeysUnavailable
        return found

    def _find(self, kid: str | None) -> list[VerificationKey]:
        if kid is None:
            return [*self.by_kid.values(), *self.unnamed]
        key = self.by_kid.get(kid)
        return [key] if key is not None else []

    def _may_fetch(self) -> bool:
        return self.clock() - self.attempted_at >= self.refresh_interval

    def _refresh_soon(self) -> asyncio.Task[None] | None:
        """Start a fetch unless one runs or the rate limit forbids it."""
        if self._task is not None and not self._task.done():
            return self._task
        if not self._may_fetch():
            return None
        self.attempted_at = self.clock()
        self._task = asyncio.get_running_loop().create_task(self._fetch(), name="jwks-fetch")
        return self._task

    async def _fetch(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=True)
        try:
            answer = await self._client.get(self.url, headers={"accept": "application/json"})
            answer.raise_for_status()
            if len(answer.content) > _MAX_JWKS_BYTES:
                raise ValueError(f"JWKS larger than {_MAX_JWKS_BYTES} bytes")
            document = answer.json()
            entries = document.get("keys") if isinstance(document, dict) else None
            if not isinstance(entries, list):
                raise ValueError("JWKS has no 'keys' list")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("JWKS fetch failed", extra={"url": self.url, "reason": str(exc)})
            return
        by_kid: dict[str, VerificationKey] = {}
        unnamed: list[VerificationKey] = []
        for entry in entries:
            key = self._parse(entry)
            if key is None:
                continue
            if key.kid is None:
                unnamed.append(key)
            else:
                by_kid[key.kid] = key
        # A fetched set replaces the old one whole: a key dropped by the provider is
        # revoked here too.
        self.by_kid, self.unnamed = by_kid, unnamed
        self.fetched_at = self.clock()
        log.info("JWKS fetched", extra={"url": self.url, "keys": len(by_kid) + len(unnamed)})

    def _parse(self, entry: Any) -> VerificationKey | None:
        if not isinstance(entry, dict):
            return None
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        if entry.get("use", "sig") != "sig":
            return None
        usable = _jwk_algorithms(entry) & self.algorithms
        if not usable:
            return None
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            log.warning("JWKS key skipped", extra={"kid": kid, "reason": str(exc)})
            return None
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < _RSA_MIN_BITS:
            log.warning("JWKS key skipped", extra={"kid": kid, "reason": "RSA key too short"})
            return None
        return VerificationKey(key, usable, kid)


def _jwk_algorithms(entry: dict[str, Any]) -> frozenset[str]:
    """What a JWK may verify: its ``kty``/``crv`` family, narrowed by its ``alg``."""
    kty = entry.get("kty")
    if kty == "RSA":
        family: tuple[str, ...] = RSA_ALGORITHMS
    elif kty == "EC":
        curve = _JWK_CURVES.get(entry.get("crv", ""))
        family = (curve,) if curve else ()
    elif kty == "OKP" and entry.get("crv") == "Ed25519":
        family = OKP_ALGORITHMS
    else:  # symmetric ("oct") keys have no business in a published key set
        family = ()
    alg = entry.get("alg")
    if alg is not None:
        return frozenset({alg}) & frozenset(family)
    return frozenset(family)


# What each PyJWT failure tells the client (fixed text: stable and non-revealing).
_DESCRIPTIONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience not accepted"),
    (jwt.InvalidIssuerError, "token issuer not accepted"),
    (jwt.InvalidSignatureError, "invalid token signature"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
    (jwt.InvalidIssuedAtError, "invalid iat claim"),
    (jwt.DecodeError, "malformed token"),
)


def describe(error: jwt.PyJWTError) -> str:
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"token lacks required claim {error.claim!r}"
    for kind, text in _DESCRIPTIONS:
        if isinstance(error, kind):
            return text
    return "invalid token"


def token_scopes(claims: dict[str, Any]) -> set[str]:
    """Scopes granted: ``scope`` (space-separated, RFC 8693) and ``scp``/``scopes``."""
    found: set[str] = set()
    for name in ("scope", "scp", "scopes"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


def claim_value(claims: dict[str, Any], name: str) -> Any:
    """A claim by name; a dotted name not present as such reaches into objects."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def header_text(value: Any) -> str:
    """A claim as a header value: plain strings as they are, anything else as JSON."""
    if isinstance(value, str):
        safe = safe_header_value(value)
        if safe is not None:
            return safe
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


class JwtAuthPlugin(AuthPlugin):
    metadata = PluginMetadata(
        name="jwt-auth",
        version="1.0.0",
        description="Bearer JWTs: HMAC, RSA, ECDSA, EdDSA keys or a JWKS URL.",
        kind="auth",
    )
    Config = JwtAuthConfig
    config: JwtAuthConfig

    def configure(self, config: Any) -> None:
        super().configure(config)
        cfg: JwtAuthConfig = config
        self._static: list[VerificationKey] = []
        self.jwks: JwksKeys | None = None
        if cfg.secret is not None:
            algorithms = [a for a in (cfg.algorithms or HMAC_ALGORITHMS) if a in HMAC_ALGORITHMS]
            for alg in algorithms:
                if len(cfg.secret.encode()) < _HMAC_MIN_BYTES[alg]:
                    log.warning("jwt-auth secret is shorter than %s needs (RFC 7518)", alg)
            self._static = [VerificationKey(cfg.secret.encode(), frozenset(algorithms))]
        elif cfg.public_key is not None:
            usable = algorithms_for_key(cfg._key)
            algorithms = [a for a in (cfg.algorithms or usable) if a in usable]
            self._static = [VerificationKey(cfg._key, frozenset(algorithms))]
        else:
            assert cfg.jwks_url is not None
            algorithms = [
                a for a in (cfg.algorithms or ASYMMETRIC_ALGORITHMS) if a in ASYMMETRIC_ALGORITHMS
            ]
            self.jwks = JwksKeys(
                cfg.jwks_url,
                algorithms,
                refresh_interval=cfg.jwks_refresh_interval,
                ttl=cfg.jwks_cache_ttl,
                timeout=cfg.jwks_timeout,
            )
        self.algorithms = frozenset(algorithms)
        audience = cfg.audience
        self._audience = [audience] if isinstance(audience, str) else audience
        issuer = cfg.issuer
        self._issuer = [issuer] if isinstance(issuer, str) else issuer
        self._options: dict[str, Any] = {
            "require": list(cfg.required_claims),
            "verify_aud": self._audience is not None,
        }
        self._required_scopes = list(dict.fromkeys(cfg.required_scopes))

    def owned_headers(self) -> Iterable[str]:
        return self.config.forward_claims.values()

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()

    async def stop(self) -> None:
        if self.jwks is not None:
            await self.jwks.stop()

    def challenge(self, error: str | None = None, description: str = "", scope: str = "") -> str:
        parts = [f'Bearer realm="{quoted(self.config.realm)}"']
        if error:
            parts.append(f'error="{error}"')
        if description:
            parts.append(f'error_description="{quoted(description)}"')
        if scope:
            parts.append(f'scope="{quoted(scope)}"')
        return ", ".join(parts)

    def refuse(self, ctx: RequestContext, description: str) -> Response:
        return self.unauthorized(ctx, description, self.challenge("invalid_token", description))

    async def on_request(self, ctx: RequestContext) -> Response | None:
        self.strip_owned_headers(ctx)
        if self.is_public(ctx):
            return None
        values = ctx.header_values("authorization")
        if not values:
            return self.refuse(ctx, "missing bearer token")
        if len(values) > 1:
            return self.refuse(ctx, "more than one Authorization header")
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return self.refuse(ctx, "expected 'Authorization: Bearer <token>'")

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return self.refuse(ctx, "malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            return self.refuse(ctx, f"token algorithm {quoted(str(alg))!r} not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return self.refuse(ctx, "malformed token")

        if self.jwks is not None:
            try:
                keys = await self.jwks.candidates(kid)
            except KeysUnavailable:
                return Response.error(
                    503,
                    "service_unavailable",
                    "token signing keys are not available yet",
                    ctx.request_id,
                    headers=[(b"retry-after", b"5")],
                )
        else:
            keys = self._static
        keys = [k for k in keys if alg in k.algorithms]
        if not keys:
            return self.refuse(ctx, "no key known for this token")

        claims = self._verify(token, alg, keys)
        if isinstance(claims, str):
            return self.refuse(ctx, claims)

        granted = token_scopes(claims)
        required = self.required_scopes(ctx, self._required_scopes)
        missing = [s for s in required if s not in granted]
        if missing:
            description = "token lacks scope " + " ".join(missing)
            challenge = self.challenge("insufficient_scope", description, " ".join(required))
            return self.forbidden(ctx, description, challenge)

        for claim, header_name in self.config.forward_claims.items():
            value = claim_value(claims, claim)
            if value is not None:
                ctx.set_header(header_name, header_text(value))
        if self.config.hide_credentials:
            ctx.remove_header("authorization")
        subject = claims.get("sub")
        ctx.state["claims"] = claims
        self.record(ctx, subject if isinstance(subject, str) else None, granted, claims=claims)
        return None

    def _verify(self, token: str, alg: str, keys: list[VerificationKey]) -> dict[str, Any] | str:
        """The claims, or why the token is refused. Several keys (a JWKS token without
        ``kid``) are tried in turn; only a bad signature moves on to the next key."""
        failure: jwt.PyJWTError | None = None
        for candidate in keys:
            try:
                claims = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self.config.leeway,
                    options=self._options,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError as exc:
                failure = exc
                continue
            except jwt.PyJWTError as exc:
                return describe(exc)
            if not isinstance(claims, dict):
                return "malformed token"
            return claims
        return describe(failure) if failure is not None else "invalid token"


PLUGIN = JwtAuthPlugin
