"""Helpers of the WebSocket tests: gateway URLs, waiting for a close, polling with a
deadline."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed


def ws_url(base: str, target: str = "/chat") -> str:
    """``http://host:port`` + ``target`` as a ``ws://`` URL."""
    return base.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + target


async def until(
    predicate: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str = "",
) -> Any:
    """Poll ``predicate`` (a function or a coroutine function) on the test's event loop,
    which keeps serving the clients' connections meanwhile, until it is truthy; its value,
    or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def closed(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """Read (and drop) messages until the session ends; the close code and reason the
    client received. TimeoutError if it is still open after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed:
        return ws.close_code, ws.close_reason
