"""Canonical JSON and the FARP hashes (FARP.md §4), byte for byte.

Expected values are written out by hand and hashed with hashlib here, never produced by
the code under test; when a Go toolchain is present the same vectors are also checked
against Go's ``encoding/json``, the reference publisher's encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gateway.farp.canonical import canonical_json, manifest_checksum, schema_hash, schema_size

# (id, value, canonical JSON text written out by hand)
VECTORS: list[tuple[str, Any, str]] = [
    (
        "nested objects sort their keys at every level",
        {"b": 1, "a": {"d": [3, {"z": 0, "y": 1}], "c": None}, "A": True},
        '{"A":true,"a":{"c":null,"d":[3,{"y":1,"z":0}]},"b":1}',
    ),
    (
        "non-ASCII text is kept as UTF-8, not escaped",
        {"name": "café", "city": "東京", "lang": "日本語"},
        '{"city":"東京","lang":"日本語","name":"café"}',
    ),
    (
        "keys sort in UTF-8 byte order (not UTF-16: U+FF5E before U+1F600)",
        {"日本": 3, "é": 1, "z": 2, "Z": 0, "\U0001f600": 4, "\uff5e": 5},
        '{"Z":0,"z":2,"é":1,"日本":3,"\uff5e":5,"\U0001f600":4}',
    ),
    (
        "<, > and & are escaped as Go does",
        {"html": '<a href="/x?a=1&b=2">go</a>'},
        '{"html":"\\u003ca href=\\"/x?a=1\\u0026b=2\\"\\u003ego\\u003c/a\\u003e"}',
    ),
    (
        "U+2028 and U+2029 are escaped",
        ["line\u2028sep", "para\u2029sep"],
        '["line\\u2028sep","para\\u2029sep"]',
    ),
    (
        "integral floats are integers, exponents only below 1e-6 and from 1e21",
        [1.0, 1.5, 1e-7, 1e21, 0, -3, 100.0, 1e20, 0.000001, 2.5e-8, 1.5e300, -0.25],
        "[1,1.5,1e-7,1e+21,0,-3,100,100000000000000000000,0.000001,2.5e-8,1.5e+300,-0.25]",
    ),
    (
        "a large integral float keeps its shortest digits",
        [123456789012345680000.0, 9007199254740993.0],
        "[123456789012345680000,9007199254740992]",
    ),
    (
        "empty containers and strings",
        {"object": {}, "list": [], "string": "", "nested": [{}, []]},
        '{"list":[],"nested":[{},[]],"object":{},"string":""}',
    ),
    (
        "quotes, backslashes and control characters",
        'tab\there\nnew "quoted" back\\slash \x01 \x1f',
        '"tab\\there\\nnew \\"quoted\\" back\\\\slash \\u0001 \\u001f"',
    ),
    ("literals", [True, False, None], "[true,false,null]"),
    ("an empty object", {}, "{}"),
]


@pytest.mark.parametrize(
    ("value", "expected"), [(v, e) for _, v, e in VECTORS], ids=[i for i, _, _ in VECTORS]
)
def test_canonical_json_matches_the_hand_written_encoding(value: Any, expected: str) -> None:
    assert canonical_json(value) == expected.encode("utf-8")


@pytest.mark.parametrize(
    ("value", "expected"), [(v, e) for _, v, e in VECTORS], ids=[i for i, _, _ in VECTORS]
)
def test_schema_hash_is_sha256_of_the_canonical_bytes(value: Any, expected: str) -> None:
    assert schema_hash(value) == hashlib.sha256(expected.encode("utf-8")).hexdigest()


def test_schema_size_counts_utf8_bytes_not_characters() -> None:
    document = {"name": "café", "note": "<&>"}
    expected = '{"name":"café","note":"\\u003c\\u0026\\u003e"}'.encode()
    assert schema_size(document) == len(expected) == 44


def test_numbers_parsed_from_json_text_encode_like_go() -> None:
    parsed = json.loads("[1.0, 1.50, 1E-7, 1e21, 10, -0.0, 5e-324]")
    assert canonical_json(parsed) == b"[1,1.5,1e-7,1e+21,10,-0,5e-324]"


def test_nan_and_infinity_are_refused() -> None:
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError):
            canonical_json({"x": value})


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_manifest_checksum_orders_hashes_by_type_in_byte_order() -> None:
    openapi, asyncapi = _digest("openapi document"), _digest("asyncapi document")
    expected = hashlib.sha256((asyncapi + openapi).encode()).hexdigest()
    written = [{"type": "openapi", "hash": openapi}, {"type": "asyncapi", "hash": asyncapi}]
    assert manifest_checksum(written) == expected
    assert manifest_checksum(list(reversed(written))) == expected


def test_manifest_checksum_over_every_schema_type() -> None:
    kinds = ["orpc", "openapi", "grpc", "graphql", "avro", "asyncapi", "custom", "thrift"]
    schemas = [{"type": kind, "hash": _digest(kind)} for kind in kinds]
    in_byte_order = ["asyncapi", "avro", "custom", "graphql", "grpc", "openapi", "orpc", "thrift"]
    joined = "".join(_digest(kind) for kind in in_byte_order)
    assert manifest_checksum(schemas) == hashlib.sha256(joined.encode()).hexdigest()


def test_manifest_checksum_is_empty_without_schemas() -> None:
    assert manifest_checksum([]) == ""


def test_manifest_checksum_of_one_schema_hashes_its_hash_text() -> None:
    digest = _digest("only")
    assert manifest_checksum([{"type": "openapi", "hash": digest}]) == _digest(digest)


# --- against Go's encoding/json --------------------------------------------------------

GO_PROGRAM = """\
package main

