"""Circuit breaker: every transition, driven by a fake clock."""

from __future__ import annotations

import pytest

from gateway.upstream.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def breaker(clock: FakeClock, **options: object) -> CircuitBreaker:
    settings: dict[str, object] = {
        "failure_threshold": 5,
        "failure_ratio": 0.5,
        "min_requests": 20,
        "window": 10.0,
        "timeout": 60.0,
        "half_open_requests": 1,
    }
    settings.update(options)
    return CircuitBreaker(clock=clock, **settings)  # type: ignore[arg-type]


def tripped(clock: FakeClock, **options: object) -> CircuitBreaker:
    cb = breaker(clock, **options)
    for _ in range(cb.failure_threshold):
        cb.record_failure()
    assert cb.state == OPEN
    return cb


def to_half_open(clock: FakeClock, **options: object) -> CircuitBreaker:
    cb = tripped(clock, **options)
    clock.advance(cb.timeout)
    assert cb.state == HALF_OPEN
    return cb


# -- closed ---------------------------------------------------------------------------


def test_starts_closed_and_allows(clock: FakeClock) -> None:
    cb = breaker(clock)
    assert cb.state == CLOSED
    assert cb.state_code == 0
    assert cb.available
    assert all(cb.allow() for _ in range(100))


def test_closed_stays_closed_on_success(clock: FakeClock) -> None:
    cb = breaker(clock)
    for _ in range(1000):
        assert cb.allow()
        cb.record_success()
    assert cb.state == CLOSED
    assert cb.window_counts == (0, 1000)


def test_closed_to_open_on_consecutive_failures(clock: FakeClock) -> None:
    cb = breaker(clock, failure_threshold=5)
    for _ in range(4):
        cb.record_failure()
    assert cb.state == CLOSED
    assert cb.consecutive_failures == 4
    cb.record_failure()
    assert cb.state == OPEN
    assert cb.state_code == 2
    assert not cb.allow()
    assert not cb.available


def test_a_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    cb = breaker(clock, failure_threshold=5, min_requests=1000)
    for _ in range(10):
        for _ in range(4):
            cb.record_failure()
        cb.record_success()
    assert cb.state == CLOSED
    assert cb.consecutive_failures == 0


def test_closed_to_open_on_failure_ratio(clock: FakeClock) -> None:
    cb = breaker(clock, failure_threshold=100, failure_ratio=0.5, min_requests=20)
    for _ in range(9):
        cb.record_failure()
        cb.record_success()
    assert cb.state == CLOSED  # 9 of 18: not enough requests yet
    cb.record_success()
    assert cb.state == CLOSED  # successes never trip
    cb.record_failure()  # 10 of 20 = 0.5 with 20 requests
    assert cb.state == OPEN


def test_ratio_needs_min_requests(clock: FakeClock) -> None:
    cb = breaker(clock, failure_threshold=100, failure_ratio=0.5, min_requests=20)
    for _ in range(19):
        cb.record_failure()
        clock.advance(0.01)
    assert cb.state == CLOSED  # 100% failures, but only 19 results
    cb.record_failure()
    assert cb.state == OPEN


def test_ratio_below_threshold_stays_closed(clock: FakeClock) -> None:
    cb = breaker(clock, failure_threshold=100, failure_ratio=0.5, min_requests=20)
    for i in range(500):
        if i % 5 < 2:  # 40% failures
            cb.record_failure()
        else:
            cb.record_success()
        clock.advance(0.01)
    assert cb.state == CLOSED


def test_old_failures_leave_the_window(clock: FakeClock) -> None:
    def loaded() -> CircuitBreaker:
        cb = breaker(clock, failure_threshold=100, min_requests=10, window=10.0)
        for _ in range(5):
            cb.record_failure()
        for _ in range(4):
            cb.record_success()
        return cb

    fresh = loaded()
    fresh.record_failure()  # 6 of 10 within the window
    assert fresh.state == OPEN

    stale = loaded()
    clock.advance(10.5)  # all of the above is older than the window now
    stale.record_failure()
    assert stale.state == CLOSED
    assert stale.window_counts == (1, 1)


def test_window_slides_bucket_by_bucket(clock: FakeClock) -> None:
    cb = breaker(clock, failure_threshold=100, min_requests=1000, window=10.0)
    for _ in range(10):  # one success per second
        cb.record_success()
        clock.advance(1.0)
    # 10 one-second buckets: at t=10 the bucket of t=0 has just been recycled.
    assert cb.window_counts == (0, 9)
    clock.advance(5.0)
    assert cb.window_counts == (0, 4)  # only t=6..9 remain
    clock.advance(10.0)
    assert cb.window_counts == (0, 0)


def test_min_requests_zero_trips_on_the_ratio_at_once(clock: FakeClock) -> None:
    cb = breaker(clock, failure_threshold=100, min_requests=0, failure_ratio=0.5)
    cb.record_failure()
    assert cb.state == OPEN


# -- open -----------------------------------------------------------------------------


def test_open_refuses_until_timeout(clock: FakeClock) -> None:
    cb = tripped(clock, timeout=60.0)
    clock.advance(59.9)
    assert not cb.allow()
    assert cb.state == OPEN
    assert cb.retry_in == pytest.approx(0.1)


