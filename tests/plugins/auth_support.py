"""Shared by the auth plugin tests: key material, a real JWKS server, gateway builders,
and the WebSocket request context the chain-level tests run through the plugin chain.

Keys are generated once per test process (RSA generation is the slow part) with
``cryptography``; nothing is a fixture file, so no private key lives in the repo.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.types import Receive, Scope, Send
from plugins.api import RequestContext
from tests.support.gateway import GatewayServer, gateway_config, route
from tests.support.servers import ThreadedServer


@dataclass(frozen=True)
class KeyPair:
    private: Any
    public: Any

    @property
    def public_pem(self) -> str:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def jwk(self, kid: str, alg: str | None = None) -> dict[str, Any]:
        """The public half as a JWK, with ``kid`` (and ``alg`` when given)."""
        if isinstance(self.public, rsa.RSAPublicKey):
            document = jwt.algorithms.RSAAlgorithm.to_jwk(self.public, as_dict=True)
        elif isinstance(self.public, ec.EllipticCurvePublicKey):
            document = jwt.algorithms.ECAlgorithm.to_jwk(self.public, as_dict=True)
        else:
            document = jwt.algorithms.OKPAlgorithm.to_jwk(self.public, as_dict=True)
        document["kid"] = kid
        document["use"] = "sig"
        if alg:
            document["alg"] = alg
        return document


def _pair(private: Any) -> KeyPair:
    return KeyPair(private, private.public_key())


@cache
def rsa_key(index: int = 0, bits: int = 2048) -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=bits))


@cache
def ec_key(curve: str, index: int = 0) -> KeyPair:
    curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
    return _pair(ec.generate_private_key(curves[curve]))


@cache
def ed_key(index: int = 0) -> KeyPair:
    return _pair(ed25519.Ed25519PrivateKey.generate())


def sign(alg: str, key: Any, claims: dict[str, Any], **header: Any) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=header or None)


def claims(**extra: Any) -> dict[str, Any]:
    """A token body valid for five minutes; ``extra`` adds or overrides claims."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 300}
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class JwksApp:
    """Serves ``{"keys": keys}`` at any path and counts the fetches."""

    def __init__(self, keys: list[dict[str, Any]] | None = None) -> None:
        self.keys = list(keys or [])
        self.status = 200
        self._hits = 0
        self._lock = threading.Lock()

    @property
    def hits(self) -> int:
        with self._lock:
            return self._hits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        with self._lock:
            self._hits += 1
        body = json.dumps({"keys": self.keys}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class JwksServer:
    """A :class:`JwksApp` on a real socket; ``url`` is its key set address."""

    def __init__(self, keys: list[dict[str, Any]] | None = None) -> None:
        self.app = JwksApp(keys)
        self.server = ThreadedServer(self.app)
        self.url = f"{self.server.url}/.well-known/jwks.json"

    def __enter__(self) -> JwksServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def auth_gateway(
    upstream_url: str, plugins: dict[str, dict[str, Any]], module: str
) -> GatewayServer:
    """A gateway where each plugin entry ``NAME`` guards the route ``/NAME/{rest:path}``.

    Entries use ``module:`` so one gateway can hold several configurations of one plugin.
    """
    entries = [
        {"name": name, "module": module, "config": config} for name, config in plugins.items()
    ]
    routes = [route(name, f"/{name}/{{rest:path}}", "backend", plugins=[name]) for name in plugins]
    config = gateway_config({"backend": upstream_url}, routes, plugins=entries)
    return GatewayServer(config).start()


def seen_headers(response: Any) -> dict[str, str]:
    """The request headers the echo upstream received (lower-case names; last wins)."""
    return {name: value for name, value in response.json()["headers"]}


def seen_header_values(response: Any, name: str) -> list[str]:
    return [value for key, value in response.json()["headers"] if key == name]


def websocket_context(headers: dict[str, str], path: str = "/ws/chat") -> RequestContext:
    """The context a WebSocket upgrade gives the chain (as ``GatewayApp`` builds it)."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    scope = {"type": "websocket", "path": path, "headers": raw, "query_string": b""}
    return RequestContext(
        scope=scope,
        method="GET",
        path=path,
        query_string=b"",
        request_headers=raw,
        client_ip="127.0.0.1",
        request_id="ws-test",
        route_name="ws",
        route_path="/ws/{rest:path}",
        params={"rest": path.removeprefix("/ws/")},
        upstream="backend",
        websocket=True,
    )
