"""``basic-auth``: HTTP Basic credentials (RFC 7617) checked against bcrypt hashes.

bcrypt is slow on purpose (~250 ms at cost 12), which is right against stolen hashes
and wrong for a gateway that sees the same client every few milliseconds. So:

- a successful check is remembered (bounded LRU, ``cache_ttl``) under a keyed digest
  of the credentials, never the password itself; a failed one is not, so guessing
  still pays bcrypt every time;
- bcrypt runs in a worker thread, at most ``_MAX_PARALLEL_CHECKS`` at once, so a burst
  of wrong passwords slows down only the requests that carry them, not the event loop;
- an unknown user name costs one bcrypt check too, against a configured hash, so the
  answer time does not reveal which user names exist.

Credentials are removed before the request goes upstream (``hide_credentials``) and the
user name is forwarded in ``forward_header`` (``X-Consumer``; a client-supplied copy is
always dropped). ``ctx.state["auth"]`` gets ``{"plugin", "consumer", "scopes"}``.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import os
import re
import time
from base64 import b64decode
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import bcrypt
from pydantic import field_validator

from plugins._auth import AuthConfig, AuthPlugin, check_header_name, quoted
from plugins.api import PluginMetadata, RequestContext, Response
from settings.fields import ConfigModel, Duration, PositiveInt

_BCRYPT = re.compile(r"\$2[aby]\$\d{2}\$[./A-Za-z0-9]{53}")
#: bcrypt checks running at once (each holds a thread and a core for its duration).
_MAX_PARALLEL_CHECKS = 4


class BasicUser(ConfigModel):
    username: str
    #: bcrypt hash (``$2b$12$...``), e.g. from ``htpasswd -nbBC 12 USER PASS``.
    password_hash: str
    #: Scopes the user holds; checked against ``required_scopes``.
    scopes: list[str] = []

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not value or ":" in value or not value.isprintable():
            raise ValueError("must be non-empty, printable and without ':' (RFC 7617)")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("must be latin-1 text (it becomes a header value)") from None
        return value

    @field_validator("password_hash")
    @classmethod
    def _bcrypt(cls, value: str) -> str:
        if not _BCRYPT.fullmatch(value):
            # Never echo the value: it may be a plaintext password pasted by mistake.
            raise ValueError("must be a bcrypt hash ($2a$, $2b$ or $2y$ followed by cost and salt)")
        return value


class BasicAuthConfig(AuthConfig):
    """``basic-auth`` options."""

    users: list[BasicUser]
    #: Scopes a user must hold (all of them).
    required_scopes: list[str] = []
    #: Header the user name is sent upstream in; empty to send nothing.
    forward_header: str | None = "X-Consumer"
    #: Remove the ``Authorization`` header before going upstream.
    hide_credentials: bool = True
    #: How long a verified password is trusted without running bcrypt again.
    cache_ttl: Duration = 300.0
    #: Verified credentials remembered at most (least recently used go first).
    cache_size: PositiveInt = 10_000

    @field_validator("users")
    @classmethod
    def _distinct(cls, value: list[BasicUser]) -> list[BasicUser]:
        if not value:
            raise ValueError("at least one user is required")
        names = [u.username for u in value]
        if len(set(names)) != len(names):
            raise ValueError("a username is listed twice")
        return value

    @field_validator("forward_header")
    @classmethod
    def _forward(cls, value: str | None) -> str | None:
        return check_header_name(value) if value else None


class BasicAuthPlugin(AuthPlugin):
    metadata = PluginMetadata(
        name="basic-auth",
        version="1.0.0",
        description="HTTP Basic credentials checked against bcrypt hashes.",
        kind="auth",
    )
    Config = BasicAuthConfig
    config: BasicAuthConfig

    def configure(self, config: Any) -> None:
        super().configure(config)
        cfg: BasicAuthConfig = config
        self.users = {u.username.encode("latin-1"): u for u in cfg.users}
        self._challenge = f'Basic realm="{quoted(cfg.realm)}", charset="UTF-8"'
        #: Keys the cache digests, so a memory dump does not hold crackable SHA-256s.
        self._cache_key = os.urandom(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._checks: asyncio.Semaphore | None = None
        #: bcrypt runs done (cache hits excluded); tests read it.
        self.bcrypt_checks = 0

    def owned_headers(self) -> Iterable[str]:
        return [self.config.forward_header] if self.config.forward_header else []

    async def on_request(self, ctx: RequestContext) -> Response | None:
        self.strip_owned_headers(ctx)
        if self.is_public(ctx):
            return None
        values = ctx.header_values("authorization")
        if not values:
            return self.unauthorized(ctx, "credentials required", self._challenge)
        if len(values) > 1:
            return self.unauthorized(ctx, "more than one Authorization header", self._challenge)
        scheme, _, encoded = values[0].strip().partition(" ")
        if scheme.lower() != "basic":
            return self.unauthorized(ctx, "expected Basic credentials", self._challenge)
        try:
            decoded = b64decode(encoded.strip().encode("latin-1"), validate=True)
        except (binascii.Error, ValueError):
            return self.unauthorized(ctx, "malformed Basic credentials", self._challenge)
        username, colon, password = decoded.partition(b":")
        if not colon:
            return self.unauthorized(ctx, "malformed Basic credentials", self._challenge)
        user = self.users.get(username)
        if not await self._password_matches(username, password, user):
            return self.unauthorized(ctx, "invalid username or password", self._challenge)
        assert user is not None
        missing = [
            s
            for s in self.required_scopes(ctx, self.config.required_scopes)
            if s not in user.scopes
        ]
        if missing:
            return self.forbidden(ctx, "user lacks scope " + " ".join(missing))
        if self.config.hide_credentials:
            ctx.remove_header("authorization")
        if self.config.forward_header:
            ctx.set_header(self.config.forward_header, user.username)
        self.record(ctx, user.username, user.scopes)
        return None

    async def _password_matches(self, username: bytes, password: bytes, user: Any) -> bool:
        digest = hmac.digest(self._cache_key, username + b"\x00" + password, hashlib.sha256)
        if user is not None:
            verified_at = self._verified.get(digest)
            if verified_at is not None:
                if time.monotonic() - verified_at < self.config.cache_ttl:
                    self._verified.move_to_end(digest)
                    return True
                del self._verified[digest]
        # Unknown users are checked against a real hash too, and the answer discarded,
        # so they take as long as known ones.
        target = user if user is not None else self.config.users[0]
        ok = await self._bcrypt(password, target.password_hash.encode())
        if not (ok and user is not None):
            return False
        self._verified[digest] = time.monotonic()
        while len(self._verified) > self.config.cache_size:
            self._verified.popitem(last=False)
        return True

    async def _bcrypt(self, password: bytes, hashed: bytes) -> bool:
        if self._checks is None:
            self._checks = asyncio.Semaphore(_MAX_PARALLEL_CHECKS)
        async with self._checks:
            self.bcrypt_checks += 1
            try:
                return await asyncio.to_thread(bcrypt.checkpw, password, hashed)
            except ValueError:
                return False


PLUGIN = BasicAuthPlugin
