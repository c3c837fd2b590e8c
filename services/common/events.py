"""Registry events on a Redis stream: the registry publishes, gateways and workers follow.

Events are hints to refresh caches and reconcile deployments; followers must still work
after missing some (the stream is trimmed), so they also refresh periodically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.common import keys

MAX_EVENTS = 10_000
"""Approximate length the events stream is trimmed to (events are hints, not requests)."""


@dataclass(frozen=True)
class Event:
    """One registry event."""

    id: str
    kind: str
    """model_created, model_deleted, version_uploaded, deployed or undeployed."""
    model: str


async def publish(redis: aioredis.Redis, kind: str, model: str) -> None:
    """Append an event to the events stream."""
    await redis.xadd(keys.EVENTS, {"kind": kind, "model": model}, maxlen=MAX_EVENTS, approximate=True)


async def last_event_id(redis: aioredis.Redis) -> str:
    """Return the id of the newest event ("0-0" if there is none), to follow on from it."""
    newest: Any = await redis.xrevrange(keys.EVENTS, count=1)
    return newest[0][0].decode() if newest else "0-0"


async def follow(redis: aioredis.Redis, *, last_id: str = "$", block_ms: int = 1000) -> AsyncIterator[Event]:
    """Yield events published after ``last_id``; the caller owns retries on Redis errors.

    Args:
        redis: Client whose socket timeout exceeds ``block_ms``.
        last_id: Follow on from this event id (``$``: from now on). A caller that resumes after
            an error passes the id of the last event it saw, so nothing in between is missed.
        block_ms: How long one XREAD blocks (the loop then checks for cancellation).
    """
    while True:
        batches: Any = await redis.xread({keys.EVENTS: last_id}, block=block_ms, count=100)
        for _stream, entries in batches or []:
            for entry_id, fields in entries:
                last_id = entry_id.decode()
                yield Event(
                    id=last_id,
                    kind=fields.get(b"kind", b"").decode(),
                    model=fields.get(b"model", b"").decode(),
                )
