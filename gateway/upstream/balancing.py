"""Load balancers: which endpoint of an upstream takes the next attempt.

One balancer is built per upstream when a routing table is built, and ``pick`` runs on
every attempt, so each algorithm does its expensive work once, up front, and keeps the
per-pick path to a few attribute reads:

``round-robin``
    A cursor over the endpoints.
``weighted``
    Smooth weighted round-robin as nginx does it (the picks of an endpoint are spread
    evenly through the cycle instead of in bursts). The cycle for the configured weights
    is computed once; a pick is a cursor step. Only when the scheduled endpoint is
    unavailable or excluded does it run nginx's O(n) pass over the remaining ones, which
    keeps the ratios between the available endpoints exact.
``least-conn``
    Fewest ``in_flight`` relative to weight (nginx ``least_conn``). The one O(n)
    algorithm: ``in_flight`` changes outside the balancer on every request, so the
    minimum cannot be indexed without hooks on every start and finish. With equal
    weights the scan stops at the first idle endpoint, which under light load is
    O(1) in practice; for large, busy upstreams prefer ``p2c-ewma``.
    Ties go to the first endpoint after the previous winner (equal weights: the tied
    take turns), or by smooth weighted round-robin among the tied (mixed weights, so
    an idle upstream still honours the weights).
``p2c-ewma``
    Power of two random choices (Mitzenmacher; Finagle, Linkerd): two random endpoints,
    keep the one with the lower ``ewma_ms * (in_flight + 1) / weight``. O(1), and
    adapts to latency without herding every request onto the single best endpoint.
``consistent-hash``
    A hash ring with virtual nodes (160 for a weight-100 endpoint, scaled by weight),
    built once and looked up with bisect, so the same key sticks to the same endpoint
    and removing one of N endpoints moves only the keys it owned (~1/N). Requests with
    no key fall back to round-robin.

Availability is read from each endpoint's ``available`` attribute (healthy, not ejected,
breaker not refusing: the caller composes it); weight 0 means drained and is never
picked. ``exclude`` (the endpoints this request already tried) is a preference: when
every available endpoint is excluded, one of them is returned anyway, so that a
single-endpoint upstream can still retry. ``pick`` returns None only when no endpoint
is available at all. Endpoints are compared by identity, never by ``==``.

Weights and the endpoint list are snapshotted at construction: a new routing table
builds new balancers. Availability, ``in_flight`` and ``ewma_ms`` are read live.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import time
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Callable, Collection, Sequence
from functools import lru_cache, reduce
from typing import ClassVar, Generic, Protocol, TypeVar

__all__ = [
    "BALANCERS",
    "BalancedEndpoint",
    "Balancer",
    "ConsistentHash",
    "Headers",
    "KeyExtractor",
    "LeastConn",
    "PeakEwma",
    "PowerOfTwoEwma",
    "RoundRobin",
    "WeightedRoundRobin",
    "hash_key",
    "key_extractor",
    "make_balancer",
    "update_ewma",
]


class BalancedEndpoint(Protocol):
    """What a balancer reads from an endpoint (``upstream.Endpoint`` plus ``available``)."""

    @property
    def weight(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def ewma_ms(self) -> float: ...

    @property
    def available(self) -> bool: ...


E = TypeVar("E", bound=BalancedEndpoint)
Headers = Sequence[tuple[bytes, bytes]]
KeyExtractor = Callable[[str | None, Headers], str | None]


def _is_in(endpoint: object, exclude: Collection[object]) -> bool:
    """Identity membership: ``Endpoint`` is a dataclass, so ``in`` would compare fields."""
    # A plain loop, not any(<generator>): no allocation on the per-pick path.
    for other in exclude:  # noqa: SIM110
        if other is endpoint:
            return True
    return False


class Balancer(ABC, Generic[E]):
    """Picks the endpoint for one attempt. Subclasses implement :meth:`_pick`."""

    kind: ClassVar[str]
    #: The ``hash_on`` setting in use (only consistent-hash has one).
    hash_on: str | None = None

    def __init__(self, endpoints: Sequence[E]) -> None:
        self._endpoints: tuple[E, ...] = tuple(endpoints)

    @property
    def endpoints(self) -> tuple[E, ...]:
        return self._endpoints

    def key_for(self, client_ip: str | None, headers: Headers) -> str | None:
        """The hash key of a request, or None when this balancer does not hash.

        Call it unconditionally: it costs nothing for balancers that ignore keys.
        """
        return None

    def pick(self, key: str | None = None, exclude: Collection[E] = ()) -> E | None:
        """The endpoint for the next attempt; None when no endpoint is available.

        ``exclude`` is avoided while another available endpoint exists.
        """
        chosen = self._pick(key, exclude)
        if chosen is None and exclude:
            chosen = self._pick(key, ())
        return chosen

    @abstractmethod
    def _pick(self, key: str | None, exclude: Collection[E]) -> E | None:
        """An available endpoint not in ``exclude``, or None."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} endpoints={len(self._endpoints)}>"


