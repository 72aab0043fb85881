"""The demo service's API contract: the OpenAPI 3.1 document it serves at
``/openapi.json`` and publishes (inline) in its FARP manifest."""

from __future__ import annotations

from typing import Any


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_USER = {"$ref": "#/components/schemas/User"}
_ERROR = {"$ref": "#/components/schemas/Error"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Demo users",
        "version": "1.0.0",
        "description": "A small in-memory user directory behind the Octopus gateway.",
    },
    "paths": {
        "/users": {
            "get": {
                "operationId": "listUsers",
                "summary": "List every user",
                "tags": ["users"],
                "responses": {"200": _json({"type": "array", "items": _USER}, "All users")},
            },
            "post": {
                "operationId": "createUser",
                "summary": "Create a user",
                "tags": ["users"],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewUser"}}
                    },
                },
                "responses": {
                    "201": _json(_USER, "The created user"),
                    "422": _json(_ERROR, "The body is not a valid new user"),
                },
            },
        },
        "/users/{id}": {
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
            ],
            "get": {
                "operationId": "getUser",
                "summary": "One user by id",
                "tags": ["users"],
                "responses": {
                    "200": _json(_USER, "The user"),
                    "404": _json(_ERROR, "No user has this id"),
                },
            },
        },
    },
    "components": {
        "schemas": {
            "User": {
                "type": "object",
                "required": ["id", "name"],
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "name": {"type": "string"},
                    "email": {"type": ["string", "null"], "format": "email"},
                },
            },
            "NewUser": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "email": {"type": ["string", "null"], "format": "email"},
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
        }
    },
}
