"""Manifest validation (FARP.md §1-2): lenient on shape, strict on meaning.

Manifests are written out by hand here, their hashes computed with hashlib over
hand-written canonical JSON, so a test never trusts the publisher under test.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from gateway.farp.manifest import ManifestError, parse_manifest

OPENAPI_DOC = {"openapi": "3.1.0", "paths": {"/users": {"get": {}}}}
OPENAPI_CANONICAL = b'{"openapi":"3.1.0","paths":{"/users":{"get":{}}}}'
OPENAPI_HASH = hashlib.sha256(OPENAPI_CANONICAL).hexdigest()
ASYNCAPI_HASH = hashlib.sha256(b'{"asyncapi":"3.0.0"}').hexdigest()


def _checksum(*hashes_in_type_order: str) -> str:
    return hashlib.sha256("".join(hashes_in_type_order).encode()).hexdigest()


def manifest(**changes: Any) -> dict[str, Any]:
    """A valid manifest with one inline OpenAPI schema; ``changes`` replace top-level keys
    (a value of ``...`` deletes the key)."""
    document: dict[str, Any] = {
        "version": "1.0.0",
        "service_name": "users",
        "service_version": "v1.2.3",
        "instance_id": "users-1",
        "instance": {"address": "10.0.0.7:8080", "status": "healthy"},
        "schemas": [
            {
                "type": "openapi",
                "spec_version": "3.1.0",
                "location": {"type": "inline"},
                "content_type": "application/json",
                "inline_schema": copy.deepcopy(OPENAPI_DOC),
                "hash": OPENAPI_HASH,
                "size": len(OPENAPI_CANONICAL),
            }
        ],
        "capabilities": ["rest"],
        "endpoints": {"health": "/health"},
        "updated_at": 1717171717,
        "checksum": _checksum(OPENAPI_HASH),
    }
    for key, value in changes.items():
        if value is ...:
            document.pop(key, None)
        else:
            document[key] = value
    return document


def rejected(document: Any, **options: Any) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(document, **options)
    return caught.value


def test_a_complete_manifest_is_accepted_with_its_fields() -> None:
    parsed = parse_manifest(manifest())
    assert parsed.service_name == "users"
    assert parsed.instance_id == "users-1"
    assert parsed.service_version == "v1.2.3"
    assert parsed.instance is not None and parsed.instance.address == "10.0.0.7:8080"
    assert [s.type for s in parsed.schemas] == ["openapi"]
    assert parsed.schemas[0].inline_schema == OPENAPI_DOC
    assert parsed.health_path == "/health"
    assert parsed.checksum == _checksum(OPENAPI_HASH)


@pytest.mark.parametrize(
    ("missing", "field"),
    [
        ("version", "version"),
        ("service_name", "service_name"),
        ("instance_id", "instance_id"),
        ("endpoints", "endpoints"),
        ("schemas", "schemas"),
        ("updated_at", "updated_at"),
        ("checksum", "checksum"),
    ],
)
def test_a_missing_required_field_is_rejected_naming_it(missing: str, field: str) -> None:
    error = rejected(manifest(**{missing: ...}))
    assert error.field == field
    assert field in str(error)


def test_endpoints_without_health_is_rejected_naming_endpoints_health() -> None:
    error = rejected(manifest(endpoints={"metrics": "/metrics"}))
    assert error.field == "endpoints.health"


@pytest.mark.parametrize("blank", ["", "   ", None, 7])
def test_a_blank_or_non_string_service_name_is_rejected(blank: Any) -> None:
    assert rejected(manifest(service_name=blank)).field == "service_name"


def test_an_empty_schema_list_with_an_empty_checksum_is_accepted() -> None:
    parsed = parse_manifest(manifest(schemas=[], checksum=""))
    assert parsed.schemas == ()
    assert parsed.checksum == ""


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0", "1.9.42", "1.0"])
def test_every_1_x_version_is_accepted(version: str) -> None:
    assert parse_manifest(manifest(version=version)).version == version


@pytest.mark.parametrize("version", ["2.0.0", "0.9.0", "10.0.0", "latest", ""])
def test_a_version_other_than_1_x_is_rejected_clearly(version: str) -> None:
    error = rejected(manifest(version=version))
    assert error.field == "version"
    if version.startswith(("2", "10")):
        assert "only 1.x" in str(error)


def test_a_wrong_checksum_is_rejected_naming_checksum() -> None:
    wrong = _checksum(ASYNCAPI_HASH)
    error = rejected(manifest(checksum=wrong))
    assert error.field == "checksum"
    assert "checksum" in str(error)
    assert "users/users-1" in str(error)  # says which manifest


def test_a_checksum_over_schemas_out_of_type_order_is_rejected() -> None:
    asyncapi = {
        "type": "asyncapi",
        "location": {"type": "http", "url": "http://10.0.0.7:8080/asyncapi.json"},
        "hash": ASYNCAPI_HASH,
    }
    document = manifest()
    document["schemas"].append(asyncapi)
    document["checksum"] = _checksum(OPENAPI_HASH, ASYNCAPI_HASH)  # openapi first: wrong
    assert rejected(document).field == "checksum"
    document["checksum"] = _checksum(ASYNCAPI_HASH, OPENAPI_HASH)  # asyncapi < openapi
    assert len(parse_manifest(document).schemas) == 2


@pytest.mark.parametrize("checksum", ["abc", "A" * 64, "g" * 64, _checksum(OPENAPI_HASH) + "0"])
def test_a_malformed_checksum_is_rejected(checksum: str) -> None:
    assert rejected(manifest(checksum=checksum)).field == "checksum"


@pytest.mark.parametrize(
    "digest", ["", "abc123", OPENAPI_HASH[:-1], OPENAPI_HASH.upper(), "z" * 64, None]
)
def test_a_malformed_schema_hash_is_rejected(digest: Any) -> None:
    document = manifest()
    document["schemas"][0]["hash"] = digest
    assert rejected(document).field == "schemas[0].hash"


@pytest.mark.parametrize(
    ("location", "field"),
    [
        ({"type": "ftp", "url": "ftp://x/y"}, "schemas[0].location.type"),
        ({}, "schemas[0].location.type"),
        ({"type": "http"}, "schemas[0].location.url"),
        ({"type": "http", "url": ""}, "schemas[0].location.url"),
        ({"type": "registry"}, "schemas[0].location.registry_path"),
        (
            {"type": "http", "url": "http://x/s.json", "headers": ["x"]},
            "schemas[0].location.headers",
        ),
        (None, "schemas[0].location"),
        ("inline", "schemas[0].location"),
    ],
)
def test_a_bad_schema_location_is_rejected_naming_it(location: Any, field: str) -> None:
    document = manifest()
    document["schemas"][0]["location"] = location
    assert rejected(document).field == field


def test_an_inline_location_needs_the_descriptors_own_inline_schema() -> None:
    document = manifest()
    document["schemas"][0]["location"] = {"type": "inline", "inline_schema": OPENAPI_DOC}
    del document["schemas"][0]["inline_schema"]
    assert rejected(document).field == "schemas[0].inline_schema"


def test_http_and_registry_locations_are_accepted_with_their_details() -> None:
    document = manifest()
    document["schemas"][0]["location"] = {
        "type": "http",
        "url": "http://10.0.0.7:8080/openapi.json",
        "headers": {"Authorization": "Bearer t"},
    }
    parsed = parse_manifest(document).schemas[0]
    assert (parsed.location_type, parsed.url) == ("http", "http://10.0.0.7:8080/openapi.json")
    assert parsed.headers == {"Authorization": "Bearer t"}
    document["schemas"][0]["location"] = {"type": "registry", "registry_path": "/schemas/u"}
    assert parse_manifest(document).schemas[0].registry_path == "/schemas/u"


def test_an_unknown_schema_type_is_rejected() -> None:
    document = manifest()
    document["schemas"][0]["type"] = "soap"
    assert rejected(document).field == "schemas[0].type"


def test_auth_with_null_schemes_as_the_go_publisher_writes_it_is_accepted() -> None:
    parsed = parse_manifest(manifest(auth={"schemes": None}))
    assert parsed.auth == {"schemes": None}


def test_unknown_fields_and_extensions_are_accepted_and_kept() -> None:
    document = manifest(
        **{"x-team": {"owner": "identity"}, "x-cost-center": 42, "future_field": [1, 2]}
    )
    document["routing"] = {"strategy": "service", "x-canary": True, "sticky": "cookie"}
    document["schemas"][0]["x-generated-by"] = "forge"
    parsed = parse_manifest(document)
    assert parsed.raw["x-team"] == {"owner": "identity"}
    assert parsed.raw["future_field"] == [1, 2]
    assert parsed.routing.strategy == "service"


def test_webhook_and_hints_are_parsed_leniently() -> None:
    parsed = parse_manifest(
        manifest(webhook={"gateway_webhook": 5, "anything": None}, hints="free text")
    )
    assert parsed.raw["hints"] == "free text"


@pytest.mark.parametrize(
    ("written", "parsed"),
    [
        ("[rest websocket]", ("rest", "websocket")),
        ("rest,grpc", ("rest", "grpc")),
        ("[]", ()),
        (["rest", "sse"], ("rest", "sse")),
        (None, ()),
    ],
)
def test_capabilities_are_read_from_lists_and_discovery_metadata_strings(
    written: Any, parsed: tuple[str, ...]
) -> None:
    assert parse_manifest(manifest(capabilities=written)).capabilities == parsed


@pytest.mark.parametrize(("weight", "expected"), [(0, 100), (None, 100), (1, 1), (80, 80)])
def test_instance_weight_zero_or_missing_means_100(weight: Any, expected: int) -> None:
    instance: dict[str, Any] = {"address": "10.0.0.7:8080"}
    if weight is not None:
        instance["weight"] = weight
    parsed = parse_manifest(manifest(instance=instance))
    assert parsed.instance is not None and parsed.instance.weight == expected


@pytest.mark.parametrize("weight", [-1, 101, "50", 50.5, True])
def test_an_instance_weight_outside_0_to_100_is_rejected(weight: Any) -> None:
    error = rejected(manifest(instance={"address": "10.0.0.7:8080", "weight": weight}))
    assert error.field == "instance.weight"


def test_an_instance_object_needs_a_host_port_address() -> None:
    assert rejected(manifest(instance={"address": "10.0.0.7"})).field == "instance.address"
    assert rejected(manifest(instance={"address": ""})).field == "instance.address"
    assert rejected(manifest(instance={"status": "healthy"})).field == "instance.address"


def test_a_discovery_address_fills_a_missing_instance_address() -> None:
    parsed = parse_manifest(manifest(instance={"status": "healthy"}), address="10.0.0.9:80")
    assert parsed.instance is not None and parsed.instance.address == "10.0.0.9:80"
    parsed = parse_manifest(manifest(instance=...), address="10.0.0.9:80")
    assert parsed.instance is not None and parsed.instance.address == "10.0.0.9:80"


@pytest.mark.parametrize(
    ("status", "serving"),
    [
        ("healthy", True),
        ("degraded", True),
        (None, True),
        ("HEALTHY", True),
        ("draining", False),
        ("stopping", False),
        ("unhealthy", False),
        ("starting", False),
    ],
)
def test_only_healthy_degraded_or_unspecified_instances_serve(
    status: str | None, serving: bool
) -> None:
    instance: dict[str, Any] = {"address": "10.0.0.7:8080"}
    if status is not None:
        instance["status"] = status
    assert parse_manifest(manifest(instance=instance)).serving is serving


def test_null_optional_objects_are_taken_as_absent() -> None:
    parsed = parse_manifest(
        manifest(
            service_version=None,
            instance=None,
            capabilities=None,
            routing=None,
            route_table=None,
            auth=None,
            webhook=None,
            hints=None,
        )
    )
    assert parsed.instance is None
    assert parsed.capabilities == ()
    assert parsed.route_table == ()
    assert parsed.auth is None
    assert parsed.routing.strategy == "instance"
    assert parsed.routing.priority == 50
    assert parsed.routing.strip_prefix is True


def test_null_location_headers_and_sizes_are_taken_as_absent() -> None:
    document = manifest()
    document["schemas"][0].update({"size": None, "spec_version": None, "compatibility": None})
    document["schemas"][0]["location"]["headers"] = None
    parsed = parse_manifest(document).schemas[0]
    assert parsed.headers == {}
    assert parsed.size is None


@pytest.mark.parametrize(
    ("routing", "field"),
    [
        ({"strategy": "mesh"}, "routing.strategy"),
        ({"strategy": "custom"}, "routing.base_path"),
        ({"strategy": "custom", "base_path": 7}, "routing.base_path"),
        ({"strategy": "subdomain"}, "routing.subdomain"),
        ({"priority": 101}, "routing.priority"),
        ({"priority": "high"}, "routing.priority"),
        ({"rewrite": [{"pattern": "(unclosed", "replacement": "/"}]}, "routing.rewrite[0].pattern"),
        ({"rewrite": ["^/a"]}, "routing.rewrite[0]"),
        ({"tags": 5}, "routing.tags"),
    ],
)
def test_bad_routing_hints_are_rejected_naming_them(routing: dict[str, Any], field: str) -> None:
    assert rejected(manifest(routing=routing)).field == field


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"path": "/x"}, "route_table"),
        ([{"methods": ["GET"]}], "route_table[0].path"),
        ([{"path": "x"}], "route_table[0].path"),
    ],
)
def test_a_bad_route_table_is_rejected(table: Any, field: str) -> None:
    assert rejected(manifest(route_table=table)).field == field


def test_a_manifest_must_be_an_object() -> None:
    assert rejected(["not", "an", "object"]).field == "$"
