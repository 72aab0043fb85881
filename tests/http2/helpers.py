"""Small helpers shared by the HTTP/2 tests."""

from __future__ import annotations

import time
from collections.abc import Callable


def settled(read: Callable[[], int], *, quiet: float = 0.3, timeout: float = 10.0) -> int:
    """The value of ``read()`` once it has stopped changing for ``quiet`` seconds.

    How a test shows that something is held back (a window that stays shut): there is no
    event for "nothing more happens", only a deadline-bounded quiet period.
    """
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the value never settled"
        time.sleep(0.02)
        current = read()
        if current != value:
            value, since = current, time.monotonic()
    return value
