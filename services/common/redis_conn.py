"""Redis access shared by the services: one client factory and one error translation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
import redis.exceptions

from services.common.errors import Unavailable


def create_redis(url: str, timeout_s: float) -> aioredis.Redis:
    """Return an asyncio Redis client (bytes replies) with bounded connect and command times.

    Args:
        url: A ``redis://`` URL.
        timeout_s: Connect and command timeout; blocking reads must block for less.
    """
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=15,
        max_connections=256,
    )


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate Redis connectivity errors into ``Unavailable`` naming ``what`` failed.

    Raises:
        Unavailable: Redis could not be reached or timed out.
    """
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise Unavailable(f"{what}: redis unreachable") from exc
