"""Federated OpenAPI/AsyncAPI documents (FARP.md §7) and the ``/_/docs`` page.

The documents are built by pure functions from ``FarpService`` objects, so most tests
build services the way the watcher does (``parse_manifest`` → ``build_services``); the
last ones read the documents and the docs page from a real gateway.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from gateway.asgi import create_app
from gateway.farp.federation import federate_asyncapi, federate_openapi, sanitize_name
from gateway.farp.manifest import parse_manifest
from gateway.farp.publish import inline_schema, make_manifest
from gateway.farp.routes import FarpService, build_services
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamServer
from tests.support.waiting import eventually

# --- two services whose components collide by name (both define Error) ----------------

USERS = {
    "openapi": "3.1.0",
    "info": {"title": "users", "version": "1.0.0"},
    "security": [{"bearer": []}],
    "tags": [{"name": "people", "description": "The people API"}],
    "paths": {
        "/users/{id}": {
            "parameters": [{"$ref": "#/components/parameters/UserId"}],
            "get": {
                "operationId": "getUser",
                "tags": ["people"],
                "responses": {
                    "200": {
                        "description": "the user",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/User"}}
                        },
                        "links": {
                            "self": {
                                "operationId": "getUser",
                                "parameters": {"id": "$response.body#/id"},
                            }
                        },
                    },
                    "404": {"$ref": "#/components/responses/NotFound"},
                    "default": {"$ref": "#/components/responses/NotFound"},
                },
            },
            "delete": {
                "operationId": "deleteUser",
                "security": [],
                "responses": {"204": {"description": "deleted"}},
            },
        },
        "/users": {
            "post": {
                "operationId": "createUser",
                "requestBody": {"$ref": "#/components/requestBodies/NewUser"},
                "responses": {
                    "201": {
                        "description": "created",
                        "headers": {"Location": {"$ref": "#/components/headers/Location"}},
                    },
                    "400": {
                        "description": "invalid",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    },
                },
            }
        },
    },
    "components": {
        "schemas": {
            "User": {
                "type": "object",
                "required": ["id"],
                "properties": {
                    "id": {"type": "string"},
                    "pet": {"$ref": "#/components/schemas/Pet"},
                },
            },
            "Pet": {
                "oneOf": [{"$ref": "#/components/schemas/Dog"}],
                "discriminator": {
                    "propertyName": "kind",
                    "mapping": {"dog": "#/components/schemas/Dog"},
                },
            },
            "Dog": {"type": "object", "properties": {"kind": {"const": "dog"}}},
            "Error": {"type": "object", "properties": {"message": {"type": "string"}}},
        },
        "responses": {
            "NotFound": {
                "description": "no such user",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        },
        "parameters": {
            "UserId": {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
        },
        "requestBodies": {
            "NewUser": {
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/User"},
                        "examples": {"alice": {"$ref": "#/components/examples/Alice"}},
                    }
                }
            }
        },
        "headers": {"Location": {"schema": {"type": "string"}}},
        "examples": {"Alice": {"value": {"id": "alice"}}},
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}

ORDERS = {
    "openapi": "3.0.3",
    "info": {"title": "orders", "version": "2.0.0"},
    "paths": {
        "/orders/{orderId}": {
            "get": {
                "operationId": "getOrder",
                "parameters": [
                    {
                        "name": "orderId",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "the order",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Order"}}
                        },
                    },
                    "default": {
                        "description": "failure",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    },
                },
                "callbacks": {
                    "shipped": {
                        "{$request.query.callback}": {
                            "post": {
                                "operationId": "orderShipped",
                                "requestBody": {
                                    "content": {
                                        "application/json": {
                                            "schema": {"$ref": "#/components/schemas/Order"}
                                        }
                                    }
                                },
                                "responses": {"200": {"description": "ok"}},
                            }
                        }
                    }
                },
            }
        },
        "/orders": {
            "get": {
                "operationId": "listOrders",
                "responses": {
                    "200": {
                        "description": "orders",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Order"},
                                }
                            }
                        },
                    }
                },
            }
        },
    },
    "components": {
        "schemas": {
            "Order": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "note": {"type": "string", "nullable": True},
                    "state": {"type": "string", "enum": ["open", "shipped"], "nullable": True},
                    "quantity": {"type": "integer", "minimum": 0, "exclusiveMinimum": True},
                },
            },
            # Same name as users' Error, different shape: both must survive.
            "Error": {"type": "object", "properties": {"code": {"type": "integer"}}},
        }
    },
}


def service_manifest(
    name: str, instance_id: str, address: str, openapi: Any = None, **routing: Any
) -> dict[str, Any]:
    schemas = [inline_schema("openapi", openapi)] if openapi is not None else []
    return make_manifest(name, instance_id, address, schemas, routing=routing or None)


def services_of(*manifests: dict[str, Any], extra: dict[str, Any] | None = None) -> list[Any]:
    """``FarpService``s exactly as the watcher builds them (documents from inline schemas)."""
    parsed = [parse_manifest(m) for m in manifests]
    documents = {
        m.key: {s.type: s.inline_schema for s in m.schemas if s.inline_schema is not None}
        for m in parsed
    }
    first_seen = {m.key: float(index) for index, m in enumerate(parsed)}
    services, _conflicts = build_services(parsed, documents, first_seen)
    return services


def two_services() -> list[FarpService]:
    return services_of(
        service_manifest("users", "users-1", "127.0.0.1:9001", USERS, strategy="service"),
        service_manifest("orders", "orders-1", "127.0.0.1:9002", ORDERS, strategy="instance"),
    )


def refs_in(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                yield item
            else:
                yield from refs_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from refs_in(item)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} is not a local reference"
    node: Any = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and token in node, f"{ref} does not resolve"
        node = node[token]
    return node


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                yield path, method, operation


# --- OpenAPI ---------------------------------------------------------------------------


def test_federated_openapi_of_two_services_is_a_valid_openapi_31_document() -> None:
    document = federate_openapi(two_services())
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": "/"}]
    validate(document)


def test_every_ref_of_the_federated_document_resolves_inside_it() -> None:
    document = federate_openapi(two_services())
    found = list(refs_in(document))
    assert len(found) > 10
    for ref in found:
        resolve(document, ref)


def test_paths_are_the_public_mounted_paths() -> None:
    document = federate_openapi(two_services())
    assert sorted(document["paths"]) == [
        "/orders-1/orders",  # instance strategy: /{instance_id}/...
        "/orders-1/orders/{orderId}",
        "/users/users",  # service strategy: /{service_name}/...
        "/users/users/{id}",
    ]


def test_colliding_component_names_are_prefixed_per_service() -> None:
    schemas = federate_openapi(two_services())["components"]["schemas"]
    assert schemas["users_Error"]["properties"] == {"message": {"type": "string"}}
    assert schemas["orders_Error"]["properties"] == {"code": {"type": "integer"}}
    assert "Error" not in schemas
    for name in schemas:
        assert re.fullmatch(r"[a-zA-Z0-9._-]+", name)


def test_refs_follow_the_renamed_components() -> None:
    document = federate_openapi(two_services())
    get_user = document["paths"]["/users/users/{id}"]["get"]
    body = get_user["responses"]["200"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/users_User"}
    assert get_user["responses"]["404"] == {"$ref": "#/components/responses/users_NotFound"}
    pet = document["components"]["schemas"]["users_Pet"]
    assert pet["discriminator"]["mapping"] == {"dog": "#/components/schemas/users_Dog"}
    body = document["components"]["requestBodies"]["users_NewUser"]["content"]
    assert body["application/json"]["examples"]["alice"] == {
        "$ref": "#/components/examples/users_Alice"
    }


def test_operations_keep_parameters_bodies_responses_and_security() -> None:
    document = federate_openapi(two_services())
    item = document["paths"]["/users/users/{id}"]
    # The path-level parameter moved into each operation (other services may share it).
    assert item["get"]["parameters"] == [{"$ref": "#/components/parameters/users_UserId"}]
    assert "parameters" not in item
    # The service-wide security applies to the operation, with the scheme renamed...
    assert item["get"]["security"] == [{"users_bearer": []}]
    assert "users_bearer" in document["components"]["securitySchemes"]
    # ...unless the operation says otherwise.
    assert item["delete"]["security"] == []
    assert "security" not in document
    post = document["paths"]["/users/users"]["post"]
    assert post["requestBody"] == {"$ref": "#/components/requestBodies/users_NewUser"}
    assert post["responses"]["201"]["headers"]["Location"] == {
        "$ref": "#/components/headers/users_Location"
    }


def test_operation_ids_are_prefixed_unique_and_links_follow() -> None:
    document = federate_openapi(two_services())
    ids = [op["operationId"] for _, _, op in operations(document)]
    assert sorted(ids) == [
        "orders_getOrder",
        "orders_listOrders",
        "users_createUser",
        "users_deleteUser",
        "users_getUser",
    ]
    get_user = document["paths"]["/users/users/{id}"]["get"]
    assert get_user["responses"]["200"]["links"]["self"]["operationId"] == "users_getUser"
    callback = document["paths"]["/orders-1/orders/{orderId}"]["get"]["callbacks"]["shipped"]
    assert callback["{$request.query.callback}"]["post"]["operationId"] == "orders_orderShipped"


def test_every_operation_names_its_service_and_tags_are_merged() -> None:
    document = federate_openapi(two_services())
    for path, _method, operation in operations(document):
        expected = "users" if path.startswith("/users/") else "orders"
        assert operation["x-octopus-service"] == expected
        assert operation["tags"]
    tags = {tag["name"]: tag for tag in document["tags"]}
    assert tags["people"]["description"] == "The people API"
    assert {"people", "users", "orders"} <= set(tags)


def test_openapi_30_nullable_becomes_a_31_type_array() -> None:
    order = federate_openapi(two_services())["components"]["schemas"]["orders_Order"]
    assert order["properties"]["note"] == {"type": ["string", "null"]}
    assert order["properties"]["state"] == {
        "type": ["string", "null"],
        "enum": ["open", "shipped", None],
    }
    assert order["properties"]["quantity"] == {"type": "integer", "exclusiveMinimum": 0}


def test_only_methods_kept_after_conflict_resolution_are_described() -> None:
    # "shadow" claims GET and PATCH on /users/users/{id} at a lower priority: it loses GET
    # to users, keeps PATCH.
    shadow = {
        "openapi": "3.1.0",
        "info": {"title": "shadow", "version": "1"},
        "paths": {
            "/{id}": {
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "get": {"operationId": "getUser", "responses": {"200": {"description": "x"}}},
                "patch": {"operationId": "patchUser", "responses": {"200": {"description": "y"}}},
            }
        },
        "components": {"schemas": {"Error": {"type": "string"}}},
    }
    services = services_of(
        service_manifest("users", "users-1", "127.0.0.1:9001", USERS, strategy="service"),
        service_manifest(
            "shadow",
            "shadow-1",
            "127.0.0.1:9003",
            shadow,
            strategy="custom",
            base_path="/users/users",
            priority=10,
        ),
    )
    document = federate_openapi(services)
    validate(document)
    item = document["paths"]["/users/users/{id}"]
    assert item["get"]["x-octopus-service"] == "users"
    assert item["patch"]["x-octopus-service"] == "shadow"
    assert item["patch"]["operationId"] == "shadow_patchUser"
    assert "shadow_Error" in document["components"]["schemas"]


def test_instances_mounted_separately_share_identical_components() -> None:
    services = services_of(
        service_manifest("orders", "orders-1", "127.0.0.1:9002", ORDERS, strategy="instance"),
        service_manifest("orders", "orders-2", "127.0.0.1:9004", ORDERS, strategy="instance"),
    )
    document = federate_openapi(services)
    validate(document)
    assert {"/orders-1/orders", "/orders-2/orders"} <= set(document["paths"])
    assert sorted(document["components"]["schemas"]) == ["orders_Error", "orders_Order"]
    ids = [op["operationId"] for _, _, op in operations(document)]
    assert len(ids) == len(set(ids)) == 4


def test_rewrites_and_strip_settings_place_operations_at_the_rewritten_path() -> None:
    services = services_of(
        service_manifest(
            "users",
            "users-1",
            "127.0.0.1:9001",
            USERS,
            strategy="versioned",
            rewrite=[{"pattern": "^/users/v1\\.0\\.0/users", "replacement": "/people"}],
        )
    )
    document = federate_openapi(services)
    validate(document)
    assert sorted(document["paths"]) == ["/people", "/people/{id}"]


def test_a_service_without_an_openapi_schema_is_left_out_and_none_gives_a_valid_document() -> None:
    empty = federate_openapi([])
    validate(empty)
    assert empty["paths"] == {}
    bare = services_of(service_manifest("bare", "bare-1", "127.0.0.1:9005"))
    document = federate_openapi(bare)
    validate(document)
    assert document["paths"] == {}


def test_the_source_documents_are_not_modified() -> None:
    services = two_services()
    before = copy.deepcopy([s.documents for s in services])
    federate_openapi(services)
    federate_asyncapi(services)
    assert [s.documents for s in services] == before


def test_sanitize_name_keeps_component_names_legal() -> None:
    assert sanitize_name("users@users-1") == "users_users-1"
    assert sanitize_name("a b/c") == "a_b_c"
    assert sanitize_name("ok.Name-1_x") == "ok.Name-1_x"


# --- AsyncAPI --------------------------------------------------------------------------

CHAT_3 = {
    "asyncapi": "3.0.0",
    "info": {"title": "chat", "version": "1.0.0"},
    "servers": {"ws": {"host": "chat.internal", "protocol": "ws"}},
    "channels": {
        "room": {
            "address": "/rooms/{roomId}",
            "parameters": {"roomId": {"description": "the room"}},
            "messages": {"said": {"$ref": "#/components/messages/Said"}},
        }
    },
    "operations": {
        "say": {
            "action": "send",
            "channel": {"$ref": "#/channels/room"},
            "messages": [{"$ref": "#/channels/room/messages/said"}],
        }
    },
    "components": {
        "messages": {"Said": {"payload": {"$ref": "#/components/schemas/Line"}}},
        "schemas": {"Line": {"type": "string"}},
    },
}

TICKS_2 = {
    "asyncapi": "2.6.0",
    "info": {"title": "ticks", "version": "1.0.0"},
    "servers": {"sse": {"url": "ticks.internal", "protocol": "sse"}},
    "channels": {
        "/ticks": {
            "subscribe": {
                "operationId": "onTick",
                "message": {"$ref": "#/components/messages/Tick"},
            }
        }
    },
    "components": {
        "messages": {
            "Tick": {"messageId": "tick", "payload": {"$ref": "#/components/schemas/Line"}}
        },
        "schemas": {"Line": {"type": "integer"}},
    },
}


def asyncapi_services() -> list[FarpService]:
    return services_of(
        make_manifest(
            "chat",
            "chat-1",
            "127.0.0.1:9006",
            [inline_schema("asyncapi", CHAT_3)],
            routing={"strategy": "service"},
        ),
        make_manifest(
            "ticks",
            "ticks-1",
            "127.0.0.1:9007",
            [inline_schema("asyncapi", TICKS_2)],
            routing={"strategy": "instance"},
        ),
    )


def test_federated_asyncapi_places_channels_at_public_addresses() -> None:
    document = federate_asyncapi(asyncapi_services())
    assert document["asyncapi"] == "3.0.0"
    addresses = sorted(channel["address"] for channel in document["channels"].values())
    assert addresses == ["/chat/rooms/{roomId}", "/ticks-1/ticks"]


def test_federated_asyncapi_prefixes_components_and_every_ref_resolves() -> None:
    document = federate_asyncapi(asyncapi_services())
    assert sorted(document["components"]["schemas"]) == ["chat_Line", "ticks_Line"]
    for ref in refs_in(document):
        resolve(document, ref)
    # The 2.x subscribe operation became a 3.0 "send" operation on the converted channel.
    tick = document["operations"]["ticks_onTick"]
    assert tick["action"] == "send"
    assert resolve(document, tick["channel"]["$ref"])["address"] == "/ticks-1/ticks"
    assert document["operations"]["chat_say"]["x-octopus-service"] == "chat"


# --- served by the gateway -------------------------------------------------------------


class AssetLinks(HTMLParser):
    """The URLs a page makes the browser fetch (scripts, stylesheets, the spec URL)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and name in ("src", "href", "data-openapi-url"):
                self.urls.append(value)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ThreadedServer, UpstreamServer]]:
    with UpstreamServer("docs-upstream") as upstream:
        address = f"127.0.0.1:{upstream.port}"
        config = {
            "discovery": {
                "backend": "static",
                "static": {
                    "manifests": [
                        service_manifest("users", "users-1", address, USERS, strategy="service"),
                        service_manifest(
                            "orders", "orders-1", address, ORDERS, strategy="instance"
                        ),
                        make_manifest(
                            "chat",
                            "chat-1",
                            address,
                            [inline_schema("asyncapi", CHAT_3)],
                            routing={"strategy": "service"},
                        ),
                    ]
                },
            },
        }
        with ThreadedServer(create_app(config, serve_admin=True)) as gateway:
            eventually(
                lambda: httpx.get(f"{gateway.url}/_/ready").status_code == 200,
                message="gateway never became ready",
            )
            yield gateway, upstream


