"""Waiting for something to become true, with a deadline (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    predicate: Callable[[], T],
    *,
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str | Callable[[], str] = "",
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or the deadline passes.

    ``message`` may be a callable, evaluated only on failure (to show the last state).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(text or f"condition not met within {timeout}s")
        time.sleep(interval)
