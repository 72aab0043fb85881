"""The demo "users" service: an in-memory directory with a FARP manifest.

Endpoints: ``GET /users``, ``POST /users``, ``GET /users/{id}``, ``GET /health``, its
OpenAPI document at ``GET /openapi.json`` and its FARP manifest at
``GET /_farp/manifest``. Behind the gateway (``routing.strategy: service``) the API is
at ``/demo-users/users`` and ``/demo-users/users/{id}``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.demo_service.openapi import OPENAPI
from gateway.farp.publish import inline_schema, make_manifest

SERVICE_NAME = "demo-users"
SERVICE_VERSION = "v1.0.0"
INSTANCE_ID = "demo-users-1"
DEFAULT_ADDRESS = "127.0.0.1:9001"


def build_manifest(
    address: str = DEFAULT_ADDRESS, *, instance_id: str = INSTANCE_ID
) -> dict[str, Any]:
    """The FARP manifest of one instance at ``address`` (``host:port``), with the
    OpenAPI document inline so the gateway needs nothing else to build routes."""
    return make_manifest(
        SERVICE_NAME,
        instance_id,
        address,
        [inline_schema("openapi", OPENAPI)],
        service_version=SERVICE_VERSION,
        routing={"strategy": "service", "strip_prefix": True},
        capabilities=["rest"],
        status="healthy",
        endpoints={"health": "/health", "openapi": "/openapi.json"},
    )


def create_app(address: str = DEFAULT_ADDRESS, *, instance_id: str = INSTANCE_ID) -> Starlette:
    """The service; ``address`` is where the gateway reaches it (published in the manifest)."""
    users: dict[int, dict[str, Any]] = {
        1: {"id": 1, "name": "Ada Lovelace", "email": "ada@example.org"},
        2: {"id": 2, "name": "Grace Hopper", "email": None},
    }
    ids = itertools.count(3)
    manifest = build_manifest(address, instance_id=instance_id)

    async def list_users(request: Request) -> Response:
        return JSONResponse(list(users.values()))

    async def create_user(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=422)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=422)
        name, email = body.get("name"), body.get("email")
        if not isinstance(name, str) or not name.strip():
            return JSONResponse({"error": "name is required"}, status_code=422)
        if email is not None and not isinstance(email, str):
            return JSONResponse({"error": "email must be a string"}, status_code=422)
        user = {"id": next(ids), "name": name.strip(), "email": email}
        users[user["id"]] = user
        return JSONResponse(user, status_code=201)

    async def get_user(request: Request) -> Response:
        raw = request.path_params["id"]
        user = users.get(int(raw)) if raw.isdigit() else None
        if user is None:
            return JSONResponse({"error": f"no user with id {raw}"}, status_code=404)
        return JSONResponse(user)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def farp_manifest(request: Request) -> Response:
        return JSONResponse(manifest)

    return Starlette(
        routes=[
            Route("/users", list_users, methods=["GET"]),
            Route("/users", create_user, methods=["POST"]),
            Route("/users/{id}", get_user, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/_farp/manifest", farp_manifest, methods=["GET"]),
        ]
    )


#: For ``uvicorn examples.demo_service.app:app`` (listening on 127.0.0.1:9001).
app = create_app()
