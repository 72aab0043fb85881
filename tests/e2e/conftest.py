"""Fixtures for end-to-end tests; the machinery lives in ``tests/e2e/helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.helpers import UpstreamServer


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    """A fresh echo upstream on 127.0.0.1 (``?delay=2`` answers two seconds late)."""
    with UpstreamServer() as server:
        yield server
