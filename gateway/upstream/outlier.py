"""Passive outlier ejection: take an endpoint out of rotation after consecutive errors.

Why, next to active health checks and breakers: real traffic finds a broken endpoint
long before the next health probe does, and a health endpoint can answer 200 while the
real routes fail. Like Envoy's ``consecutive_5xx`` detector:

* ``consecutive_errors`` failed attempts in a row eject an endpoint;
* the ejection lasts ``base_ejection * n`` seconds (n = how many times it was ejected,
  so a flapping endpoint stays out longer each time), capped at ``max_ejection``;
  each ``base_ejection`` period it then spends in rotation forgives one past ejection;
* never more than ``max_ejected_percent`` of the upstream's endpoints are out at once:
  passive detection cannot tell "this endpoint is bad" from "the whole upstream is
  overloaded", and ejecting everything would turn a slowdown into a total outage;
* ejected endpoints come back by themselves when their time is up (checked lazily on
  read, so there is no timer task).

``record``, ``is_ejected`` and ``ejected_count`` are O(1) or O(log n) (a heap of
ejection deadlines); state is kept per endpoint by identity.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["OutlierDetector"]

T = TypeVar("T")


class _State:
    __slots__ = ("consecutive", "ejected_until", "returned_at", "times_ejected")

    def __init__(self) -> None:
        self.consecutive = 0
        self.times_ejected = 0
        self.ejected_until = 0.0  # 0: in rotation
        self.returned_at = 0.0


class OutlierDetector(Generic[T]):
    """Consecutive-error ejection for the endpoints of one upstream."""

    def __init__(
        self,
        endpoints: Sequence[T],
        consecutive_errors: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejected_percent: float = 50,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_change: Callable[[T, bool], None] | None = None,
    ) -> None:
        if consecutive_errors < 1:
            raise ValueError("consecutive_errors must be at least 1")
        if base_ejection <= 0 or max_ejection < base_ejection:
            raise ValueError("need 0 < base_ejection <= max_ejection")
        self.consecutive_errors = consecutive_errors
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejected_percent = max_ejected_percent
        self._clock = clock
        self._on_change = on_change
        self._endpoints = tuple(endpoints)
        # Keyed by id(): Endpoint is an unhashable dataclass; the tuple keeps ids alive.
        self._index = {id(endpoint): index for index, endpoint in enumerate(self._endpoints)}
        self._states = [_State() for _ in self._endpoints]
        # How many may be out at once: the percentage of the upstream, rounded down
        # (so a single-endpoint upstream is never ejected: that would only turn its
        # errors into 503s).
        self._max_ejected = int(len(self._endpoints) * max_ejected_percent / 100)
        self._ejected = 0
        self._deadlines: list[tuple[float, int]] = []  # heap of (ejected_until, index)

    @property
    def endpoints(self) -> tuple[T, ...]:
        return self._endpoints

    def carried_over(self, endpoints: Sequence[T]) -> OutlierDetector[T]:
        """A detector for a new endpoint list that keeps the state (consecutive errors,
        ejections and their deadlines) of every endpoint both lists share, by identity.

        Routing tables are rebuilt on every discovery change; without this, any rebuild
        would lift every ejection.
        """
        fresh: OutlierDetector[T] = OutlierDetector(
            endpoints,
            self.consecutive_errors,
            self.base_ejection,
            self.max_ejection,
            self.max_ejected_percent,
            self._clock,
            on_change=self._on_change,
        )
        now = self._clock()
        self._return_due(now)
        for index, endpoint in enumerate(fresh._endpoints):
            old = self._index.get(id(endpoint))
            if old is None:
                continue
            state = self._states[old]
            fresh._states[index] = state
            if state.ejected_until:
                if fresh._ejected < fresh._max_ejected:
                    fresh._ejected += 1
                    heapq.heappush(fresh._deadlines, (state.ejected_until, index))
                else:  # the new list is smaller: the cap wins, the endpoint returns
                    state.ejected_until = 0.0
                    state.returned_at = now
        return fresh

    @property
    def ejected_count(self) -> int:
        """Endpoints out of rotation now."""
        self._return_due(self._clock())
        return self._ejected

    def record(self, endpoint: T, ok: bool) -> None:
        """Report one attempt's outcome. Unknown endpoints (an old table's) are ignored."""
        index = self._index.get(id(endpoint))
        if index is None:
            return
        state = self._states[index]
        if ok:
            state.consecutive = 0
            return
        state.consecutive += 1
        if state.consecutive < self.consecutive_errors:
            return
        now = self._clock()
        self._return_due(now)
        if state.ejected_until:
            return  # already out (an attempt that started before the ejection)
        if self._ejected >= self._max_ejected:
            return  # at the cap: keep counting, eject once another endpoint returns
        self._eject(index, now)

    def is_ejected(self, endpoint: T) -> bool:
        """Whether the endpoint is out of rotation now (it returns by itself when due)."""
        state = self._state(endpoint)
        if state is None or not state.ejected_until:
            return False
        now = self._clock()
        if now < state.ejected_until:
            return True
        self._return_due(now)
        return False

    def ejection_remaining(self, endpoint: T) -> float:
        """Seconds until an ejected endpoint returns (0 when in rotation)."""
        state = self._state(endpoint)
        if state is None or not state.ejected_until:
            return 0.0
        return max(0.0, state.ejected_until - self._clock())

    def times_ejected(self, endpoint: T) -> int:
        """The current ejection multiplier of an endpoint (after forgiveness)."""
        state = self._state(endpoint)
        return 0 if state is None else state.times_ejected

    def _state(self, endpoint: T) -> _State | None:
        index = self._index.get(id(endpoint))
        return None if index is None else self._states[index]

    def _eject(self, index: int, now: float) -> None:
        state = self._states[index]
        if state.times_ejected and state.returned_at:
            # Time spent in rotation since the last return earns forgiveness.
            forgiven = int((now - state.returned_at) / self.base_ejection)
            state.times_ejected = max(0, state.times_ejected - forgiven)
        state.times_ejected += 1
        duration = min(self.base_ejection * state.times_ejected, self.max_ejection)
        state.ejected_until = now + duration
        state.consecutive = 0
        self._ejected += 1
        heapq.heappush(self._deadlines, (state.ejected_until, index))
        if self._on_change is not None:
            self._on_change(self._endpoints[index], True)

    def _return_due(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            until, index = heapq.heappop(deadlines)
            state = self._states[index]
            state.ejected_until = 0.0
            state.returned_at = until  # when it was due back, not when we noticed
            self._ejected -= 1
            if self._on_change is not None:
                self._on_change(self._endpoints[index], False)