class RoundRobin(Balancer[E]):
    """Each available endpoint in turn."""

    kind = "round-robin"

    def __init__(self, endpoints: Sequence[E]) -> None:
        super().__init__(endpoints)
        self._next = 0

    def _pick(self, key: str | None, exclude: Collection[E]) -> E | None:
        endpoints = self._endpoints
        count = len(endpoints)
        index = self._next
        # Usually the first candidate is taken; the loop only runs on for skipped ones.
        for _ in range(count):
            endpoint = endpoints[index]
            index += 1
            if index == count:
                index = 0
            if endpoint.weight > 0 and endpoint.available:
                if exclude and _is_in(endpoint, exclude):
                    continue
                self._next = index
                return endpoint
        return None


def _smooth_cycle_nginx(weights: Sequence[int], length: int) -> list[int]:
    """One full cycle of nginx's smooth weighted round-robin, as endpoint indices."""
    total = sum(weights)
    current = [0] * len(weights)
    cycle: list[int] = []
    for _ in range(length):
        best = -1
        for index, weight in enumerate(weights):
            if weight <= 0:
                continue
            current[index] += weight
            if best < 0 or current[index] > current[best]:
                best = index
        current[best] -= total
        cycle.append(best)
    return cycle


def _smooth_cycle_edf(weights: Sequence[int], length: int) -> list[int]:
    """A cycle with the same length and counts, built in O(length log n) for big cycles.

    Endpoint i's k-th pick is due at (k + 1/2) / w_i; taking the earliest due first
    spreads picks as evenly as nginx's pass does, and the first ``length`` picks hold
    each endpoint exactly ``w_i / gcd`` times (its due times below ``1 / gcd``).
    """
    heap = [(0.5 / weight, index, 0) for index, weight in enumerate(weights) if weight > 0]
    heapq.heapify(heap)
    cycle: list[int] = []
    for _ in range(length):
        _, index, picks = heap[0]
        cycle.append(index)
        picks += 1
        heapq.heapreplace(heap, ((picks + 0.5) / weights[index], index, picks))
    return cycle


