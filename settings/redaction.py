"""Hiding secrets in a configuration dump.

The admin API shows the running configuration (``/_/config``); it must never
show a password, token or private key, wherever in the tree it sits (plugin
``config`` blocks are free-form, so a fixed list of model fields would not do).
Keys are therefore matched by name at any depth, and credentials embedded in
URLs (``redis://:pw@host``) are masked in every string.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "is_secret_key", "redact", "redact_url_credentials"]

MASK = "***"

# Compared after lower-casing and turning '-' into '_'.
_SECRET_KEYS = frozenset(
    {
        "password",
        "password_hash",
        "passwd",
        "secret",
        "client_secret",
        "secret_key",
        "token",
        "access_token",
        "refresh_token",
        "registration_token",
        "api_key",
        "api_keys",
        "private_key",
        "authorization",
        "credentials",
    }
)
_SECRET_SUFFIXES = ("_password", "_secret", "_token", "_api_key", "_private_key")
# ``key`` alone is a secret only inside a TLS block (``tls.key``: the private key).
_TLS_ONLY_KEYS = frozenset({"key"})

# scheme://user:password@  → keep scheme and user, mask the password.
_URL_PASSWORD = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*://[^/@:\s]*:)[^/@\s]*(?=@)")


def _normalise(key: object) -> str:
    return str(key).lower().replace("-", "_")


def is_secret_key(key: object, parent: object = None) -> bool:
    """Whether a value stored under ``key`` (inside ``parent``) must never be shown."""
    name = _normalise(key)
    if name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES):
        return True
    return name in _TLS_ONLY_KEYS and _normalise(parent) == "tls"


def redact_url_credentials(text: str) -> str:
    """Mask the password of any ``scheme://user:password@host`` inside ``text``."""
    return _URL_PASSWORD.sub(lambda m: m.group("prefix") + MASK, text)


def redact(data: Any, parent: object = None) -> Any:
    """Return a copy of JSON-like ``data`` with secret values replaced by ``***``.

    Unset secrets (``None``) stay ``None`` so the dump still tells "not configured"
    apart from "configured".
    """
    if isinstance(data, dict):
        return {
            key: MASK if value is not None and is_secret_key(key, parent) else redact(value, key)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [redact(item, parent) for item in data]
    if isinstance(data, str):
        return redact_url_credentials(data)
    return data
