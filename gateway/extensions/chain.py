"""Running a route's plugins around the proxy.

A chain is resolved once per distinct plugin list and cached; a route with no plugins
never reaches this module, so the hot path pays nothing for the feature. Request hooks
run in chain order, response hooks in reverse order (like Envoy's decoder and encoder
filters), and a plugin's direct answer still passes the response hooks, so CORS
headers land on a 401 too.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.types import Send
from plugins.api import BodyFilter, Plugin, RequestContext, Response

log = logging.getLogger("octopus.plugins")

#: Largest body a plugin that asked for whole bodies (``wants_response_body``) gets.
MAX_TEE = 8 * 1024 * 1024


class PluginChain:
    """The plugins of one route, sorted by the hooks they implement."""

    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = plugins
        self.request = [p for p in plugins if p.overrides("on_request")]
        self.websocket = [
            p for p in plugins if p.overrides("on_websocket_connect") or p.overrides("on_request")
        ]
        self.response = [p for p in reversed(plugins) if p.overrides("on_response")]
        self.filters = [p for p in reversed(plugins) if p.overrides("response_body_filter")]
        self.body = [p for p in plugins if p.overrides("wants_response_body")]
        self.errors = [p for p in plugins if p.overrides("on_error")]

    async def run_request(self, ctx: RequestContext) -> Response | None:
        """Request hooks in order; the first direct answer wins."""
        hooks = self.websocket if ctx.websocket else self.request
        for plugin in hooks:
            try:
                if ctx.websocket:
                    answer = await plugin.on_websocket_connect(ctx)
                else:
                    answer = await plugin.on_request(ctx)
            except Exception as exc:
                answer = self._failed(plugin, ctx, exc)
            if answer is not None:
                return answer
        return None

    async def run_error(self, ctx: RequestContext, error: BaseException) -> None:
        for plugin in self.errors:
            try:
                await plugin.on_error(ctx, error)
            except Exception:
                log.exception("plugin on_error failed", extra={"plugin": plugin.metadata.name})

    async def send_local(self, ctx: RequestContext, answer: Response, send: Send) -> None:
        """Send a plugin's direct answer through the response hooks."""
        if not any(name == b"content-type" for name, _ in answer.headers) and answer.body:
            answer.headers.append((b"content-type", b"application/json"))
        answer.headers.append((b"x-request-id", ctx.request_id.encode()))
        wrapped = self.wrap_send(send, ctx)
        await wrapped(
            {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
        )
        await wrapped({"type": "http.response.body", "body": answer.body, "more_body": False})

    def wrap_send(self, send: Send, ctx: RequestContext) -> Send:
        """A ``send`` that runs response hooks on the head and filters on the body."""
        if not (self.response or self.filters or self.body):
            return send
        state: dict[str, Any] = {}

        async def wrapped(message: Any) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                response = Response(message["status"], list(message.get("headers", [])))
                for plugin in self.response:
                    try:
                        await plugin.on_response(ctx, response)
                    except Exception as exc:
                        self._failed(plugin, ctx, exc)
                filters: list[BodyFilter] = []
                for plugin in self.filters:
                    try:
                        found = plugin.response_body_filter(ctx, response)
                    except Exception as exc:
                        self._failed(plugin, ctx, exc)
                        found = None
                    if found is not None:
                        filters.append(found)
                if filters:
                    response.remove_header("content-length")
                tee = [p for p in self.body if _wants(p, ctx, response)]
                state.update(response=response, filters=filters, tee=tee, chunks=[], size=0)
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": response.headers,
                    }
                )
                return
            if kind == "http.response.body" and state:
                data = message.get("body", b"")
                more = message.get("more_body", False)
                for body_filter in state["filters"]:
                    data = body_filter.feed(data)
                if not more and state["filters"]:
                    data = _finish(state["filters"], data)
                if state["tee"] and state["size"] <= MAX_TEE:
                    state["chunks"].append(data)
                    state["size"] += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": more})
                if not more and state["tee"] and state["size"] <= MAX_TEE:
                    body = b"".join(state["chunks"])
                    for plugin in state["tee"]:
                        try:
                            await plugin.on_response_body(ctx, state["response"], body)
                        except Exception as exc:
                            self._failed(plugin, ctx, exc)
                return
            await send(message)

        return wrapped

    @staticmethod
    def _failed(plugin: Plugin, ctx: RequestContext, exc: Exception) -> Response | None:
        name = plugin.metadata.name
        log.exception("plugin failed", extra={"plugin": name, "request_id": ctx.request_id})
        if plugin.failure_mode == "closed":
            return Response.error(
                503, "plugin_failed", f"plugin {name} failed; request refused", ctx.request_id
            )
        return None


def _wants(plugin: Plugin, ctx: RequestContext, response: Response) -> bool:
    try:
        return plugin.wants_response_body(ctx, response)
    except Exception:
        log.exception("plugin failed", extra={"plugin": plugin.metadata.name})
        return False


def _finish(filters: list[BodyFilter], data: bytes) -> bytes:
    """Flush each filter in turn, passing each one's tail through the filters after it."""
    for index, body_filter in enumerate(filters):
        tail = body_filter.finish()
        for later in filters[index + 1 :]:
            tail = later.feed(tail)
        data += tail
    return data
