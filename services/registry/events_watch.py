"""WatchEvents: the registry's events stream (``keys.EVENTS``) streamed to clients, resumable.

A watcher starts after a position: empty means from now on, ``0`` from the oldest event kept,
else the id of an event it saw. The stream is trimmed (``events.MAX_EVENTS``, approximately), so
a position must still be kept: once the event of an id is trimmed, the events right after it may
be gone too, and resuming there could skip some unnoticed. Such a position is FAILED_PRECONDITION,
and so is one newer than the newest event (the stream was reset, e.g. a Redis without
persistence restarted). While streaming, the last event sent is checked again after each read,
so a watcher that falls behind the trimming ends with FAILED_PRECONDITION instead of a gap.

Events are in stream order (ids grow), each sent once per stream; a client that reconnects
with the id of the last event it got sees neither a gap nor a duplicate.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from services.common import auth, events, keys
from services.common.errors import FailedPrecondition, InvalidArgument, MaasError, ResourceExhausted
from services.common.events import Event
from services.common.metadata import check_name, shown
from services.common.redis_conn import redis_errors

log = structlog.get_logger(__name__)

MAX_WATCHERS = 100
"""Streams one registry process serves at once (each holds a Redis connection while it blocks)."""
READ_COUNT = 100
"""Most events one read returns."""
BLOCK_MS = 1000
"""How long one blocking read waits (below the registry's Redis timeout)."""

_ID_RE = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_WHAT = "events stream"

IsVisible = Callable[[Event], Awaitable[bool]]
"""Whether the caller may see an event (its API key's models)."""


@dataclass(frozen=True)
class WatchRequest:
    """Where a watch starts, whether it follows, and which model it is about."""

    after_id: str = ""
    """Empty: from now on; ``0``: from the oldest event kept; else an event id."""
    is_following: bool = False
    """False: end after the events recorded so far."""
    model: str = ""
    """Only this model's events (empty: every model)."""


def _newer(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes after ``b``."""
    a_ms, _, a_seq = a.partition("-")
    b_ms, _, b_seq = b.partition("-")
    return (int(a_ms), int(a_seq or 0)) > (int(b_ms), int(b_seq or 0))


def _check_request(request: WatchRequest) -> None:
    if request.model:
        check_name(request.model)
    if request.after_id not in ("", "0") and not _ID_RE.fullmatch(request.after_id):
        raise InvalidArgument(
            f"after_id '{shown(request.after_id)}' is invalid: expected an event id '<ms>-<seq>', "
            "'0' (the oldest event kept) or empty (from now on)"
        )


class EventWatch:
    """Serves WatchEvents from the events stream, at most ``max_watchers`` streams at once."""

    def __init__(self, redis: aioredis.Redis, *, max_watchers: int = MAX_WATCHERS) -> None:
        self._redis = redis
        self._max_watchers = max_watchers
        self._watchers = 0

    async def watch(self, request: WatchRequest, is_visible: IsVisible) -> AsyncGenerator[Event, None]:
        """Yield the events after ``request.after_id`` that ``is_visible`` lets through, in order.

        Raises:
            InvalidArgument: The position or the model name is malformed.
            FailedPrecondition: The position is no longer kept (or is newer than the newest event),
                or the watcher fell behind the stream's trimming.
            ResourceExhausted: Too many streams are open on this registry.
            Unavailable: Redis cannot be reached.
        """
        _check_request(request)
        if self._watchers >= self._max_watchers:
            raise ResourceExhausted(f"this registry serves {self._max_watchers} event streams already; retry later")
        self._watchers += 1
        try:
            last_id, newest = await self._start(request.after_id)
            async for event in self._read(last_id, newest, request.is_following):
                if (not request.model or event.model == request.model) and await is_visible(event):
                    yield event
        finally:
            self._watchers -= 1

    async def _start(self, after_id: str) -> tuple[str, str]:
        """Return the id to read after and the newest event's id ("0-0": none).

        Raises:
            FailedPrecondition: ``after_id`` is not a kept event.
        """
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xrange(keys.EVENTS, count=1)
                pipe.xrevrange(keys.EVENTS, count=1)
                if _ID_RE.fullmatch(after_id):
                    pipe.xrange(keys.EVENTS, min=after_id, max=after_id, count=1)
                oldest, newest, *kept = await pipe.execute()
        newest_id = newest[0][0].decode() if newest else "0-0"
        if after_id == "":
            return newest_id, newest_id
        if after_id == "0":
            return "0-0", newest_id
        if not kept[0]:
            raise self._not_kept(after_id, oldest, newest_id)
        return after_id, newest_id

    @staticmethod
    def _not_kept(after_id: str, oldest: Any, newest_id: str) -> FailedPrecondition:
        if not oldest or _newer(after_id, newest_id):
            return FailedPrecondition(
                f"after_id {after_id} is newer than the newest event ({newest_id}): the events stream was reset; "
                "start again from '0' or '' and reload what you keep"
            )
        oldest_id = oldest[0][0].decode()
        if _newer(oldest_id, after_id):
            return FailedPrecondition(
                f"after_id {after_id} is older than the oldest event kept ({oldest_id}; the stream keeps about "
                f"the last {events.MAX_EVENTS}): events after it may be lost; start again from '0' or ''"
            )
        return FailedPrecondition(f"after_id {after_id} is not the id of an event kept in the stream")

    async def _read(self, last_id: str, newest: str, is_following: bool) -> AsyncIterator[Event]:
        """Yield the events after ``last_id``: up to ``newest``, or on and on when following."""
        while is_following or _newer(newest, last_id):
            with redis_errors(_WHAT):
                batches: Any = await self._redis.xread(
                    {keys.EVENTS: last_id}, count=READ_COUNT, block=BLOCK_MS if is_following else None
                )
            entries = [entry for _stream, stream_entries in batches or [] for entry in stream_entries]
            if not entries:
                if not is_following:
                    return  # nothing after last_id any more: the newest was read already
                continue
            await self._check_kept(last_id)
            for entry_id, fields in entries:
                event = events.event_of(entry_id, fields)
                if not is_following and _newer(event.id, newest):
                    return
                last_id = event.id
                yield event

    async def _check_kept(self, last_id: str) -> None:
        """Refuse to go on when the event read after has been trimmed: events after it may be lost."""
        if last_id == "0-0":
            return
        with redis_errors(_WHAT):
            kept = await self._redis.xrange(keys.EVENTS, min=last_id, max=last_id, count=1)
        if not kept:
            raise FailedPrecondition(
                f"fell behind: the events stream was trimmed past event {last_id}; resume from '0' or ''"
            )


def visibility(get_model: Callable[[str], Awaitable[object]]) -> IsVisible:
    """Return the caller's event filter: the models its API key may see, key events for admins.

    Call it inside the RPC (it reads the calling key's identity). Without keys every event is
    visible. With a tenant's key, a model's event is visible while ``get_model`` (which checks
    ownership) finds the model: a deleted model's last events are not shown to it.
    """
    identity = auth.current_identity()

    async def is_visible(event: Event) -> bool:
        if identity is None:
            return True
        if not event.model:
            return identity.is_admin
        if not identity.may_use(event.model):
            return False
        if not auth.is_restricted():
            return True
        try:
            await get_model(event.model)
        except MaasError:
            return False
        return True

    return is_visible
