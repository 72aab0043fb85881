"""Fixtures for end-to-end tests; the machinery lives in ``tests/e2e/helpers.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.helpers import GatewayProcess, UpstreamServer, start_gateway


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    """A fresh echo upstream on 127.0.0.1 (``?delay=2`` answers two seconds late)."""
    with UpstreamServer() as server:
        yield server


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayProcess]]:
    """``start_gateway`` whose processes are all stopped (or killed) at teardown."""
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
