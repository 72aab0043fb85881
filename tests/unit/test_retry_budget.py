"""Retry budget, backoff with jitter, and the sliding window under both."""

from __future__ import annotations

import random

import pytest

from gateway.upstream.retry_budget import RetryBudget, backoff_delay
from gateway.upstream.window import SlidingWindow


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- retry budget ---------------------------------------------------------------------


def test_budget_caps_amplification_when_everything_fails() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries_per_second=3, window=10.0, clock=clock)
    granted = 0
    for _ in range(1000):
        budget.record_request()
        # The request failed; the proxy would retry up to twice.
        for _ in range(2):
            if budget.try_acquire_retry():
                granted += 1
        clock.now += 0.001
    assert granted <= 0.2 * 1000 + 3 * 10
    assert granted >= 0.2 * 1000  # and the budget is actually usable
    assert budget.retries == granted


def test_budget_steady_overload_stays_within_ratio_per_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries_per_second=3, window=10.0, clock=clock)
    granted_per_second = []
    for _ in range(60):  # one minute at 100 req/s, all failing
        granted = 0
        for _ in range(100):
            budget.record_request()
            if budget.try_acquire_retry():
                granted += 1
            clock.now += 0.01
        granted_per_second.append(granted)
    # In any 10 s, at most 20% of ~1000 requests + 30 retries.
    for start in range(len(granted_per_second) - 9):
        assert sum(granted_per_second[start : start + 10]) <= 0.2 * 1000 + 30
    assert sum(granted_per_second) / (60 * 100) < 0.26


def test_floor_allows_retries_at_low_traffic() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries_per_second=3, window=10.0, clock=clock)
    assert sum(budget.try_acquire_retry() for _ in range(100)) == 30
    assert not budget.try_acquire_retry()
    assert budget.available == 0.0


def test_budget_refills_as_the_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=1, window=10.0, clock=clock)
    assert sum(budget.try_acquire_retry() for _ in range(50)) == 10
    clock.now += 10.0
    assert budget.retries == 0
    assert budget.try_acquire_retry()


def test_no_budget_means_no_retries() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0, clock=FakeClock())
    for _ in range(100):
        budget.record_request()
    assert not budget.try_acquire_retry()


def test_budget_grows_with_traffic() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0, window=10.0, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert budget.requests == 10
    assert budget.available == 5.0
    assert sum(budget.try_acquire_retry() for _ in range(10)) == 5


def test_invalid_budget() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=-1)


# -- backoff --------------------------------------------------------------------------


def test_backoff_is_exponential_with_full_jitter() -> None:
    rng = random.Random(11)
    for attempt, ceiling in [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (9, 0.25)]:
        delays = [backoff_delay(attempt, rng=rng) for _ in range(2000)]
        assert all(0.0 <= delay <= ceiling for delay in delays)
        mean = sum(delays) / len(delays)
        assert abs(mean - ceiling / 2) < ceiling * 0.05  # uniform over [0, ceiling]
        assert max(delays) > ceiling * 0.95


def test_backoff_edges() -> None:
    rng = random.Random(12)
    assert 0.0 <= backoff_delay(-3, rng=rng) <= 0.025
    assert 0.0 <= backoff_delay(10_000, rng=rng) <= 0.25  # no overflow
    assert backoff_delay(5, base=1.0, cap=0.0, rng=rng) == 0.0
    assert backoff_delay(2, rng=random.Random(1)) == backoff_delay(2, rng=random.Random(1))
    assert 0.0 <= backoff_delay(1) <= 0.05  # the module's RNG when none is given


# -- sliding window -------------------------------------------------------------------


def test_window_counts_and_expires_by_bucket() -> None:
    clock = FakeClock(0.0)
    window = SlidingWindow(10.0, buckets=10, fields=2, clock=clock)
    window.add(0)
    window.add(1, 5)
    clock.now = 9.99
    window.add(0)
    assert (window.total(0), window.total(1)) == (2, 5)
    clock.now = 10.0  # the first bucket (t in [0, 1)) drops out
    assert (window.total(0), window.total(1)) == (1, 0)
    clock.now = 19.99
    assert window.total(0) == 0
    clock.now = 1_000.0  # a long gap clears everything at once
    window.add(1)
    assert (window.total(0), window.total(1)) == (0, 1)
    window.reset()
    assert window.total(1) == 0


def test_window_tolerates_a_clock_going_backwards() -> None:
    clock = FakeClock(50.0)
    window = SlidingWindow(10.0, clock=clock)
    window.add(0)
    clock.now = 45.0
    window.add(0)
    assert window.total(0) == 2


def test_window_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0.0)
    with pytest.raises(ValueError):
        SlidingWindow(1.0, buckets=0)
