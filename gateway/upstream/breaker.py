"""A per-endpoint circuit breaker: closed → open → half-open → closed.

Why: when an endpoint is failing, every request sent to it costs the client a timeout
or an error and keeps the endpoint from recovering. The breaker stops sending after
clear evidence of failure, waits ``timeout`` seconds, then lets a bounded number of
probe requests through to decide whether to resume.

Evidence of failure is either of:

* ``failure_threshold`` failures in a row (fast trip on a dead endpoint at low traffic);
* within the sliding ``window``, ``failures / total >= failure_ratio`` once at least
  ``min_requests`` results were seen (a steadily degraded endpoint at high traffic,
  where successes in between would keep resetting a consecutive counter).

Probes are leases: each admitted half-open request holds a slot until it reports
(``record_success`` / ``record_failure`` / ``release_probe``). A probe that never
reports (its task was cancelled, a bug) gives its slot back after ``timeout`` seconds,
so the breaker can never stay half-open with every slot taken forever.

Everything is synchronous and O(1); time comes from the injected ``clock``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from gateway.upstream.window import SlidingWindow

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "STATE_CODES", "BreakerSettings", "CircuitBreaker"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"

#: The metric encoding of each state (a gauge: 0 closed, 1 half-open, 2 open).
STATE_CODES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

_TOTAL = 0
_FAILURES = 1


class BreakerSettings(Protocol):
    """What :meth:`CircuitBreaker.from_settings` reads (``CircuitBreakerSettings`` fits)."""

    @property
    def failure_threshold(self) -> int: ...
    @property
    def failure_ratio(self) -> float: ...
    @property
    def min_requests(self) -> int: ...
    @property
    def window(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def half_open_requests(self) -> int: ...


class CircuitBreaker:
    """One endpoint's breaker. Call :meth:`allow` before an attempt, then report it."""

    __slots__ = (
        "_clock",
        "_consecutive",
        "_on_change",
        "_opened_at",
        "_probe_successes",
        "_probes",
        "_state",
        "_window",
        "failure_ratio",
        "failure_threshold",
        "half_open_requests",
        "min_requests",
        "timeout",
    )

    def __init__(
        self,
        failure_threshold: int = 5,
        failure_ratio: float = 0.5,
        min_requests: int = 20,
        window: float = 10.0,
        timeout: float = 60.0,
        half_open_requests: int = 1,
        clock: Callable[[], float] = time.monotonic,
        *,
        buckets: int = 10,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if half_open_requests < 1:
            raise ValueError("half_open_requests must be at least 1")
        if timeout < 0:
            raise ValueError("timeout must not be negative")
        self.failure_threshold = failure_threshold
        self.failure_ratio = failure_ratio
        self.min_requests = min_requests
        self.timeout = timeout
        self.half_open_requests = half_open_requests
        self._clock = clock
        self._on_change = on_change
        self._window = SlidingWindow(window, buckets=buckets, fields=2, clock=clock)
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probes: deque[float] = deque()  # start times of outstanding probes, oldest first
        self._probe_successes = 0

    @classmethod
    def from_settings(
        cls,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str], None] | None = None,
    ) -> CircuitBreaker:
        """Build from a ``CircuitBreakerSettings`` (or anything with the same attributes)."""
        return cls(
            failure_threshold=settings.failure_threshold,
            failure_ratio=settings.failure_ratio,
            min_requests=settings.min_requests,
            window=settings.window,
            timeout=settings.timeout,
            half_open_requests=settings.half_open_requests,
            clock=clock,
            on_change=on_change,
        )

    # -- state -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``, as of now.

        An open breaker whose ``timeout`` has elapsed reads as half-open: the transition
        is time-driven, so the admin API and metrics must not wait for traffic to see it.
        """
        if self._state == OPEN and self._clock() - self._opened_at >= self.timeout:
            self._to_half_open()
        return self._state

    @property
    def state_code(self) -> int:
        """The state as a metric value: 0 closed, 1 half-open, 2 open."""
        return STATE_CODES[self.state]

    @property
    def available(self) -> bool:
        """Whether :meth:`allow` would admit a request now, without taking a probe slot.

        This is what a balancer should read (via ``Endpoint.available``): a balancer
        looks at endpoints it then does not pick, so looking must not claim a probe.
        """
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        self._expire_probes()
        return len(self._probes) < self.half_open_requests

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    @property
    def window_counts(self) -> tuple[int, int]:
        """``(failures, total)`` within the sliding window (for the admin API)."""
        return self._window.total(_FAILURES), self._window.total(_TOTAL)

    @property
    def retry_in(self) -> float:
        """Seconds until an open breaker starts probing (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.timeout - self._clock())

    # -- the request path ------------------------------------------------------------

    def allow(self) -> bool:
        """Whether an attempt may go to this endpoint now; in half-open, takes a probe slot.

        Every True from a half-open breaker must be followed by exactly one of
        record_success, record_failure or release_probe (or the slot expires after
        ``timeout``).
        """
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        self._expire_probes()
        if len(self._probes) >= self.half_open_requests:
            return False
        self._probes.append(self._clock())
        return True

    def record_success(self) -> None:
        """An attempt succeeded (the endpoint answered and the answer was not a failure)."""
        state = self.state
        if state == CLOSED:
            self._consecutive = 0
            self._window.add(_TOTAL)
        elif state == HALF_OPEN:
            if self._probes:
                self._probes.popleft()
            self._probe_successes += 1
            if self._probe_successes >= self.half_open_requests:
                self._to_closed()
        # OPEN: a straggler admitted before the trip; its success proves little, ignore it.

    def record_failure(self) -> None:
        """An attempt failed (connect error, timeout, reset, 5xx as the caller defines)."""
        state = self.state
        if state == CLOSED:
            self._consecutive += 1
            window = self._window
            window.add(_TOTAL)
            window.add(_FAILURES)
            if self._consecutive >= self.failure_threshold:
                self._to_open()
                return
            total = window.total(_TOTAL)
            if (
                total > 0
                and total >= self.min_requests
                and window.total(_FAILURES) >= self.failure_ratio * total
            ):
                self._to_open()
        elif state == HALF_OPEN:
            self._to_open()
        # OPEN: a straggler; restarting the timer for it would only delay recovery.

    def release_probe(self) -> None:
        """Give back a half-open probe slot without a verdict (e.g. the client left first)."""
        if self._state == HALF_OPEN and self._probes:
            self._probes.popleft()

    def reset(self) -> None:
        """Force the breaker closed with an empty window (admin action, tests)."""
        self._to_closed()

    # -- transitions -----------------------------------------------------------------

    def _expire_probes(self) -> None:
        probes = self._probes
        if probes:
            oldest_allowed = self._clock() - self.timeout
            while probes and probes[0] <= oldest_allowed:
                probes.popleft()

    def _to_open(self) -> None:
        previous = self._state
        self._state = OPEN
        self._opened_at = self._clock()
        self._probes.clear()
        self._probe_successes = 0
        self._changed(previous, OPEN)

    def _to_half_open(self) -> None:
        previous = self._state
        self._state = HALF_OPEN
        self._probes.clear()
        self._probe_successes = 0
        self._changed(previous, HALF_OPEN)

    def _to_closed(self) -> None:
        previous = self._state
        self._state = CLOSED
        self._consecutive = 0
        self._probes.clear()
        self._probe_successes = 0
        self._window.reset()
        self._changed(previous, CLOSED)

    def _changed(self, previous: str, current: str) -> None:
        if previous != current and self._on_change is not None:
            self._on_change(previous, current)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state} consecutive={self._consecutive}>"
