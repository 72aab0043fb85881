"""Small plugins for the plugin-system tests: they leave a trail in headers, so the order
the chain ran them in is visible to the upstream (request hooks) and to the client
(response hooks) without any shared state between tests."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from plugins.api import Plugin, PluginMetadata, RequestContext, Response


class RecorderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    #: Answer directly with this status instead of continuing the chain.
    answer: int | None = None
    #: Raise from ``on_request`` (a plugin bug).
    fail: bool = False


#: Labels of request hooks in the order they ran (tests clear it first; tests run serially).
CALLS: list[str] = []


def _append(current: str | None, label: str) -> str:
    return f"{current},{label}" if current else label


class RecorderPlugin(Plugin):
    """Appends its label to ``x-trail`` upstream and to ``x-trail-response`` downstream."""

    metadata = PluginMetadata(
        name="recorder", version="0.0.1", description="Leaves a trail in headers."
    )
    Config = RecorderConfig
    config: RecorderConfig

    async def on_request(self, ctx: RequestContext) -> Response | None:
        CALLS.append(self.config.label)
        if self.config.fail:
            raise RuntimeError(f"{self.config.label} is broken")
        ctx.set_header("x-trail", _append(ctx.header("x-trail"), self.config.label))
        if self.config.answer is not None:
            return Response.error(
                self.config.answer, "answered", f"answered by {self.config.label}", ctx.request_id
            )
        return None

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        response.set_header(
            "x-trail-response", _append(response.header("x-trail-response"), self.config.label)
        )


class BrokenAuthPlugin(Plugin):
    """An auth plugin with a bug: the request must be refused, never let through."""

    metadata = PluginMetadata(name="broken-auth", version="0.0.1", kind="auth")

    async def on_request(self, ctx: RequestContext) -> Response | None:
        raise RuntimeError("token store unreachable")