class WeightedRoundRobin(Balancer[E]):
    """Smooth weighted round-robin: exact ratios, picks interleaved, weight 0 never."""

    kind = "weighted"
    #: Above this much work (cycle length x endpoints) the cycle is built with a heap.
    NGINX_BUILD_LIMIT = 250_000
    #: Above this cycle length no cycle is kept and every pick runs the O(n) pass.
    MAX_CYCLE = 1 << 20

    def __init__(self, endpoints: Sequence[E]) -> None:
        super().__init__(endpoints)
        weights = [max(endpoint.weight, 0) for endpoint in self._endpoints]
        self._weights = weights
        self._current = [0] * len(weights)  # nginx state for the degraded path
        self._cursor = 0
        positive = [weight for weight in weights if weight > 0]
        self._cycle: list[int] = []
        if positive:
            length = sum(positive) // reduce(math.gcd, positive)
            if length * len(weights) <= self.NGINX_BUILD_LIMIT:
                self._cycle = _smooth_cycle_nginx(weights, length)
            elif length <= self.MAX_CYCLE:
                self._cycle = _smooth_cycle_edf(weights, length)

    @property
    def cycle(self) -> tuple[E, ...]:
        """The precomputed cycle (for tests and the admin API)."""
        return tuple(self._endpoints[index] for index in self._cycle)

    def _pick(self, key: str | None, exclude: Collection[E]) -> E | None:
        cycle = self._cycle
        if cycle:
            cursor = self._cursor
            endpoint = self._endpoints[cycle[cursor]]
            cursor += 1
            self._cursor = 0 if cursor == len(cycle) else cursor
            if endpoint.available and not (exclude and _is_in(endpoint, exclude)):
                return endpoint
        # The scheduled endpoint cannot take it: hand its slot to the others in
        # proportion to their weights, which keeps their mutual ratios exact.
        return self._pick_dynamic(exclude)

    def _pick_dynamic(self, exclude: Collection[E]) -> E | None:
        endpoints = self._endpoints
        weights = self._weights
        current = self._current
        total = 0
        best = -1
        for index, endpoint in enumerate(endpoints):
            weight = weights[index]
            if weight <= 0 or not endpoint.available:
                continue
            if exclude and _is_in(endpoint, exclude):
                continue
            current[index] += weight
            total += weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:
            return None
        current[best] -= total
        return endpoints[best]


class LeastConn(Balancer[E]):
    """Fewest in-flight requests per unit of weight."""

    kind = "least-conn"

    def __init__(self, endpoints: Sequence[E]) -> None:
        super().__init__(endpoints)
        self._start = 0
        self._current = [0] * len(self._endpoints)  # smooth WRR among ties, mixed weights
        # Equal weights (the usual case) allow an early exit on the first idle endpoint.
        self._uniform = len({e.weight for e in self._endpoints if e.weight > 0}) <= 1

    def _pick(self, key: str | None, exclude: Collection[E]) -> E | None:
        endpoints = self._endpoints
        count = len(endpoints)
        if not count:
            return None
        uniform = self._uniform
        best: E | None = None
        best_load = 0
        best_weight = 1
        best_next = 0
        ties = 0
        mixed = False
        index = self._start
        for _ in range(count):
            endpoint = endpoints[index]
            index += 1
            if index == count:
                index = 0
            weight = endpoint.weight
            if weight <= 0 or not endpoint.available:
                continue
            if exclude and _is_in(endpoint, exclude):
                continue
            load = endpoint.in_flight
            if load == 0 and uniform:
                # Nothing beats idle, and with equal weights the first idle endpoint
                # from the start is exactly the tie-break winner: stop here. Under
                # light load this makes the scan O(1) in practice.
                self._start = index
                return endpoint
            if best is None:
                best, best_load, best_weight, best_next = endpoint, load, weight, index
                ties, mixed = 1, False
                continue
            # load / weight against best_load / best_weight, without division.
            left = load * best_weight
            right = best_load * weight
            if left < right:
                best, best_load, best_weight, best_next = endpoint, load, weight, index
                ties, mixed = 1, False
            elif left == right:
                ties += 1
                if weight != best_weight:
                    mixed = True
        if ties > 1 and mixed:
            return self._weighted_among_ties(best_load, best_weight, exclude)
        # The next scan starts just after the winner: ties take turns, and an endpoint
        # sitting after a busy one gets no extra share.
        self._start = best_next
        return best

    def _weighted_among_ties(
        self, best_load: int, best_weight: int, exclude: Collection[E]
    ) -> E | None:
        """nginx's tie-break: smooth weighted round-robin over the equally loaded."""
        current = self._current
        total = 0
        chosen = -1
        for index, endpoint in enumerate(self._endpoints):
            weight = endpoint.weight
            if weight <= 0 or not endpoint.available:
                continue
            if exclude and _is_in(endpoint, exclude):
                continue
            if endpoint.in_flight * best_weight != best_load * weight:
                continue
            current[index] += weight
            total += weight
            if chosen < 0 or current[index] > current[chosen]:
                chosen = index
        if chosen < 0:
            return None
        current[chosen] -= total
        return self._endpoints[chosen]