def test_open_to_half_open_after_timeout_via_allow(clock: FakeClock) -> None:
    cb = tripped(clock, timeout=60.0)
    clock.advance(60.0)
    assert cb.allow()  # the first probe
    assert cb.state == HALF_OPEN
    assert cb.state_code == 1


def test_open_to_half_open_is_visible_without_traffic(clock: FakeClock) -> None:
    cb = tripped(clock, timeout=60.0)
    clock.advance(61.0)
    assert cb.state == HALF_OPEN  # the admin API and metrics see it
    assert cb.retry_in == 0.0


def test_open_ignores_stragglers(clock: FakeClock) -> None:
    cb = tripped(clock, timeout=60.0)
    clock.advance(30.0)
    cb.record_failure()  # a request admitted before the trip
    cb.record_success()
    assert cb.state == OPEN
    clock.advance(30.0)  # the timer was not restarted by the straggler
    assert cb.state == HALF_OPEN


# -- half-open ------------------------------------------------------------------------


def test_half_open_admits_a_bounded_number_of_probes(clock: FakeClock) -> None:
    cb = to_half_open(clock, half_open_requests=2)
    assert cb.allow()
    assert cb.available
    assert cb.allow()
    assert not cb.available
    assert not cb.allow()
    assert cb.state == HALF_OPEN


def test_available_does_not_take_a_probe_slot(clock: FakeClock) -> None:
    cb = to_half_open(clock, half_open_requests=1)
    assert all(cb.available for _ in range(10))
    assert cb.allow()
    assert not cb.available


def test_half_open_to_closed_when_all_probes_succeed(clock: FakeClock) -> None:
    cb = to_half_open(clock, half_open_requests=2)
    assert cb.allow() and cb.allow()
    cb.record_success()
    assert cb.state == HALF_OPEN  # one of two
    cb.record_success()
    assert cb.state == CLOSED
    assert cb.state_code == 0
    assert cb.window_counts == (0, 0)  # a clean slate: old failures do not re-trip it
    assert cb.consecutive_failures == 0
    assert cb.allow()


def test_half_open_success_frees_a_slot_for_the_next_probe(clock: FakeClock) -> None:
    cb = to_half_open(clock, half_open_requests=2)
    assert cb.allow() and cb.allow()
    assert not cb.allow()
    cb.record_success()
    assert cb.allow()  # the second success is still needed
    cb.record_success()
    assert cb.state == CLOSED


def test_half_open_to_open_on_probe_failure_restarts_the_timer(clock: FakeClock) -> None:
    cb = to_half_open(clock, half_open_requests=3, timeout=60.0)
    assert cb.allow() and cb.allow()
    cb.record_success()
    cb.record_failure()
    assert cb.state == OPEN
    assert not cb.allow()
    clock.advance(59.0)
    assert cb.state == OPEN
    clock.advance(1.0)
    assert cb.state == HALF_OPEN
    assert cb.allow()  # slots were reset with the new half-open period


def test_half_open_probe_that_never_reports_expires(clock: FakeClock) -> None:
    cb = to_half_open(clock, half_open_requests=1, timeout=60.0)
    assert cb.allow()  # this probe's task dies without reporting
    assert not cb.allow()
    clock.advance(59.0)
    assert not cb.allow()
    clock.advance(1.0)
    assert cb.allow()  # the slot came back: the breaker is not stuck
    assert cb.state == HALF_OPEN
    cb.record_success()
    assert cb.state == CLOSED


def test_release_probe_frees_the_slot_without_a_verdict(clock: FakeClock) -> None:
    cb = to_half_open(clock, half_open_requests=1)
    assert cb.allow()
    cb.release_probe()
    assert cb.state == HALF_OPEN
    assert cb.allow()
    cb.release_probe()
    cb.release_probe()  # extra releases are harmless
    assert cb.allow()
    assert not cb.allow()


def test_release_probe_is_a_no_op_when_closed(clock: FakeClock) -> None:
    cb = breaker(clock)
    cb.release_probe()
    assert cb.state == CLOSED and cb.allow()


# -- the whole cycle, callbacks, construction -----------------------------------------


def test_full_cycle_reports_every_change(clock: FakeClock) -> None:
    changes: list[tuple[str, str]] = []
    cb = CircuitBreaker(
        failure_threshold=2, timeout=5.0, clock=clock, on_change=lambda *c: changes.append(c)
    )
    cb.record_failure()
    cb.record_failure()
    clock.advance(5.0)
    assert cb.allow()
    cb.record_failure()  # probe failed
    clock.advance(5.0)
    assert cb.allow()
    cb.record_success()
    assert changes == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_reset_forces_closed(clock: FakeClock) -> None:
    cb = tripped(clock)
    cb.reset()
    assert cb.state == CLOSED
    assert cb.allow()


def test_from_settings(clock: FakeClock) -> None:
    from settings.upstreams import CircuitBreakerSettings

    settings = CircuitBreakerSettings(failure_threshold=3, timeout=7.0, half_open_requests=2)
    cb = CircuitBreaker.from_settings(settings, clock=clock)
    assert (cb.failure_threshold, cb.timeout, cb.half_open_requests) == (3, 7.0, 2)
    assert (cb.failure_ratio, cb.min_requests) == (0.5, 20)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(half_open_requests=0)
    with pytest.raises(ValueError):
        CircuitBreaker(window=0)
