"""An example third-party plugin: stamps a header on requests and responses.

It shows the whole plugin surface a typical plugin needs: metadata, a pydantic config
model, a request hook that edits what goes upstream, a response hook, and a direct
answer. Load it by file (``path: plugins/examples/stamp.py``), by module
(``module: plugins.examples.stamp``) or, once packaged, by the ``octopus.plugins``
entry point.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from plugins.api import Plugin, PluginMetadata, RequestContext, Response


class StampConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Header added to the request sent upstream and to the response.
    header: str = "x-stamp"
    value: str = "octopus"
    #: Requests carrying this header are answered 403 by the plugin itself.
    deny_header: str | None = None


class StampPlugin(Plugin):
    metadata = PluginMetadata(
        name="stamp",
        version="1.0.0",
        description="Adds a header both ways; can refuse requests carrying a header.",
    )
    Config = StampConfig
    config: StampConfig

    async def on_request(self, ctx: RequestContext) -> Response | None:
        if self.config.deny_header and ctx.header(self.config.deny_header) is not None:
            return Response.error(403, "forbidden", "denied by the stamp plugin", ctx.request_id)
        ctx.set_header(self.config.header, self.config.value)
        return None

    async def on_response(self, ctx: RequestContext, response: Response) -> None:
        response.set_header(self.config.header, self.config.value)
