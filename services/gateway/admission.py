"""Admission: enqueue calls unless their queue is full, coalescing calls that arrive together.

Every call that reaches ``Admission.enqueue`` while the previous round trip is in flight joins
the next one: a single pipelined round trip carries one ``ENQUEUE_MANY_LUA`` script per queue,
so the queue limit stays an atomic check per queue (exact at the limit) while the per-call cost
of a Redis command (packing, a pooled connection, a parse, a task switch) is shared.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.common.errors import MaasError, Unavailable
from services.common.queue import ENQUEUE_MANY_LUA, QueuedRequest
from services.common.redis_conn import redis_errors, send_commands
from services.common.tasks import finish_tasks

log = structlog.get_logger(__name__)


@dataclass
class _Pending:
    """One call waiting for its enqueue: True when queued, False when the queue was full."""

    queue: str
    max_length: int
    entry: QueuedRequest
    future: asyncio.Future[bool] = field(repr=False)


def _values(items: list[_Pending]) -> list[str | int | bytes]:
    return [value for item in items for value in item.entry.enqueue_args()]


class Admission:
    """Owns the enqueue round trips of one gateway process."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._pending: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the task that sends the coalesced round trips."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._flush_loop(), name="admission")

    async def stop(self) -> None:
        """Stop sending; calls still waiting fail as unavailable."""
        if self._task is not None:
            await finish_tasks([self._task], 0)
        self._fail(self._take(), Unavailable("gateway is stopping; retry"))

    async def enqueue(self, queue: str, max_length: int, entry: QueuedRequest) -> bool:
        """Append ``entry`` to ``queue`` unless the queue holds ``max_length`` entries.

        Returns:
            Whether the entry was queued (False: the queue is full).

        Raises:
            Unavailable: Redis cannot be reached.
            MaasError: Redis refused the script.
        """
        assert self._wake is not None, "Admission.start() was not called"
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(queue, max_length, entry, future))
        self._wake.set()
        return await future

    def _take(self) -> list[_Pending]:
        taken, self._pending = self._pending, []
        return taken

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if batch:
                try:
                    await self._flush(batch)
                except asyncio.CancelledError:
                    self._fail(batch, Unavailable("gateway is stopping; retry"))
                    raise
                except Exception as exc:  # never leave a caller waiting: every future gets an outcome
                    log.exception("admission_failed")
                    self._fail(batch, MaasError(f"request queue: {type(exc).__name__}"))

    async def _flush(self, batch: list[_Pending]) -> None:
        groups: dict[tuple[str, int, str], list[_Pending]] = defaultdict(list)
        for item in batch:
            groups[(item.queue, item.max_length, item.entry.reply_to)].append(item)
        commands = [
            (
                "EVAL",
                ENQUEUE_MANY_LUA,
                1,
                queue,
                max_length,
                reply_to,
                *(v for i in items for v in i.entry.enqueue_args()),
            )
            for (queue, max_length, reply_to), items in groups.items()
        ]
        try:
            with redis_errors("request queue"):
                results = await send_commands(self._redis, commands)
        except MaasError as exc:
            self._fail(batch, exc)
            return
        for items, result in zip(groups.values(), results, strict=True):
            self._resolve(items, result)

    def _resolve(self, items: list[_Pending], result: object) -> None:
        if isinstance(result, redis.exceptions.RedisError):
            log.error("enqueue_rejected", error=str(result))
            self._fail(items, MaasError("request queue: redis refused the request"))
            return
        assert isinstance(result, list) and len(result) == len(items), result
        for item, entry_id in zip(items, result, strict=True):
            if not item.future.done():
                item.future.set_result(entry_id not in (0, None))

    @staticmethod
    def _fail(items: list[_Pending], error: MaasError) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)
