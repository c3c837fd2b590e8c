"""Fixtures that start real things: Redis through the project's own embedded launcher."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from services.common.embedded_redis import EmbeddedRedis
from services.common.redis_conn import create_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server (>= 6.2) on a free loopback port for the whole session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    """A client on the session's Redis; the database is flushed after each test."""
    client = create_redis(redis_server.url, timeout_s=5)
    yield client
    await client.flushdb()
    await client.aclose()
