"""Fixtures for integration tests: the whole suite on the session's real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.common.embedded_redis import EmbeddedRedis
from tests.integration.suite import Suite


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    """Registry + worker + gateway in this event loop; Redis is flushed after the test."""
    running = await Suite(redis_server.url, tmp_path).start()
    yield running
    await running.stop()
