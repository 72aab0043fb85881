"""The plugin system end to end, in-process: chain order (``middleware:`` then the route's
list), direct answers, failure modes, the loaded-plugin metric, ``/_/plugins``, the
example plugin loaded by file and by entry point, and config errors naming the plugin."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from plugins.api import Plugin, PluginMetadata, RequestContext
from settings import ConfigError
from tests.plugins import recorders
from tests.support.gateway import REPO, GatewayServer, gateway_config, route
from tests.support.servers import ThreadedServer
from tests.support.upstream import UpstreamApp, UpstreamServer

STAMP_FILE = str(REPO / "plugins" / "examples" / "stamp.py")
RECORDER = "tests.plugins.recorders:RecorderPlugin"


def recorder(name: str, **config: Any) -> dict[str, Any]:
    return {"name": name, "module": RECORDER, "config": {"label": name, **config}}


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[UpstreamServer]:
    with UpstreamServer("plugins") as server:
        yield server


@pytest.fixture
def upstream(upstream_server: UpstreamServer) -> UpstreamApp:
    upstream_server.app.reset()
    recorders.CALLS.clear()
    return upstream_server.app


@pytest.fixture(scope="module")
def gateway(upstream_server: UpstreamServer) -> Iterator[GatewayServer]:
    def r(name: str, plugins: list[str]) -> dict[str, Any]:
        return route(name, f"/{name}/{{rest:path}}", "up", strip_prefix=True, plugins=plugins)

    config = gateway_config(
        {"up": upstream_server.url},
        [
            r("ordered", ["r1", "r2"]),
            r("plain", []),
            r("repeated", ["m2", "r1"]),
            r("answering", ["r1", "answer", "r2"]),
            r("open", ["fails-open", "r1"]),
            r("closed", ["fails-closed", "r1"]),
            r("auth", ["broken-auth"]),
            r("auth-open", ["broken-auth-open"]),
            r("stamped", ["stamp"]),
        ],
        middleware=["m1", "m2"],
        plugins=[
            recorder("m1"),
            recorder("m2"),
            recorder("r1"),
            recorder("r2"),
            recorder("answer", answer=418),
            recorder("fails-open", fail=True),
            {**recorder("fails-closed", fail=True), "failure": "closed"},
            {"name": "broken-auth", "module": "tests.plugins.recorders:BrokenAuthPlugin"},
            {
                "name": "broken-auth-open",
                "module": "tests.plugins.recorders:BrokenAuthPlugin",
                "failure": "open",  # ignored: auth plugins always fail closed
            },
            {"name": "stamp", "path": STAMP_FILE, "config": {"value": "from-file"}},
            {"name": "cors"},
        ],
    )
    with GatewayServer(config) as server:
        yield server


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c


def sent_upstream(upstream: UpstreamApp, name: str) -> str | None:
    (request,) = upstream.requests
    return next((v for h, v in request["headers"] if h == name), None)


# --- order -------------------------------------------------------------------------------


def test_middleware_runs_first_then_the_routes_plugins_in_listed_order(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/ordered/echo")
    assert sent_upstream(upstream, "x-trail") == "m1,m2,r1,r2"


def test_response_hooks_run_in_reverse_order(client: httpx.Client, upstream: UpstreamApp) -> None:
    response = client.get("/ordered/echo")
    assert response.headers["x-trail-response"] == "r2,r1,m2,m1"


def test_a_route_without_plugins_runs_only_the_middleware(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/plain/echo")
    assert sent_upstream(upstream, "x-trail") == "m1,m2"
    assert response.headers["x-trail-response"] == "m2,m1"


def test_a_plugin_in_both_middleware_and_the_route_runs_once(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    client.get("/repeated/echo")
    assert sent_upstream(upstream, "x-trail") == "m1,m2,r1"


# --- direct answers ----------------------------------------------------------------------


def test_a_direct_answer_stops_the_chain_and_skips_the_upstream(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/answering/echo")
    assert response.status_code == 418
    assert response.json()["error"] == "answered"
    assert upstream.requests == []
    assert recorders.CALLS == ["m1", "m2", "r1", "answer"]


def test_response_hooks_still_run_on_a_direct_answer(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/answering/echo")
    assert response.headers["x-trail-response"].endswith("answer,r1,m2,m1")
    assert response.headers["x-request-id"]


# --- failures ----------------------------------------------------------------------------


def test_a_failing_generic_plugin_fails_open_by_default(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/open/echo")
    assert response.status_code == 200
    assert sent_upstream(upstream, "x-trail") == "m1,m2,r1"


def test_a_failing_generic_plugin_with_failure_closed_refuses_503(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/closed/echo")
    assert response.status_code == 503
    body = response.json()
    assert body["error"] == "plugin_failed"
    assert body["message"] == "plugin recorder failed; request refused"
    assert body["request_id"] == response.headers["x-request-id"]
    assert "is broken" not in response.text  # no internals reach the client
    assert upstream.requests == []


def test_a_failing_auth_plugin_fails_closed(client: httpx.Client, upstream: UpstreamApp) -> None:
    response = client.get("/auth/echo")
    assert response.status_code == 503
    assert response.json()["error"] == "plugin_failed"
    assert "unreachable" not in response.text
    assert upstream.requests == []


def test_an_auth_plugin_fails_closed_even_when_configured_open(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    assert client.get("/auth-open/echo").status_code == 503
    assert upstream.requests == []


# --- the example plugin, metrics, admin --------------------------------------------------


def test_the_example_plugin_loaded_from_a_file_stamps_both_ways(
    client: httpx.Client, upstream: UpstreamApp
) -> None:
    response = client.get("/stamped/echo")
    assert sent_upstream(upstream, "x-stamp") == "from-file"
    assert response.headers["x-stamp"] == "from-file"


def test_loaded_plugins_are_exported_as_a_metric_with_their_version(
    client: httpx.Client,
) -> None:
    text = client.get("/metrics").text
    assert re.search(r'^octopus_plugin_loaded\{plugin="stamp",version="1.0.0"\} 1.0$', text, re.M)
    assert re.search(r'^octopus_plugin_loaded\{plugin="cors",version="1.0.0"\} 1.0$', text, re.M)
    assert re.search(
        r'^octopus_plugin_loaded\{plugin="recorder",version="0.0.1"\} 1.0$', text, re.M
    )


def test_admin_plugins_lists_each_plugin_with_its_source_and_routes(
    client: httpx.Client,
) -> None:
    document = client.get("/_/plugins").json()
    by_name = {entry["name"]: entry for entry in document["plugins"]}
    assert by_name["stamp"] == {
        "name": "stamp",
        "version": "1.0.0",
        "description": "Adds a header both ways; can refuse requests carrying a header.",
        "kind": "generic",
        "source": "file",
        "middleware": False,
        "routes": ["stamped"],
    }
    assert by_name["cors"]["source"] == "builtin"
    assert by_name["cors"]["routes"] == []
    assert by_name["r1"]["source"] == "module"
    assert by_name["r1"]["routes"] == ["ordered", "repeated", "answering", "open", "closed"]
    assert by_name["broken-auth"]["kind"] == "auth"
    assert by_name["m1"]["middleware"] is True
    assert len(by_name["m1"]["routes"]) == 9
    assert list(by_name)[:4] == ["m1", "m2", "r1", "r2"]  # config order


# --- entry points ------------------------------------------------------------------------


def test_the_example_plugin_loads_from_an_octopus_plugins_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_server: UpstreamServer
) -> None:
    dist = tmp_path / "octopus_example_stamp-1.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: octopus-example-stamp\nVersion: 1.0.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[octopus.plugins]\nstamp-ep = plugins.examples.stamp:StampPlugin\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    upstream_server.app.reset()
    config = gateway_config(
        {"up": upstream_server.url},
        [route("ep", "/{rest:path}", "up", plugins=["stamp-ep"])],
        plugins=[{"name": "stamp-ep", "config": {"header": "x-ep", "value": "entry-point"}}],
    )
    with GatewayServer(config) as gateway, gateway.client() as client:
        response = client.get("/echo")
        (entry,) = client.get("/_/plugins").json()["plugins"]
    assert response.headers["x-ep"] == "entry-point"
    assert sent_upstream(upstream_server.app, "x-ep") == "entry-point"
    assert entry["source"] == "entry-point"
    assert entry["name"] == "stamp-ep"


# --- configuration errors ----------------------------------------------------------------


def build(plugins: list[dict[str, Any]], route_plugins: list[str]) -> None:
    from gateway.asgi import create_app

    create_app(
        gateway_config(
            {"up": "http://127.0.0.1:9"},
            [route("r", "/r", "up", plugins=route_plugins)],
            plugins=plugins,
        )
    )


def test_an_unknown_config_key_names_the_plugin_entry_and_the_key() -> None:
    with pytest.raises(ConfigError) as raised:
        build(
            [{"name": "cors"}, {"name": "stamp", "path": STAMP_FILE, "config": {"colour": "red"}}],
            ["stamp"],
        )
    assert "plugins[1] (stamp): config.colour: Extra inputs are not permitted" in str(raised.value)


def test_a_bad_config_value_names_the_plugin_entry_and_the_key() -> None:
    with pytest.raises(ConfigError) as raised:
        build([recorder("rec", answer="soon")], ["rec"])
    assert "plugins[0] (rec): config.answer:" in str(raised.value)


def test_an_unloadable_plugin_names_the_entry() -> None:
    with pytest.raises(ConfigError) as raised:
        build([{"name": "no-such-plugin"}], ["no-such-plugin"])
    assert "plugin 'no-such-plugin'" in str(raised.value)


def test_a_missing_plugin_file_names_the_entry_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.py"
    with pytest.raises(ConfigError) as raised:
        build([{"name": "local", "path": str(missing)}], ["local"])
    assert "plugin 'local'" in str(raised.value)
    assert str(missing) in str(raised.value)


class _ErrorRecorder(Plugin):
    metadata = PluginMetadata(name="error-recorder")
    seen: ClassVar[list[int]] = []

    async def on_error(self, ctx: RequestContext, error: BaseException) -> None:
        self.seen.append(getattr(error, "status", 0))


class _Wrapper(Plugin):
    metadata = PluginMetadata(name="wrapper")

    def wrap(self, app: Any) -> Any:
        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            async def stamped(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message = dict(message)
                    message["headers"] = [*message["headers"], (b"x-wrapped", b"1")]
                await send(message)

            await app(scope, receive, stamped)

        return wrapped


def test_on_error_hears_gateway_errors_and_wrap_wraps_every_request() -> None:
    from gateway.asgi import GatewayApp
    from gateway.extensions.loader import LoadedPlugins
    from gateway.runtime import Gateway
    from settings import load_settings

    settings = load_settings(
        {
            "discovery": {"backend": "static"},
            "farp": {"enabled": False},
            "upstreams": {"dead": {"endpoints": ["http://127.0.0.1:9"]}},
            "routes": [{"name": "dead", "match": {"path": "/dead"}, "upstream": "dead"}],
        }
    )
    gateway = Gateway(settings)
    recorder, wrapper = _ErrorRecorder(), _Wrapper()
    gateway.plugins = LoadedPlugins({"r": recorder, "w": wrapper}, [wrapper, recorder])
    with ThreadedServer(GatewayApp(gateway)) as server:
        response = httpx.get(server.url + "/dead")
    assert response.status_code == 502
    assert response.headers["x-wrapped"] == "1"
    assert _ErrorRecorder.seen == [502]