class PowerOfTwoEwma(Balancer[E]):
    """Two random endpoints; the one with the lower expected latency under load wins."""

    kind = "p2c-ewma"
    #: Cost of an endpoint with requests in flight but no latency sample yet: without it
    #: a fresh endpoint (ewma 0) would win every comparison and take a whole burst.
    UNMEASURED_PENALTY_MS = 1_000_000.0
    #: Pairs drawn before falling back to a full scan (when many endpoints are down).
    DRAWS = 3

    def __init__(self, endpoints: Sequence[E], rng: random.Random | None = None) -> None:
        super().__init__(endpoints)
        self._rng = rng if rng is not None else random.Random()

    @classmethod
    def load(cls, endpoint: BalancedEndpoint) -> float:
        """``ewma_ms * (in_flight + 1)``: expected wait for one more request."""
        cost = endpoint.ewma_ms
        in_flight = endpoint.in_flight
        if cost <= 0.0:
            if in_flight <= 0:
                return 0.0
            cost = cls.UNMEASURED_PENALTY_MS
        return cost * (in_flight + 1)

    def _better(self, first: E, second: E) -> E:
        # load / weight compared without division (weights are positive here).
        if self.load(second) * first.weight < self.load(first) * second.weight:
            return second
        return first

    def _pick(self, key: str | None, exclude: Collection[E]) -> E | None:
        endpoints = self._endpoints
        count = len(endpoints)
        if count == 0:
            return None
        if count == 1:
            only = endpoints[0]
            usable = only.weight > 0 and only.available
            return only if usable and not (exclude and _is_in(only, exclude)) else None
        random_ = self._rng.random
        for _ in range(self.DRAWS):
            first_index = int(random_() * count)
            second_index = int(random_() * (count - 1))
            if second_index >= first_index:
                second_index += 1
            first = endpoints[first_index]
            if first.weight <= 0 or not first.available or (exclude and _is_in(first, exclude)):
                continue
            second = endpoints[second_index]
            if second.weight <= 0 or not second.available or (exclude and _is_in(second, exclude)):
                continue
            return self._better(first, second)
        return self._scan(exclude)

    def _scan(self, exclude: Collection[E]) -> E | None:
        """The best of all usable endpoints: only when random draws keep hitting bad ones."""
        best: E | None = None
        for endpoint in self._endpoints:
            if endpoint.weight <= 0 or not endpoint.available:
                continue
            if exclude and _is_in(endpoint, exclude):
                continue
            best = endpoint if best is None else self._better(best, endpoint)
        return best


