"""The federated API documents and the page that renders them (DESIGN.md §8).

``/_/openapi.json`` and ``/_/asyncapi.json`` describe every FARP service at its public
gateway path (built by ``gateway.farp.federation``); ``/_/docs`` renders the OpenAPI one
with Swagger UI. The UI is vendored under ``app/static/swagger-ui`` and served by the
admin app itself: the docs page must work on an air-gapped network and must not leak
which APIs a gateway serves to a CDN.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.farp.federation import federate_asyncapi, federate_openapi
from gateway.runtime import Gateway

STATIC_DIR = Path(__file__).resolve().parent / "static"
SWAGGER_UI_VERSION = "5.35.0"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="{root}/_/static/swagger-ui/swagger-ui.css?v={version}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{root}/_/openapi.json"></div>
<script src="{root}/_/static/swagger-ui/swagger-ui-bundle.js?v={version}"></script>
<script src="{root}/_/static/docs.js?v={version}"></script>
</body>
</html>
"""


class FederatedDocuments:
    """Builds the federated documents once per routing-table rebuild.

    The watcher replaces its ``services`` list on every rebuild, so the list's identity
    says whether a cached document is still current; dashboards and docs pages poll.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._cache: dict[str, tuple[object, dict[str, Any]]] = {}

    def _services(self) -> list[Any]:
        watcher = self.gateway.farp
        return watcher.services if watcher is not None else []

    def document(self, kind: str) -> dict[str, Any]:
        services = self._services()
        cached = self._cache.get(kind)
        if cached is not None and cached[0] is services:
            return cached[1]
        build = federate_openapi if kind == "openapi" else federate_asyncapi
        document = build(services)
        self._cache[kind] = (services, document)
        return document


def docs_page(root_path: str = "") -> str:
    """The Swagger UI page; asset URLs are absolute below ``root_path`` so the page
    works however the gateway is mounted (and with or without a trailing slash)."""
    return _PAGE.format(
        title="Octopus gateway API",
        root=html.escape(root_path.rstrip("/"), quote=True),
        version=SWAGGER_UI_VERSION,
    )


def docs_routes(gateway: Gateway) -> list[BaseRoute]:
    """``/_/openapi.json``, ``/_/asyncapi.json``, ``/_/docs`` and the static assets."""
    documents = FederatedDocuments(gateway)

    async def openapi(request: Request) -> Response:
        return JSONResponse(documents.document("openapi"))

    async def asyncapi(request: Request) -> Response:
        return JSONResponse(documents.document("asyncapi"))

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_page(request.scope.get("root_path", "")))

    return [
        Route("/_/openapi.json", openapi, methods=["GET"]),
        Route("/_/asyncapi.json", asyncapi, methods=["GET"]),
        Route("/_/docs", docs, methods=["GET"]),
        Mount("/_/static", app=StaticFiles(directory=STATIC_DIR), name="admin-static"),
    ]
