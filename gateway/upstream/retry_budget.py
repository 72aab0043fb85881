"""Retry budget and backoff: retries that help with blips but cannot multiply an outage.

Why a budget rather than only ``retries: N``: with a fixed count, an upstream that fails
everything receives (1 + N) times its normal load exactly when it can least take it,
and every gateway hop in front multiplies that again. A budget (Finagle, Envoy's
``retry_budget``, gRPC's retry throttling) lets retries be at most ``ratio`` of recent
requests, plus a small floor (``min_retries_per_second``) so that a low-traffic
upstream can still retry its occasional failure.

Counts live in a bucketed sliding window (:class:`~gateway.upstream.window.SlidingWindow`),
so every call is O(1) and allocation-free.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from gateway.upstream.window import SlidingWindow

__all__ = ["RetryBudget", "backoff_delay"]

_REQUESTS = 0
_RETRIES = 1


class RetryBudget:
    """Allows retries while ``retries <= ratio * requests + min_retries_per_second * window``
    over the last ``window`` seconds."""

    __slots__ = ("_floor", "_window", "min_retries_per_second", "ratio")

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries_per_second: float = 3,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        buckets: int = 10,
    ) -> None:
        if ratio < 0 or min_retries_per_second < 0:
            raise ValueError("ratio and min_retries_per_second must not be negative")
        self.ratio = ratio
        self.min_retries_per_second = min_retries_per_second
        self._floor = min_retries_per_second * window
        self._window = SlidingWindow(window, buckets=buckets, fields=2, clock=clock)

    def record_request(self) -> None:
        """Count one client request (once per request, not per attempt: retries are
        counted by :meth:`try_acquire_retry`, and counting them here too would let
        retries earn budget for more retries)."""
        self._window.add(_REQUESTS)

    def try_acquire_retry(self) -> bool:
        """Take one retry from the budget; False means: do not retry, fail now."""
        window = self._window
        allowance = self.ratio * window.total(_REQUESTS) + self._floor
        if window.total(_RETRIES) + 1 > allowance:
            return False
        window.add(_RETRIES)
        return True

    @property
    def requests(self) -> int:
        """Requests counted in the window (for metrics and tests)."""
        return self._window.total(_REQUESTS)

    @property
    def retries(self) -> int:
        """Retries granted in the window."""
        return self._window.total(_RETRIES)

    @property
    def available(self) -> float:
        """Retries still allowed right now (may be fractional)."""
        window = self._window
        allowance = self.ratio * window.total(_REQUESTS) + self._floor
        return max(0.0, allowance - window.total(_RETRIES))


def backoff_delay(
    attempt: int,
    base: float = 0.025,
    cap: float = 0.25,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Exponential with full jitter (uniform in ``[0, min(cap, base * 2**attempt)]``): the
    jitter spreads the retries of many clients that failed together, so they do not hit
    the upstream again in lockstep; the cap keeps a retry inside a request's timeout.
    """
    if attempt < 0:
        attempt = 0
    ceiling = cap if attempt >= 32 else min(cap, base * (1 << attempt))
    uniform = rng.uniform if rng is not None else random.uniform
    return uniform(0.0, ceiling)