def _ring_hash(text: str) -> int:
    """64 bits of blake2b: stable across processes (unlike ``hash()``) and well spread."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _default_identity(endpoint: object) -> str:
    url = getattr(endpoint, "url", None)
    if not isinstance(url, str) or not url:
        raise TypeError(
            "consistent-hash needs a stable identity per endpoint: give endpoints a `url` "
            "or pass identity="
        )
    return url


class ConsistentHash(Balancer[E]):
    """A hash ring with virtual nodes: the key's owner, or the next available one."""

    kind = "consistent-hash"
    #: Virtual nodes of a weight-100 endpoint (ketama's 160); others scale with weight.
    VNODES_PER_100 = 160

    def __init__(
        self,
        endpoints: Sequence[E],
        hash_on: str | None = None,
        identity: Callable[[E], str] | None = None,
        vnodes: int = VNODES_PER_100,
    ) -> None:
        super().__init__(endpoints)
        # Without hash_on there would be no key at all: hash the client address.
        self.hash_on = hash_on or "ip"
        self._extract = key_extractor(self.hash_on)
        self._fallback: RoundRobin[E] = RoundRobin(self._endpoints)
        identify = identity or _default_identity
        points: list[tuple[int, int]] = []
        for index, endpoint in enumerate(self._endpoints):
            weight = endpoint.weight
            if weight <= 0:
                continue
            # The label depends on the endpoint, not its position: removing another
            # endpoint must leave this one's points where they are.
            name = identify(endpoint)
            for replica in range(max(1, round(vnodes * weight / 100))):
                points.append((_ring_hash(f"{name}#{replica}"), index))
        points.sort()
        self._points = [point for point, _ in points]
        self._owners = [owner for _, owner in points]
        self._owner_count = len(set(self._owners))
        self._next_run = self._link_runs(self._owners)

    @staticmethod
    def _link_runs(owners: list[int]) -> list[int]:
        """For each ring position, the next position with another owner (-1: none).

        Walking these links visits one position per run of same-owner points, so
        skipping an unavailable endpoint costs one step, not one step per virtual node.
        """
        size = len(owners)
        following = [-1] * size
        if size == 0 or len(set(owners)) < 2:
            return following
        # Walk backwards twice around the ring so the last run links to the first.
        nearest = -1
        for step in range(2 * size - 1, -1, -1):
            position = step % size
            after = (position + 1) % size
            if owners[after] != owners[position]:
                nearest = after  # a run starts right after this position
            if step < size:
                following[position] = nearest
        return following

    def key_for(self, client_ip: str | None, headers: Headers) -> str | None:
        return self._extract(client_ip, headers)

    @property
    def ring_size(self) -> int:
        return len(self._points)

    def owner(self, key: str) -> E | None:
        """The endpoint owning ``key`` on the ring, whether it is available or not."""
        if not self._points:
            return None
        position = bisect_right(self._points, _ring_hash(key))
        if position == len(self._points):
            position = 0
        return self._endpoints[self._owners[position]]

    def _pick(self, key: str | None, exclude: Collection[E]) -> E | None:
        if key is None:
            return self._fallback._pick(None, exclude)
        points = self._points
        if not points:
            return None
        position = bisect_right(points, _ring_hash(key))
        if position == len(points):
            position = 0
        endpoints = self._endpoints
        owners = self._owners
        following = self._next_run
        jumps = 0
        while True:
            endpoint = endpoints[owners[position]]
            if endpoint.available and not (exclude and _is_in(endpoint, exclude)):
                return endpoint
            position = following[position]
            if position < 0:
                return None  # a single owner, and it cannot take the request
            jumps += 1
            if jumps == self._owner_count and not self._any_usable(exclude):
                return None  # everything is down: do not walk the whole ring to learn that
            if jumps > len(points):
                return None  # cannot happen (a usable owner has a run); never loop forever

    def _any_usable(self, exclude: Collection[E]) -> bool:
        for endpoint in self._endpoints:
            if endpoint.weight <= 0 or not endpoint.available:
                continue
            if not (exclude and _is_in(endpoint, exclude)):
                return True
        return False


#: Every ``load_balance`` value :func:`make_balancer` accepts.
BALANCERS: tuple[str, ...] = (
    RoundRobin.kind,
    WeightedRoundRobin.kind,
    LeastConn.kind,
    PowerOfTwoEwma.kind,
    ConsistentHash.kind,
)


def make_balancer(
    kind: str,
    endpoints: Sequence[E],
    hash_on: str | None = None,
    *,
    rng: random.Random | None = None,
    identity: Callable[[E], str] | None = None,
) -> Balancer[E]:
    """The balancer for a ``load_balance`` value.

    ``hash_on`` only matters to consistent-hash (default there: ``ip``); ``rng`` seeds
    p2c-ewma (tests); ``identity`` names endpoints on the hash ring (default: ``url``).
    """
    if kind == "round-robin":
        return RoundRobin(endpoints)
    if kind == "weighted":
        return WeightedRoundRobin(endpoints)
    if kind == "least-conn":
        return LeastConn(endpoints)
    if kind == "p2c-ewma":
        return PowerOfTwoEwma(endpoints, rng=rng)
    if kind == "consistent-hash":
        return ConsistentHash(endpoints, hash_on, identity=identity)
    raise ValueError(f"unknown load_balance {kind!r} (use one of {', '.join(BALANCERS)})")


# -- hash keys -------------------------------------------------------------------------


def _header_value(name: bytes, headers: Headers) -> str | None:
    for header, value in headers:
        if header == name:
            text = value.strip()
            return text.decode("latin-1") if text else None
    return None


