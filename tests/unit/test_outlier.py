"""Passive outlier ejection: thresholds, growing periods, the ejection cap."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.upstream.outlier import OutlierDetector


@dataclass  # eq=True and unhashable, like upstream.Endpoint
class Node:
    url: str


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def fail(detector: OutlierDetector[Node], node: Node, times: int) -> None:
    for _ in range(times):
        detector.record(node, False)


def test_ejects_after_consecutive_errors(clock: FakeClock) -> None:
    a, b = Node("a"), Node("b")
    detector = OutlierDetector([a, b], consecutive_errors=5, clock=clock)
    fail(detector, a, 4)
    assert not detector.is_ejected(a)
    fail(detector, a, 1)
    assert detector.is_ejected(a)
    assert not detector.is_ejected(b)
    assert detector.ejected_count == 1


def test_a_success_resets_the_count(clock: FakeClock) -> None:
    a, b = Node("a"), Node("b")
    detector = OutlierDetector([a, b], consecutive_errors=3, clock=clock)
    for _ in range(10):
        fail(detector, a, 2)
        detector.record(a, True)
    assert not detector.is_ejected(a)


def test_returns_by_itself_after_the_period(clock: FakeClock) -> None:
    a, b = Node("a"), Node("b")
    detector = OutlierDetector([a, b], consecutive_errors=1, base_ejection=30.0, clock=clock)
    fail(detector, a, 1)
    clock.now += 29.9
    assert detector.is_ejected(a)
    assert detector.ejection_remaining(a) == pytest.approx(0.1)
    clock.now += 0.1
    assert not detector.is_ejected(a)
    assert detector.ejected_count == 0
    assert detector.ejection_remaining(a) == 0.0


def test_periods_grow_with_each_ejection_and_are_capped(clock: FakeClock) -> None:
    a, b = Node("a"), Node("b")
    detector = OutlierDetector(
        [a, b], consecutive_errors=1, base_ejection=30.0, max_ejection=100.0, clock=clock
    )
    periods = []
    for _ in range(5):
        fail(detector, a, 1)  # ejected the moment it is back and fails again
        periods.append(detector.ejection_remaining(a))
        clock.now += periods[-1]
        assert not detector.is_ejected(a)
    assert periods == [30.0, 60.0, 90.0, 100.0, 100.0]
    assert detector.times_ejected(a) == 5


def test_time_in_rotation_forgives_past_ejections(clock: FakeClock) -> None:
    a, b = Node("a"), Node("b")
    detector = OutlierDetector([a, b], consecutive_errors=1, base_ejection=10.0, clock=clock)
    for _ in range(3):
        fail(detector, a, 1)
        clock.now += detector.ejection_remaining(a)
    assert detector.times_ejected(a) == 3
    clock.now += 25.0  # two full base periods healthy: two ejections forgiven
    fail(detector, a, 1)
    assert detector.times_ejected(a) == 2
    assert detector.ejection_remaining(a) == 20.0


def test_never_more_than_max_percent_ejected(clock: FakeClock) -> None:
    endpoints = [Node(str(i)) for i in range(4)]
    detector = OutlierDetector(
        endpoints, consecutive_errors=2, base_ejection=30.0, max_ejected_percent=50, clock=clock
    )
    for node in endpoints:
        fail(detector, node, 10)  # the whole upstream is failing
    assert detector.ejected_count == 2
    assert [detector.is_ejected(node) for node in endpoints] == [True, True, False, False]
    # When the first two return, the ones still failing can take their places.
    clock.now += 30.0
    fail(detector, endpoints[2], 1)
    assert detector.is_ejected(endpoints[2])
    assert detector.ejected_count == 1


def test_single_endpoint_is_never_ejected(clock: FakeClock) -> None:
    only = Node("only")
    detector = OutlierDetector([only], consecutive_errors=1, clock=clock)
    fail(detector, only, 100)
    assert not detector.is_ejected(only)
    full = OutlierDetector([only], consecutive_errors=1, max_ejected_percent=100, clock=clock)
    fail(full, only, 1)
    assert full.is_ejected(only)  # unless the operator asks for it


def test_errors_while_ejected_do_not_extend_the_ejection(clock: FakeClock) -> None:
    a, b = Node("a"), Node("b")
    detector = OutlierDetector([a, b], consecutive_errors=2, base_ejection=30.0, clock=clock)
    fail(detector, a, 2)
    clock.now += 10.0
    fail(detector, a, 5)  # requests that were already in flight
    assert detector.ejection_remaining(a) == 20.0
    assert detector.times_ejected(a) == 1


def test_identity_not_equality_and_unknown_endpoints(clock: FakeClock) -> None:
    a, twin = Node("same"), Node("same")
    other = Node("other")
    detector = OutlierDetector([a, twin, other], consecutive_errors=1, clock=clock)
    fail(detector, a, 1)
    assert detector.is_ejected(a)
    assert not detector.is_ejected(twin)
    stranger = Node("from-an-old-table")
    fail(detector, stranger, 10)
    assert not detector.is_ejected(stranger)
    assert detector.ejected_count == 1


def test_on_change_reports_ejection_and_return(clock: FakeClock) -> None:
    a, b = Node("a"), Node("b")
    changes: list[tuple[str, bool]] = []
    detector = OutlierDetector(
        [a, b],
        consecutive_errors=1,
        base_ejection=5.0,
        clock=clock,
        on_change=lambda node, ejected: changes.append((node.url, ejected)),
    )
    fail(detector, a, 1)
    clock.now += 5.0
    assert detector.ejected_count == 0
    assert changes == [("a", True), ("a", False)]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        OutlierDetector([], consecutive_errors=0)
    with pytest.raises(ValueError):
        OutlierDetector([], base_ejection=10.0, max_ejection=5.0)
