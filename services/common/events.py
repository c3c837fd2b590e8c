"""Registry events on a Redis stream: the registry publishes, gateways and workers follow.

Events are hints to refresh caches and reconcile deployments; followers must still work
after missing some (the stream is trimmed), so they also refresh periodically.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Container
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from services.common import keys

log = structlog.get_logger(__name__)

MAX_EVENTS = 10_000
"""Approximate length the events stream is trimmed to (events are hints, not requests)."""


@dataclass(frozen=True)
class Event:
    """One registry event."""

    id: str
    kind: str
    """model_created, model_deleted, version_uploaded, version_updated, version_deleted, deployed,
    undeployed, rolled_back, alias_set, alias_deleted, api_key_revoked, ..."""
    model: str
    version: int = 0
    """The version concerned (0: none)."""

    @property
    def time_ms(self) -> int:
        """When Redis recorded it (Unix ms): the first part of the id."""
        return int(self.id.partition("-")[0])


def event_of(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    """Return the event of one stream entry (as redis-py returns it, bytes)."""
    return Event(
        id=entry_id.decode(),
        kind=fields.get(b"kind", b"").decode(),
        model=fields.get(b"model", b"").decode(),
        version=int(fields.get(b"version", b"0") or 0),
    )


async def publish(redis: aioredis.Redis, kind: str, model: str, version: int = 0) -> None:
    """Append an event to the events stream (``version`` 0: the event names no version)."""
    fields = {"kind": kind, "model": model, "version": version}
    await redis.xadd(keys.EVENTS, fields, maxlen=MAX_EVENTS, approximate=True)  # type: ignore[arg-type]


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
                event = event_of(entry_id, fields)
                last_id = event.id
                yield event


async def invalidate_on(
    redis: aioredis.Redis, kinds: Container[str], invalidate: Callable[[], None], *, cache: str
) -> None:
    """Call ``invalidate`` on every event of ``kinds``, until cancelled (a supervised loop).

    When following fails, events may have been missed: ``invalidate`` is called then too, and
    following starts again after a second.
    """
    while True:
        try:
            async for event in follow(redis):
                if event.kind in kinds:
                    invalidate()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a supervised loop: log, forget everything, follow again
            log.warning("cache_events_failed", cache=cache, error=str(exc))
            invalidate()
            await asyncio.sleep(1.0)
