"""Canonical JSON and the FARP hashes, byte for byte as other implementations compute them.

Canonical JSON (FARP.md §4): keys sorted, no whitespace, UTF-8 with non-ASCII kept,
and ``<``, ``>``, ``&``, U+2028, U+2029 escaped as ``\\u003c`` and so on, which is what
Go's ``encoding/json`` writes. Numbers follow Go too: an integral float is written as
an integer (``1.0`` → ``1``) and exponents appear only below 1e-6 or from 1e21 up.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_TRANSLATE = str.maketrans(_ESCAPES)


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 bytes of a JSON-compatible value."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts).encode("utf-8")


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for index, key in enumerate(sorted(value, key=str)):
            if index:
                out.append(",")
            out.append(_string(str(key)))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"value of type {type(value).__name__} is not JSON")


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).translate(_TRANSLATE)


def _number(number: float) -> str:
    if math.isnan(number) or math.isinf(number):
        raise ValueError("NaN and infinity are not JSON")
    magnitude = abs(number)
    if magnitude == 0 or 1e-6 <= magnitude < 1e21:
        # The shortest round-trip digits, written out in full: 1.0 -> 1, -0.0 -> -0 and
        # 1.2345678901234568e20 -> 123456789012345680000 (not the float's exact integer).
        text = format(Decimal(repr(number)), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    # Go's exponent form: at least two digits after "e+" (1e+21), none padded after
    # "e-" (1e-7, not 1e-07).
    mantissa, _, exponent = repr(number).partition("e")
    sign = "-" if exponent.startswith("-") else "+"
    digits = exponent.lstrip("+-").lstrip("0") or "0"
    return f"{mantissa}e{sign}{digits if sign == '-' else digits.zfill(2)}"


def schema_hash(document: Any) -> str:
    """SHA-256 (lower-case hex) of the schema document's canonical JSON."""
    return hashlib.sha256(canonical_json(document)).hexdigest()


def schema_size(document: Any) -> int:
    """Byte length of the schema document's canonical JSON."""
    return len(canonical_json(document))


def manifest_checksum(schemas: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 of the schema hashes concatenated in ascending byte order of their type."""
    ordered = sorted(schemas, key=lambda s: str(s.get("type", "")).encode("utf-8"))
    if not ordered:
        return ""
    joined = "".join(str(s.get("hash", "")) for s in ordered)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()
