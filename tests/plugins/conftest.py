"""Fixtures shared by the plugin tests.

``redis_process`` (one real ``redis-server`` per module) and ``redis_server`` (that server,
running and flushed, per test) come from ``tests/support/redis_server.py``.
"""

from __future__ import annotations

from tests.support.redis_server import redis_fixtures

redis_process, redis_server = redis_fixtures()
