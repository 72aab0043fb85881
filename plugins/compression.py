"""Response compression (``br``, ``zstd``, ``gzip``) as the body streams.

Why streaming: the gateway never holds a whole body (DESIGN §2.4), and SSE or
long-polling responses must reach the client as they are produced. Each chunk is
compressed and flushed at once (zlib ``Z_SYNC_FLUSH``, brotli ``flush()``, zstd
``FLUSH_BLOCK``), so the client can decode every byte it has received; the cost is a
few bytes per chunk, paid only where chunks are small.

Choosing a coding: ``Accept-Encoding`` is parsed with its q-values (RFC 9110 §12.5.3):
a coding with ``q=0`` is never used, ``*`` stands for every coding not named, and among
the codings the client accepts the highest q wins, ties going to the order of
``algorithms`` (server preference). No ``Accept-Encoding`` means identity. When nothing
is acceptable the body is sent as it is, even with ``identity;q=0``: a 406 would break
more clients than it helps.

Left alone: HEAD requests, 1xx/204/304/206 and ``Content-Range`` responses, responses
that already have a ``Content-Encoding``, ``Cache-Control: no-transform``,
``text/event-stream`` (always, whatever ``content_types`` says), content types not in
``content_types``, and bodies whose ``Content-Length`` is below ``min_size`` (a body
without a length streams, so it is compressed). When the response is compressible,
``Vary: Accept-Encoding`` is added (appended to an existing ``Vary``) whether or not this
client accepted a coding, so caches keep both versions apart; a compressed response
loses ``Content-Length`` and ``Accept-Ranges``, and a strong ``ETag`` becomes weak (the
bytes differ from the identity representation).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from plugins._http import append_vary, split_list
from plugins.api import BodyFilter, Plugin, PluginMetadata, RequestContext, Response

Algorithm = Literal["br", "zstd", "gzip"]
#: Per-algorithm level when ``level`` does not say: brotli 4 and zstd 3 are the usual
#: on-the-fly choices (high ratio at low CPU); gzip 6 is zlib's own default.
DEFAULT_LEVELS: dict[str, int] = {"br": 4, "zstd": 3, "gzip": 6}
LEVEL_RANGES: dict[str, tuple[int, int]] = {"br": (0, 11), "zstd": (1, 22), "gzip": (1, 9)}
_MODULES = {"br": "brotli", "zstd": "zstandard", "gzip": "zlib"}
DEFAULT_CONTENT_TYPES = [
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/*+xml",
    "application/x-ndjson",
    "application/graphql-response+json",
    "application/wasm",
    "image/svg+xml",
    "image/x-icon",
    "font/ttf",
    "font/otf",
]
#: Never compressed: each event must reach the client the moment it is sent, and some
#: proxies and browsers buffer compressed event streams.
NEVER = "text/event-stream"
_UNCOMPRESSIBLE_STATUS = frozenset({204, 206, 304})


def _available(algorithm: str) -> bool:
    return importlib.util.find_spec(_MODULES[algorithm]) is not None


def _default_algorithms() -> list[str]:
    return [a for a in ("br", "zstd", "gzip") if _available(a)]


class CompressionConfig(BaseModel):
    """``compression`` plugin options; ``{}`` is a complete configuration."""

    model_config = ConfigDict(extra="forbid")

    #: Codings offered, in server preference order (used to break q-value ties).
    algorithms: list[Algorithm] = Field(default_factory=_default_algorithms)
    #: Bodies with a smaller ``Content-Length`` are sent as they are (int bytes or
    #: ``1KiB``-style size).
    min_size: int = 1024
    #: One level for every algorithm, or ``{gzip: 6, br: 4, zstd: 3}``; unnamed
    #: algorithms keep their defaults (gzip 1-9, br 0-11, zstd 1-22).
    level: int | dict[Algorithm, int] | None = None
    #: Media types to compress (``fnmatch`` patterns such as ``text/*``, ``*+json``),
    #: matched without parameters, case-insensitively.
    content_types: list[str] = DEFAULT_CONTENT_TYPES

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("needs at least one of br, zstd, gzip")
        if len(set(values)) != len(values):
            raise ValueError("lists an algorithm twice")
        for value in values:
            if not _available(value):
                raise ValueError(f"{value} needs the {_MODULES[value]} package, not installed")
        return values

    @field_validator("min_size", mode="before")
    @classmethod
    def _min_size(cls, value: Any) -> Any:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            from settings.units import parse_size

            return parse_size(value)
        return value

    @field_validator("content_types")
    @classmethod
    def _content_types(cls, values: list[str]) -> list[str]:
        for value in values:
            if "/" not in value:
                raise ValueError(f"{value!r} is not a media type (type/subtype)")
        return [value.strip().lower() for value in values]

    @field_validator("level")
    @classmethod
    def _level(cls, value: int | dict[str, int] | None, info: ValidationInfo) -> Any:
        if value is None:
            return value
        algorithms = info.data.get("algorithms") or list(DEFAULT_LEVELS)
        levels = value if isinstance(value, dict) else dict.fromkeys(algorithms, value)
        for algorithm, level in levels.items():
            low, high = LEVEL_RANGES[algorithm]
            if not low <= level <= high:
                raise ValueError(f"{level} is out of range for {algorithm} ({low}-{high})")
        return value

    def level_for(self, algorithm: str) -> int:
        if isinstance(self.level, int):
            return self.level
        if isinstance(self.level, dict) and algorithm in self.level:
            return self.level[algorithm]  # type: ignore[index]
        return DEFAULT_LEVELS[algorithm]


class GzipFilter(BodyFilter):
    def __init__(self, level: int) -> None:
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        return self._zlib.compress(chunk) + self._zlib.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._zlib.flush(zlib.Z_FINISH)


class BrotliFilter(BodyFilter):
    def __init__(self, level: int) -> None:
        import brotli

        self._brotli = brotli.Compressor(quality=level)

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        return self._brotli.process(chunk) + self._brotli.flush()

    def finish(self) -> bytes:
        return self._brotli.finish()


class ZstdFilter(BodyFilter):
    def __init__(self, level: int) -> None:
        import zstandard

        self._flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._zstd = zstandard.ZstdCompressor(level=level).compressobj()

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        return self._zstd.compress(chunk) + self._zstd.flush(self._flush_block)

    def finish(self) -> bytes:
        return self._zstd.flush()


_FILTERS: dict[str, type[BodyFilter]] = {
    "gzip": GzipFilter,
    "br": BrotliFilter,
    "zstd": ZstdFilter,
}


def parse_accept_encoding(value: str) -> dict[str, float]:
    """``{coding: q}`` from an ``Accept-Encoding`` value; malformed q-values count as 0."""
    accepted: dict[str, float] = {}
    for member in split_list(value):
        coding, *params = (part.strip() for part in member.split(";"))
        coding = coding.lower()
        if coding == "x-gzip":
            coding = "gzip"
        q = 1.0
        for param in params:
            key, _, raw = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(raw.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        accepted[coding] = q
    return accepted


def choose_encoding(accept: str | None, algorithms: list[str]) -> str | None:
    """The coding to use: highest client q, ties to server order; None for identity."""
    if not accept:
        return None
    accepted = parse_accept_encoding(accept)
    wildcard = accepted.get("*", 0.0)
    best: str | None = None
    best_q = 0.0
    for algorithm in algorithms:  # server preference order: strict > keeps the earlier
        q = accepted.get(algorithm, wildcard)
        if q > best_q:
            best, best_q = algorithm, q
    return best


class CompressionPlugin(Plugin):
    """Compresses eligible response bodies chunk by chunk (see the module doc)."""

    metadata = PluginMetadata(
        name="compression",
        version="1.0.0",
        description="Streams responses as br, zstd or gzip by the client's Accept-Encoding.",
    )
    Config = CompressionConfig
    config: CompressionConfig

    def configure(self, config: BaseModel) -> None:
        super().configure(config)
        c = self.config
        self.exact_types = frozenset(t for t in c.content_types if "*" not in t)
        self.type_patterns = [t for t in c.content_types if "*" in t]
        self.levels = {a: c.level_for(a) for a in c.algorithms}

    def response_body_filter(self, ctx: RequestContext, response: Response) -> BodyFilter | None:
        if not self._compressible(ctx, response):
            return None
        append_vary(response, "Accept-Encoding")
        coding = choose_encoding(_client_accept(ctx), self.config.algorithms)
        if coding is None:
            return None
        body_filter = _FILTERS[coding](self.levels[coding])
        response.set_header("content-encoding", coding)
        response.remove_header("content-length")
        response.remove_header("accept-ranges")
        etag = response.header("etag")
        if etag is not None and not etag.startswith("W/"):
            response.set_header("etag", "W/" + etag)
        return body_filter

    def _compressible(self, ctx: RequestContext, response: Response) -> bool:
        if ctx.method == "HEAD" or ctx.websocket:
            return False
        if response.status < 200 or response.status in _UNCOMPRESSIBLE_STATUS:
            return False
        media = _media_type(response.header("content-type"))
        if media is None or media == NEVER:
            return False
        if media not in self.exact_types and not any(
            fnmatch.fnmatchcase(media, pattern) for pattern in self.type_patterns
        ):
            return False
        for name, value in response.headers:
            if name in (b"content-encoding", b"content-range"):
                return False
            if name == b"cache-control" and b"no-transform" in value.lower():
                return False
            if name == b"content-length":
                try:
                    if int(value) < self.config.min_size:
                        return False
                except ValueError:
                    return False
        return True


def _client_accept(ctx: RequestContext) -> str | None:
    """``Accept-Encoding`` as the client sent it (it decodes the body, not the upstream).

    Repeated fields are joined, as RFC 9110 allows a list to be split across them.
    """
    values = [v for h, v in ctx.scope.get("headers", ()) if h == b"accept-encoding"]
    return b", ".join(values).decode("latin-1") if values else None


def _media_type(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


PLUGIN = CompressionPlugin
