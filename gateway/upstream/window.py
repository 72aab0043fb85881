"""A bucketed sliding-window counter shared by the circuit breaker and the retry budget.

Both need "how many X and Y happened in the last ``window`` seconds" on every request.
Keeping a timestamp per event would cost memory and O(events) expiry; instead time is
cut into ``buckets`` slots of ``window / buckets`` seconds kept in a ring, with running
totals. Advancing the clock clears at most ``buckets`` slots, so every call is O(1)
(bounded by the constant bucket count) and allocates nothing. The price is granularity:
the totals cover between ``window * (buckets - 1) / buckets`` and ``window`` seconds,
the same trade Hystrix and Finagle make.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]


class SlidingWindow:
    """``fields`` counters summed over a sliding time window."""

    __slots__ = ("_clock", "_counts", "_epochs", "_head", "_totals", "_width", "buckets", "window")

    def __init__(
        self,
        window: float,
        *,
        buckets: int = 10,
        fields: int = 2,
        clock: Clock = time.monotonic,
    ) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive (got {window})")
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1 (got {buckets})")
        self.window = float(window)
        self.buckets = buckets
        self._width = self.window / buckets
        self._clock = clock
        # _counts[field][slot]; _epochs[slot] is the absolute bucket number the slot holds.
        self._counts = [[0] * buckets for _ in range(fields)]
        self._totals = [0] * fields
        self._epochs = [-1] * buckets
        self._head = -1  # newest absolute bucket number seen so far

    def _advance(self) -> int:
        """Move the ring to the current bucket, dropping buckets that fell out of the window."""
        epoch = math.floor(self._clock() / self._width)
        head = self._head
        if epoch <= head:
            # Same bucket, or a clock that went backwards: count into the newest bucket.
            return head % self.buckets
        if epoch - head >= self.buckets:
            self._reset_counts()
        else:
            for stale in range(head + 1, epoch + 1):
                self._clear_slot(stale % self.buckets)
        slot = epoch % self.buckets
        self._epochs[slot] = epoch
        self._head = epoch
        return slot

    def _clear_slot(self, slot: int) -> None:
        totals = self._totals
        for index, counts in enumerate(self._counts):
            totals[index] -= counts[slot]
            counts[slot] = 0

    def _reset_counts(self) -> None:
        for counts in self._counts:
            for slot in range(self.buckets):
                counts[slot] = 0
        for index in range(len(self._totals)):
            self._totals[index] = 0

    def add(self, field: int, amount: int = 1) -> None:
        """Count ``amount`` events of kind ``field`` now."""
        slot = self._advance()
        self._counts[field][slot] += amount
        self._totals[field] += amount

    def total(self, field: int) -> int:
        """Events of kind ``field`` within the window, as of now."""
        self._advance()
        return self._totals[field]

    def reset(self) -> None:
        """Forget everything (the breaker does this when it closes again)."""
        self._reset_counts()
