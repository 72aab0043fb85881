"""Fixtures for the resilience battery: controllable upstreams and in-process gateways.

Every test gets its own upstreams (``make_upstream``) so that stopping, slowing down or
failing one never leaks into another test, and its own gateway (``make_gateway``).
The SIGTERM test runs the real ``octopus`` process (``gateway_factory``).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.controlled import ControlledUpstream, MakeControlled


@pytest.fixture
def make_upstream() -> Iterator[MakeControlled]:
    """Start a controllable upstream named ``name``; stopped at teardown."""
    started: list[ControlledUpstream] = []

    def make(name: str, **options: Any) -> ControlledUpstream:
        server = ControlledUpstream(name, **options).start()
        started.append(server)
        return server

    yield make
    # In parallel: each uvicorn takes a main-loop tick (~0.1 s) or more to stop.
    with ThreadPoolExecutor(max(len(started), 1)) as pool:
        list(pool.map(ControlledUpstream.stop, started))
