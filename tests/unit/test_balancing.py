"""Load balancers: distributions, availability, exclusion, hash ring stability, EWMA."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from gateway.upstream.balancing import (
    BALANCERS,
    ConsistentHash,
    LeastConn,
    PeakEwma,
    PowerOfTwoEwma,
    WeightedRoundRobin,
    hash_key,
    key_extractor,
    make_balancer,
    update_ewma,
)

PICKS = 10_000


@dataclass  # eq=True like upstream.Endpoint: balancers must compare by identity
class Node:
    url: str
    weight: int = 100
    in_flight: int = 0
    ewma_ms: float = 0.0
    available: bool = True


def nodes(*names: str, **weights: int) -> list[Node]:
    return [Node(f"http://{name}", weight=weights.get(name, 100)) for name in names]


def spread(balancer, picks: int = PICKS, **kwargs) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(picks):
        chosen = balancer.pick(**kwargs)
        counts[chosen.url if chosen is not None else None] += 1
    return counts


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- behaviour shared by every algorithm ----------------------------------------------


@pytest.mark.parametrize("kind", BALANCERS)
def test_none_when_nothing_is_available(kind: str) -> None:
    endpoints = nodes("a", "b", "c")
    for endpoint in endpoints:
        endpoint.available = False
    balancer = make_balancer(kind, endpoints)
    assert balancer.pick() is None
    assert balancer.pick("some-key") is None
    assert make_balancer(kind, []).pick() is None


@pytest.mark.parametrize("kind", BALANCERS)
def test_weight_zero_and_unavailable_are_never_picked(kind: str) -> None:
    endpoints = nodes("a", "b", "c", "d", b=0)
    endpoints[2].available = False
    balancer = make_balancer(kind, endpoints)
    counts = spread(balancer, 2000)
    counts.update(balancer.pick(f"key-{i}").url for i in range(2000))  # keyed picks too
    assert set(counts) == {"http://a", "http://d"}


@pytest.mark.parametrize("kind", BALANCERS)
def test_exclude_is_avoided_while_another_endpoint_exists(kind: str) -> None:
    endpoints = nodes("a", "b", "c")
    balancer = make_balancer(kind, endpoints)
    for i in range(300):
        chosen = balancer.pick(f"key-{i}", exclude=[endpoints[0], endpoints[1]])
        assert chosen is endpoints[2]


@pytest.mark.parametrize("kind", BALANCERS)
def test_exclude_falls_back_when_only_excluded_remain(kind: str) -> None:
    endpoints = nodes("a", "b")
    endpoints[1].available = False
    balancer = make_balancer(kind, endpoints)
    # The only available endpoint was already tried: retrying it beats failing.
    assert balancer.pick("k", exclude=[endpoints[0]]) is endpoints[0]
    assert balancer.pick(None, exclude=[endpoints[0]]) is endpoints[0]


@pytest.mark.parametrize("kind", BALANCERS)
def test_exclude_compares_by_identity_not_equality(kind: str) -> None:
    twin_a = Node("http://same")
    twin_b = Node("http://same")
    assert twin_a == twin_b  # dataclass equality, as with upstream.Endpoint
    balancer = make_balancer(kind, [twin_a, twin_b], identity=lambda n: str(id(n)))
    for i in range(200):
        assert balancer.pick(f"key-{i}", exclude=[twin_a]) is twin_b


@pytest.mark.parametrize("kind", BALANCERS)
def test_single_endpoint(kind: str) -> None:
    only = Node("http://only")
    balancer = make_balancer(kind, [only])
    assert all(balancer.pick(f"k{i}") is only for i in range(50))
    only.available = False
    assert balancer.pick("k") is None


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown load_balance"):
        make_balancer("random", nodes("a"))


def test_every_configurable_kind_is_buildable() -> None:
    from settings.upstreams import LOAD_BALANCERS

    assert set(LOAD_BALANCERS) == set(BALANCERS)
    for kind in LOAD_BALANCERS:
        assert make_balancer(kind, nodes("a")).kind == kind


# -- round-robin ----------------------------------------------------------------------


def test_round_robin_is_exactly_even_and_in_order() -> None:
    endpoints = nodes("a", "b", "c", "d")
    balancer = make_balancer("round-robin", endpoints)
    assert [balancer.pick().url for _ in range(8)] == [e.url for e in endpoints] * 2
    counts = spread(balancer)
    assert set(counts.values()) == {PICKS // 4}


def test_round_robin_skips_unavailable_and_resumes_when_back() -> None:
    endpoints = nodes("a", "b", "c")
    balancer = make_balancer("round-robin", endpoints)
    endpoints[1].available = False
    counts = spread(balancer, 1000)
    assert counts == {"http://a": 500, "http://c": 500}
    endpoints[1].available = True
    assert spread(balancer, 999) == {"http://a": 333, "http://b": 333, "http://c": 333}


# -- weighted -------------------------------------------------------------------------


def test_weighted_80_20_within_two_percent() -> None:
    balancer = make_balancer("weighted", nodes("a", "b", a=80, b=20))
    counts = spread(balancer)
    assert abs(counts["http://a"] / PICKS - 0.8) <= 0.02
    assert abs(counts["http://b"] / PICKS - 0.2) <= 0.02
    assert counts == {"http://a": 8000, "http://b": 2000}  # in fact exact


def test_weighted_is_smooth_like_nginx() -> None:
    # nginx's documented example: weights 5, 1, 1 give a a b a c a a, not a a a a a b c.
    balancer = make_balancer("weighted", nodes("a", "b", "c", a=5, b=1, c=1))
    assert [balancer.pick().url[-1] for _ in range(14)] == list("aabacaa" * 2)


def test_weighted_three_way_ratios_are_exact() -> None:
    balancer = make_balancer("weighted", nodes("a", "b", "c", a=50, b=30, c=20))
    assert spread(balancer) == {"http://a": 5000, "http://b": 3000, "http://c": 2000}


def test_weighted_keeps_ratios_among_the_available() -> None:
    endpoints = nodes("a", "b", "c", a=50, b=30, c=20)
    balancer = make_balancer("weighted", endpoints)
    endpoints[2].available = False
    counts = spread(balancer)
    # a:b must stay 5:3 while c's share is handed out.
    assert abs(counts["http://a"] / PICKS - 5 / 8) <= 0.02
    assert abs(counts["http://b"] / PICKS - 3 / 8) <= 0.02


def test_weighted_big_cycle_uses_the_heap_builder_with_exact_counts() -> None:
    rng = random.Random(7)
    endpoints = [Node(f"http://n{i}", weight=rng.randint(1, 100)) for i in range(700)]
    balancer = WeightedRoundRobin(endpoints)
    cycle = balancer.cycle
    total = sum(e.weight for e in endpoints)
    length = len(cycle)
    assert length * len(endpoints) > WeightedRoundRobin.NGINX_BUILD_LIMIT
    counts = Counter(id(e) for e in cycle)
    scale = total // length
    assert all(counts[id(e)] * scale == e.weight for e in endpoints)


def test_weighted_equal_weights_cycle_is_short() -> None:
    balancer = WeightedRoundRobin(nodes("a", "b", "c"))
    assert [e.url for e in balancer.cycle] == ["http://a", "http://b", "http://c"]


# -- least-conn -----------------------------------------------------------------------


def test_least_conn_prefers_idle_endpoints() -> None:
    endpoints = nodes("a", "b", "c")
    endpoints[0].in_flight = 5
    endpoints[2].in_flight = 3
    balancer = make_balancer("least-conn", endpoints)
    assert all(balancer.pick() is endpoints[1] for _ in range(100))


def test_least_conn_ties_rotate() -> None:
    balancer = make_balancer("least-conn", nodes("a", "b", "c", "d"))
    counts = spread(balancer)
    assert all(abs(count / PICKS - 0.25) <= 0.02 for count in counts.values())


def test_least_conn_busy_ties_rotate_too() -> None:
    endpoints = nodes("a", "b", "c", "d")
    for endpoint in endpoints:
        endpoint.in_flight = 7
    endpoints[3].in_flight = 9
    counts = spread(make_balancer("least-conn", endpoints))
    assert "http://d" not in counts
    assert all(abs(count / PICKS - 1 / 3) <= 0.02 for count in counts.values())


def test_least_conn_respects_weights_as_in_flight_per_weight() -> None:
    endpoints = nodes("a", "b", a=100, b=50)
    balancer = make_balancer("least-conn", endpoints)
    endpoints[0].in_flight = 3  # 0.03 per unit of weight
    endpoints[1].in_flight = 1  # 0.02
    assert balancer.pick() is endpoints[1]
    endpoints[1].in_flight = 2  # 0.04
    assert balancer.pick() is endpoints[0]


def test_least_conn_idle_mixed_weights_follow_the_weights() -> None:
    balancer = make_balancer("least-conn", nodes("a", "b", a=80, b=20))
    counts = spread(balancer)  # nobody is ever busy: ties all the way
    assert abs(counts["http://a"] / PICKS - 0.8) <= 0.02


def test_least_conn_under_load_sends_less_to_the_slow_endpoint() -> None:
    # A request occupies its endpoint for a number of ticks: 1 on fast, 10 on slow.
    endpoints = nodes("fast", "slow")
    duration = {"http://fast": 1, "http://slow": 10}
    balancer = make_balancer("least-conn", endpoints)
    running: list[tuple[int, Node]] = []
    counts: Counter[str] = Counter()
    for tick in range(PICKS):
        for done in [item for item in running if item[0] <= tick]:
            running.remove(done)
            done[1].in_flight -= 1
        for _ in range(3):  # three new requests per tick
            chosen = balancer.pick()
            chosen.in_flight += 1
            counts[chosen.url] += 1
            running.append((tick + duration[chosen.url], chosen))
    assert counts["http://fast"] > 2 * counts["http://slow"]


def test_least_conn_ties_skip_excluded() -> None:
    endpoints = nodes("a", "b", "c", a=80, b=20, c=50)
    balancer = LeastConn(endpoints)
    counts = spread(balancer, 1000, exclude=[endpoints[2]])
    assert set(counts) == {"http://a", "http://b"}


# -- p2c-ewma -------------------------------------------------------------------------


def test_p2c_prefers_the_fast_endpoint_clearly() -> None:
    endpoints = nodes("fast", "slow1", "slow2")
    endpoints[0].ewma_ms = 10.0
    endpoints[1].ewma_ms = endpoints[2].ewma_ms = 100.0
    balancer = make_balancer("p2c-ewma", endpoints, rng=random.Random(1))
    counts = spread(balancer)
    # The fast one is in 2 of 3 random pairs and wins each of them.
    assert counts["http://fast"] / PICKS > 0.6
    two = nodes("fast", "slow")
    two[0].ewma_ms, two[1].ewma_ms = 10.0, 100.0
    assert spread(make_balancer("p2c-ewma", two, rng=random.Random(2)), 1000) == {
        "http://fast": 1000
    }


def test_p2c_counts_in_flight_as_queueing() -> None:
    endpoints = nodes("fast", "slow")
    endpoints[0].ewma_ms, endpoints[0].in_flight = 10.0, 20  # 10 * 21 = 210
    endpoints[1].ewma_ms, endpoints[1].in_flight = 100.0, 0  # 100 * 1 = 100
    balancer = make_balancer("p2c-ewma", endpoints, rng=random.Random(3))
    assert balancer.pick() is endpoints[1]


def test_p2c_spreads_evenly_when_equal() -> None:
    balancer = make_balancer("p2c-ewma", nodes("a", "b", "c", "d"), rng=random.Random(4))
    counts = spread(balancer)
    assert all(abs(count / PICKS - 0.25) <= 0.02 for count in counts.values())


def test_p2c_is_reproducible_with_a_seed() -> None:
    def sequence(seed: int) -> list[str]:
        endpoints = nodes("a", "b", "c", "d", "e")
        balancer = make_balancer("p2c-ewma", endpoints, rng=random.Random(seed))
        return [balancer.pick().url for _ in range(200)]

    assert sequence(42) == sequence(42)
    assert sequence(42) != sequence(43)


def test_p2c_does_not_flood_an_unmeasured_endpoint() -> None:
    endpoints = nodes("warm", "new")
    endpoints[0].ewma_ms = 50.0
    balancer = PowerOfTwoEwma(endpoints, rng=random.Random(5))
    assert balancer.pick() is endpoints[1]  # idle and unmeasured: worth trying
    endpoints[1].in_flight = 1  # busy, still no sample: the penalty applies
    assert balancer.pick() is endpoints[0]


def test_p2c_finds_the_last_available_endpoint() -> None:
    endpoints = [Node(f"http://n{i}", available=False) for i in range(50)]
    endpoints[37].available = True
    balancer = make_balancer("p2c-ewma", endpoints, rng=random.Random(6))
    assert all(balancer.pick() is endpoints[37] for _ in range(100))


def test_p2c_weights_scale_the_cost() -> None:
    endpoints = nodes("heavy", "light", heavy=100, light=10)
    endpoints[0].ewma_ms = endpoints[1].ewma_ms = 20.0
    balancer = make_balancer("p2c-ewma", endpoints, rng=random.Random(8))
    assert spread(balancer, 500) == {"http://heavy": 500}


# -- consistent-hash ------------------------------------------------------------------

KEYS = [f"user-{i}" for i in range(PICKS)]


def ring_of(endpoints: list[Node]) -> ConsistentHash[Node]:
    balancer = make_balancer("consistent-hash", endpoints, "header:x-user")
    assert isinstance(balancer, ConsistentHash)
    return balancer


def mapping(balancer: ConsistentHash[Node]) -> dict[str, str]:
    return {key: balancer.pick(key).url for key in KEYS}


def test_hash_same_key_same_endpoint() -> None:
    endpoints = nodes("a", "b", "c", "d", "e")
    first = mapping(ring_of(endpoints))
    assert mapping(ring_of(endpoints)) == first
    # Built in another order (another worker, another discovery sync): same answers.
    assert mapping(ring_of(list(reversed(endpoints)))) == first
    counts = Counter(first.values())
    assert len(counts) == 5
    assert all(0.1 < count / PICKS < 0.3 for count in counts.values())


def test_hash_removing_one_of_five_moves_only_its_keys() -> None:
    endpoints = nodes("a", "b", "c", "d", "e")
    before = mapping(ring_of(endpoints))
    removed = endpoints.pop(2)
    after = mapping(ring_of(endpoints))
    moved = {key for key in KEYS if before[key] != after[key]}
    assert len(moved) / PICKS < 0.30
    assert moved == {key for key in KEYS if before[key] == removed.url}


def test_hash_adding_an_endpoint_takes_keys_only_for_itself() -> None:
    endpoints = nodes("a", "b", "c", "d")
    before = mapping(ring_of(endpoints))
    after = mapping(ring_of([*endpoints, Node("http://e")]))
    moved = {key for key in KEYS if before[key] != after[key]}
    assert all(after[key] == "http://e" for key in moved)
    assert len(moved) / PICKS < 0.30


def test_hash_unavailable_owner_walks_to_where_removal_would_send_it() -> None:
    endpoints = nodes("a", "b", "c", "d", "e")
    balancer = ring_of(endpoints)
    before = mapping(balancer)
    endpoints[1].available = False
    during = mapping(balancer)
    without = mapping(ring_of([e for e in endpoints if e.url != "http://b"]))
    assert during == without
    assert {k for k in KEYS if before[k] != during[k]} == {
        k for k in KEYS if before[k] == "http://b"
    }
    endpoints[1].available = True
    assert mapping(balancer) == before  # and the keys go home


def test_hash_excluded_owner_goes_to_the_next_distinct_endpoint() -> None:
    endpoints = nodes("a", "b", "c")
    balancer = ring_of(endpoints)
    for key in KEYS[:500]:
        owner = balancer.pick(key)
        retry = balancer.pick(key, exclude=[owner])
        assert retry is not None and retry is not owner
        assert retry is balancer.pick(key, exclude=[owner])  # stable too


def test_hash_walk_survives_most_endpoints_down() -> None:
    endpoints = [Node(f"http://n{i}") for i in range(40)]
    balancer = ring_of(endpoints)
    for endpoint in endpoints[:-1]:
        endpoint.available = False
    assert all(balancer.pick(key) is endpoints[-1] for key in KEYS[:300])
    endpoints[-1].available = False
    assert balancer.pick("anything") is None


def test_hash_without_key_falls_back_to_round_robin() -> None:
    balancer = ring_of(nodes("a", "b", "c", "d"))
    counts = spread(balancer, 1000, key=None)
    assert set(counts.values()) == {250}


def test_hash_virtual_nodes_scale_with_weight() -> None:
    balancer = ring_of(nodes("a", "b", "c", a=100, b=50, c=0))
    assert balancer.ring_size == 160 + 80
    counts = Counter(mapping(balancer).values())
    assert "http://c" not in counts
    assert abs(counts["http://a"] / PICKS - 2 / 3) < 0.06


def test_hash_needs_an_identity() -> None:
    @dataclass
    class Anonymous:
        weight: int = 100
        in_flight: int = 0
        ewma_ms: float = 0.0
        available: bool = True

    with pytest.raises(TypeError, match="identity"):
        make_balancer("consistent-hash", [Anonymous()])
    balancer = make_balancer("consistent-hash", [Anonymous()], identity=lambda e: "x")
    assert balancer.pick("k") is not None


def test_hash_owner_ignores_availability() -> None:
    endpoints = nodes("a", "b")
    balancer = ring_of(endpoints)
    owner = balancer.owner("user-1")
    owner.available = False
    assert balancer.owner("user-1") is owner
    assert balancer.pick("user-1") is not owner


# -- hash keys ------------------------------------------------------------------------

HEADERS = [
    (b"host", b"example.com"),
    (b"x-user", b" alice "),
    (b"cookie", b"theme=dark; session=abc123"),
    (b"cookie", b"other=1"),
]


def test_hash_key_ip() -> None:
    assert hash_key("ip", "10.0.0.1", HEADERS) == "10.0.0.1"
    assert hash_key("ip", None, HEADERS) is None
    assert hash_key("ip", "", HEADERS) is None


def test_hash_key_header() -> None:
    assert hash_key("header:x-user", "1.2.3.4", HEADERS) == "alice"
    assert hash_key("header:X-User", "1.2.3.4", HEADERS) == "alice"  # names are case-blind
    assert hash_key("header:x-missing", "1.2.3.4", HEADERS) is None
    assert hash_key("header:x-empty", None, [(b"x-empty", b"  ")]) is None


def test_hash_key_cookie() -> None:
    assert hash_key("cookie:session", None, HEADERS) == "abc123"
    assert hash_key("cookie:other", None, HEADERS) == "1"  # in a second cookie header
    assert hash_key("cookie:Session", None, HEADERS) is None  # cookie names are exact
    assert hash_key("cookie:theme", None, [(b"cookie", b"themes=x")]) is None
    assert hash_key("cookie:nope", None, HEADERS) is None


def test_hash_key_none_and_invalid() -> None:
    assert hash_key(None, "1.2.3.4", HEADERS) is None
    with pytest.raises(ValueError, match="invalid hash_on"):
        key_extractor("query:x")
    with pytest.raises(ValueError):
        key_extractor("header:")


def test_key_for_on_balancers() -> None:
    balancer = make_balancer("consistent-hash", nodes("a", "b"), "cookie:session")
    assert balancer.hash_on == "cookie:session"
    assert balancer.key_for("1.2.3.4", HEADERS) == "abc123"
    default = make_balancer("consistent-hash", nodes("a", "b"))
    assert default.hash_on == "ip"
    assert default.key_for("1.2.3.4", HEADERS) == "1.2.3.4"
    assert make_balancer("round-robin", nodes("a"), "ip").key_for("1.2.3.4", HEADERS) is None


# -- latency estimates ----------------------------------------------------------------


def test_update_ewma_seeds_then_smooths() -> None:
    endpoint = Node("http://a")
    assert update_ewma(endpoint, 100.0) == 100.0
    assert update_ewma(endpoint, 200.0, alpha=0.2) == pytest.approx(120.0)
    assert endpoint.ewma_ms == pytest.approx(120.0)


def test_peak_ewma_jumps_to_peaks_and_decays_by_time() -> None:
    clock = FakeClock()
    ewma = PeakEwma(tau=10.0, clock=clock)
    assert ewma.value == 0.0
    assert ewma.observe(50.0) == 50.0
    assert ewma.observe(500.0) == 500.0  # a slowdown counts at once
    clock.now += 0.001
    low = ewma.observe(50.0)  # a fast sample right after barely moves it
    assert low > 499.0
    clock.now += 10.0
    # After tau seconds the old estimate weighs 1/e.
    assert ewma.observe(50.0) == pytest.approx(low / math.e + 50.0 * (1 - 1 / math.e))


def test_peak_ewma_value_decays_while_idle_without_mutating() -> None:
    clock = FakeClock()
    ewma = PeakEwma(tau=10.0, clock=clock)
    ewma.observe(400.0)
    clock.now += 10.0
    assert ewma.value == pytest.approx(400.0 / math.e, rel=1e-6)
    assert ewma.value == pytest.approx(400.0 / math.e, rel=1e-6)  # reading is pure
    clock.now += 60.0
    assert ewma.value < 1.0  # an idle slow endpoint becomes worth re-measuring
    with pytest.raises(ValueError):
        PeakEwma(tau=0)
