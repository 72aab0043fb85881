"""Graceful shutdown of the real ``octopus`` process while a request is in flight."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.e2e.helpers import GatewayProcess, minimal_config
from tests.support.controlled import MakeControlled
from tests.support.waiting import eventually

StartGateway = Callable[..., GatewayProcess]


def _ready_status(admin_url: str) -> int:
    try:
        return httpx.get(f"{admin_url}/_/ready", timeout=1).status_code
    except httpx.TransportError:
        return 0


def test_sigterm_turns_readiness_503_at_once_and_lets_a_2s_request_finish(
    gateway_factory: StartGateway, make_upstream: MakeControlled
) -> None:
    upstream = make_upstream("slow")
    upstream.app.delay = 2.0
    gateway = gateway_factory(minimal_config(upstream.url))
    admin_url = gateway.admin_url
    assert admin_url is not None
    eventually(lambda: _ready_status(admin_url) == 200, timeout=10)

    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        slow = pool.submit(httpx.get, f"{gateway.data_url}/slow", timeout=10)
        eventually(lambda: upstream.app.in_flight == 1, message="the request never arrived")

        gateway.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        eventually(lambda: _ready_status(admin_url) == 503, timeout=2)
        turned = time.monotonic() - signalled
        response = slow.result(timeout=10)

    assert turned < 0.5, f"readiness took {turned:.2f}s to turn 503"
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "/slow"
    assert time.monotonic() - started >= 2.0  # answered in full, not cut short
    assert upstream.app.arrivals == 1
    assert gateway.wait(timeout=20) == 0