def _cookie_value(name: bytes, headers: Headers) -> str | None:
    # HTTP/2 clients may split cookies over several headers: look in each.
    for header, value in headers:
        if header != b"cookie":
            continue
        for pair in value.split(b";"):
            cookie, sep, content = pair.strip().partition(b"=")
            if sep and cookie == name:
                content = content.strip()
                return content.decode("latin-1") if content else None
    return None


def _no_key(client_ip: str | None, headers: Headers) -> str | None:
    return None


def _ip_key(client_ip: str | None, headers: Headers) -> str | None:
    return client_ip or None


@lru_cache(maxsize=256)
def key_extractor(hash_on: str | None) -> KeyExtractor:
    """A function ``(client_ip, headers) -> key | None`` for a ``hash_on`` value.

    Parsed once per value (cached) so the request path does not re-split the setting.
    ``headers`` are ASGI headers (lower-case names). For ``ip``, pass the client address
    after trusted-proxy resolution, or every client behind one load balancer shares a key.
    """
    if not hash_on:
        return _no_key
    if hash_on == "ip":
        return _ip_key
    kind, sep, name = hash_on.partition(":")
    name = name.strip()
    if sep and name and kind == "header":
        header = name.lower().encode("latin-1")
        return lambda client_ip, headers: _header_value(header, headers)
    if sep and name and kind == "cookie":
        cookie = name.encode("latin-1")
        return lambda client_ip, headers: _cookie_value(cookie, headers)
    raise ValueError(f"invalid hash_on {hash_on!r} (use ip, header:NAME or cookie:NAME)")


def hash_key(hash_on: str | None, client_ip: str | None, headers: Headers) -> str | None:
    """The consistent-hash key of a request: client IP, a header or a cookie; None if absent."""
    return key_extractor(hash_on)(client_ip, headers)


# -- latency tracking ------------------------------------------------------------------


class _HasEwma(Protocol):
    ewma_ms: float


def update_ewma(endpoint: _HasEwma, elapsed_ms: float, alpha: float = 0.2) -> float:
    """Fold one response time into ``endpoint.ewma_ms`` (the first sample seeds it).

    A plain per-sample EWMA, what the proxy does today. Its weakness: how fast history
    fades depends on traffic, not time; :class:`PeakEwma` is the better input to p2c.
    """
    previous = endpoint.ewma_ms
    value = elapsed_ms if previous <= 0.0 else previous + alpha * (elapsed_ms - previous)
    endpoint.ewma_ms = value
    return value


class PeakEwma:
    """Time-decayed, peak-sensitive latency estimate of one endpoint (Finagle-style).

    * Decay by time (``tau`` seconds): a sample's weight depends on its age, not on how
      many samples came after, so the estimate means the same at 10 and 10,000 req/s.
    * Peak-sensitive: a sample above the estimate replaces it at once, so p2c reacts to
      a slowdown on the very next pick instead of after many samples.
    * Decays toward 0 while idle (on read, without mutating): an endpoint that was slow
      and then lost all its traffic to p2c becomes attractive again after a few ``tau``
      and gets re-measured, instead of starving forever on a stale estimate.
    """

    __slots__ = ("_clock", "_cost", "_stamp", "tau")

    def __init__(self, tau: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if tau <= 0:
            raise ValueError("tau must be positive")
        self.tau = tau
        self._clock = clock
        self._cost = 0.0
        self._stamp = clock()

    def observe(self, rtt_ms: float) -> float:
        """Fold in one response time (milliseconds); returns the new estimate."""
        now = self._clock()
        cost = self._cost
        if rtt_ms >= cost:
            cost = rtt_ms
        else:
            weight = math.exp(-max(now - self._stamp, 0.0) / self.tau)
            cost = cost * weight + rtt_ms * (1.0 - weight)
        self._cost = cost
        self._stamp = now
        return cost

    @property
    def value(self) -> float:
        """The estimate now, in milliseconds (decayed by the time since the last sample)."""
        cost = self._cost
        if cost <= 0.0:
            return 0.0
        idle = self._clock() - self._stamp
        return cost if idle <= 0.0 else cost * math.exp(-idle / self.tau)
