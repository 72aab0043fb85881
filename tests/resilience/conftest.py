"""Fixtures for the resilience battery: controllable upstreams and in-process gateways.

Every test gets its own upstreams (``make_upstream``) so that stopping, slowing down or
failing one never leaks into another test, and its own gateway (``make_gateway``).
The SIGTERM test runs the real ``octopus`` process (``gateway_factory``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.e2e.helpers import GatewayProcess, start_gateway
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


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayProcess]]:
    """``start_gateway`` (the real ``octopus run`` process), stopped at teardown."""
    started: list[GatewayProcess] = []

    def start(config: Any, *extra_args: str, **options: Any) -> GatewayProcess:
        handle = start_gateway(config, *extra_args, **options)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                handle.stop(timeout=20)
        handle.close()