def test_gateway_serves_the_federated_openapi_document(
    served: tuple[ThreadedServer, UpstreamServer],
) -> None:
    gateway, _ = served
    response = httpx.get(f"{gateway.url}/_/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert sorted(document["paths"]) == [
        "/orders-1/orders",
        "/orders-1/orders/{orderId}",
        "/users/users",
        "/users/users/{id}",
    ]


def test_every_federated_path_is_routed_by_the_gateway(
    served: tuple[ThreadedServer, UpstreamServer],
) -> None:
    gateway, upstream = served
    document = httpx.get(f"{gateway.url}/_/openapi.json").json()
    with httpx.Client(base_url=gateway.url) as client:
        for path, method, _operation in operations(document):
            concrete = re.sub(r"\{[^}]+\}", "42", path)
            upstream.app.reset()
            response = client.request(method.upper(), concrete)
            assert response.status_code == 200, (method, path, response.text)
            assert upstream.app.requests, f"{method} {path} did not reach the upstream"


def test_gateway_serves_the_federated_asyncapi_document(
    served: tuple[ThreadedServer, UpstreamServer],
) -> None:
    gateway, _ = served
    document = httpx.get(f"{gateway.url}/_/asyncapi.json").json()
    assert [c["address"] for c in document["channels"].values()] == ["/chat/rooms/{roomId}"]
    for ref in refs_in(document):
        resolve(document, ref)


def test_docs_page_assets_are_served_by_the_admin_app(
    served: tuple[ThreadedServer, UpstreamServer],
) -> None:
    gateway, _ = served
    page = httpx.get(f"{gateway.url}/_/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    links = AssetLinks()
    links.feed(page.text)
    assert any("swagger-ui-bundle.js" in url for url in links.urls)
    assert any("swagger-ui.css" in url for url in links.urls)
    assert any(url.endswith("/_/openapi.json") for url in links.urls)
    for url in links.urls:
        assert url.startswith("/"), f"{url}: no CDN, no other host"
        asset = httpx.get(f"{gateway.url}{url}")
        assert asset.status_code == 200, url
        assert len(asset.content) > 0, url