import (
\t"bufio"
\t"encoding/json"
\t"os"
)

// One JSON value per input line; prints json.Marshal of it (sorted keys, HTML escaped).
func main() {
\tin := bufio.NewScanner(os.Stdin)
\tin.Buffer(make([]byte, 1<<20), 1<<26)
\tout := bufio.NewWriter(os.Stdout)
\tdefer out.Flush()
\tfor in.Scan() {
\t\tvar v interface{}
\t\tif err := json.Unmarshal(in.Bytes(), &v); err != nil {
\t\t\tpanic(err)
\t\t}
\t\tb, err := json.Marshal(v)
\t\tif err != nil {
\t\t\tpanic(err)
\t\t}
\t\tout.Write(b)
\t\tout.WriteByte('\\n')
\t}
}
"""


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOCACHE", str(Path(tempfile.gettempdir()) / "octopus-go-build-cache"))
    env.setdefault("HOME", tempfile.gettempdir())
    env.update({"GOTOOLCHAIN": "local", "GOPROXY": "off"})
    return env


@pytest.fixture(scope="module")
def go_marshal(tmp_path_factory: pytest.TempPathFactory) -> Any:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no Go toolchain: .ci/system-deps.sh installs golang-go")
        pytest.skip("no Go toolchain on this machine")
    workdir = tmp_path_factory.mktemp("gojson")
    (workdir / "main.go").write_text(GO_PROGRAM)
    binary = workdir / "gojson"
    env = _go_env()
    subprocess.run(
        [go, "build", "-o", str(binary), "main.go"], cwd=workdir, env=env, check=True, timeout=300
    )
    version = subprocess.run(
        [go, "env", "GOVERSION"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()

    def marshal(values: list[Any]) -> list[bytes]:
        lines = "".join(json.dumps(v, ensure_ascii=True) + "\n" for v in values)
        done = subprocess.run(
            [str(binary)], input=lines.encode(), capture_output=True, check=True, timeout=60
        )
        return done.stdout.split(b"\n")[:-1]

    marshal.version = version  # type: ignore[attr-defined]
    return marshal


def _go_at_least(version: str, minor: int) -> bool:
    found = re.match(r"go1\.(\d+)", version)
    return bool(found) and int(found.group(1)) >= minor


def _generated_values() -> list[Any]:
    """Floats across every magnitude, both signs, and strings over awkward characters."""
    rng = random.Random(20240601)
    values: list[Any] = []
    for exponent in range(-30, 31):
        for _ in range(4):
            values.append(rng.uniform(1, 10) * 10.0**exponent * rng.choice((1, -1)))
        values.append(10.0**exponent)
        values.append(float(rng.randint(1, 10**6)) * 10.0**exponent)
    alphabet = 'aZ09 <>&"\\/\t\n\r\x01\x1f\x7f\u00e9\u2028\u2029\u65e5\U0001f600\ufeff'
    for _ in range(50):
        values.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))
    values.append({"".join(rng.choice(alphabet) for _ in range(4)): i for i in range(30)})
    return values


def test_canonical_json_equals_go_encoding_json_byte_for_byte(go_marshal: Any) -> None:
    from examples.demo_service.openapi import OPENAPI

    values = [v for _, v, _ in VECTORS] + _generated_values() + [OPENAPI]
    if _go_at_least(go_marshal.version, 22):  # older Go wrote \b and \f as \u0008, \u000c
        values.append("bell\b form\f")
    expected = go_marshal(values)
    assert len(expected) == len(values)
    mismatches = [
        (value, canonical_json(value), go)
        for value, go in zip(values, expected, strict=True)
        if canonical_json(value) != go
    ]
    assert mismatches == [], f"{len(mismatches)} differ from Go, first: {mismatches[:3]}"
