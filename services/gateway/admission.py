"""Admission: enqueue calls unless their queue is full, coalescing calls that arrive together.

Every call that reaches ``Admission.enqueue`` while the previous round trip is in flight joins
the next one: a single pipelined round trip carries one ``ENQUEUE_MANY_LUA`` script per queue,
so the queue limit stays an atomic check per queue (exact at the limit) while the per-call cost
of a Redis command (packing, a pooled connection, a parse, a task switch) is shared. The calling
tenant's quota (``services.gateway.quotas``) is checked and taken in the same script, per entry;
entries of different tenants go to separate scripts of the same round trip. Commands that need
no answer (in-flight releases, usage counts: ``send_soon``) ride along, before the scripts.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.common import keys
from services.common.auth import TenantQuota
from services.common.errors import MaasError, Unavailable
from services.common.queue import ENQUEUE_MANY_LUA, QueuedRequest
from services.common.redis_conn import count_redis_error, redis_errors, send_commands
from services.common.tasks import finish_tasks
from services.gateway.quotas import Commands, refusal, release_command

log = structlog.get_logger(__name__)


@dataclass
class _Pending:
    """One call waiting for its enqueue: True when queued, False when the queue was full."""

    queue: str
    max_length: int
    entry: QueuedRequest
    quota: TenantQuota | None
    """The entry's tenant's limits (None or not limited: no quota check)."""
    future: asyncio.Future[bool] = field(repr=False)


_NO_QUOTA = TenantQuota()
_Group = tuple[str, int, str, str, TenantQuota]
"""Entries that share one script: queue, max length, reply stream, tenant and its quota."""


def _script(group: _Group, items: list[_Pending]) -> tuple[Any, ...]:
    queue, max_length, reply_to, tenant, quota = group
    quota_keys = (keys.quota_bucket(tenant), keys.quota_in_flight(tenant)) if quota.is_limited else ()
    return (
        "EVAL", ENQUEUE_MANY_LUA, 1 + len(quota_keys), queue, *quota_keys, max_length, reply_to, tenant,
        quota.rps, quota.burst, quota.max_in_flight, *(v for i in items for v in i.entry.enqueue_args()),
    )  # fmt: skip


class Admission:
    """Owns the enqueue round trips of one gateway process."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._pending: list[_Pending] = []
        self._later: Commands = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the task that sends the coalesced round trips."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._flush_loop(), name="admission")

    async def stop(self) -> None:
        """Stop sending; calls still waiting fail as unavailable, commands still waiting are sent."""
        if self._task is not None:
            await finish_tasks([self._task], 0)
        self._fail(self._take(), Unavailable("gateway is stopping; retry"))
        later, self._later = self._later, []
        if later:
            try:
                await send_commands(self._redis, later)
            except redis.exceptions.RedisError as exc:  # releases expire at their deadlines anyway
                log.warning("admission_commands_lost", commands=len(later), error=str(exc))

    async def enqueue(
        self, queue: str, max_length: int, entry: QueuedRequest, quota: TenantQuota | None = None
    ) -> bool:
        """Append ``entry`` to ``queue`` unless the queue holds ``max_length`` entries or ``quota`` says no.

        Args:
            queue: The model version's request stream.
            max_length: The queue's limit.
            entry: The call; its ``tenant`` is charged.
            quota: The tenant's limits; None: no quota check.

        Returns:
            Whether the entry was queued (False: the queue is full).

        Raises:
            ResourceExhausted: The tenant is over its rate limit or at its in-flight cap.
            Unavailable: Redis cannot be reached.
            MaasError: Redis refused the script.
        """
        assert self._wake is not None, "Admission.start() was not called"
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(queue, max_length, entry, quota, future))
        self._wake.set()
        return await future

    def send_soon(self, commands: Commands) -> None:
        """Send ``commands`` (replies unused) with the next round trip, which starts at once if idle."""
        self._later += commands
        if self._wake is not None:
            self._wake.set()

    def _take(self) -> list[_Pending]:
        taken, self._pending = self._pending, []
        return taken

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if batch or self._later:
                try:
                    await self._flush(batch)
                except asyncio.CancelledError:
                    self._fail(batch, Unavailable("gateway is stopping; retry"))
                    raise
                except Exception as exc:  # never leave a caller waiting: every future gets an outcome
                    log.exception("admission_failed")
                    self._fail(batch, MaasError(f"request queue: {type(exc).__name__}"))

    async def _flush(self, batch: list[_Pending]) -> None:
        groups: dict[_Group, list[_Pending]] = defaultdict(list)
        for item in batch:
            quota = item.quota if item.quota is not None and item.entry.tenant else _NO_QUOTA
            groups[(item.queue, item.max_length, item.entry.reply_to, item.entry.tenant, quota)].append(item)
        later, self._later = self._later, []
        commands = [*later, *(_script(group, items) for group, items in groups.items())]
        try:
            with redis_errors("request queue"):
                results = await send_commands(self._redis, commands)
        except MaasError as exc:
            # NOTE: lost releases and counts: the in-flight members expire at their deadlines.
            log.warning("admission_commands_lost", commands=len(later), error=exc.message)
            self._fail(batch, exc)
            return
        for result in results[: len(later)]:
            if isinstance(result, redis.exceptions.RedisError):
                count_redis_error(result)
                log.warning("admission_command_rejected", error=str(result))
        for (group, items), result in zip(groups.items(), results[len(later) :], strict=True):
            self._resolve(group, items, result)

    def _resolve(self, group: _Group, items: list[_Pending], result: object) -> None:
        if isinstance(result, redis.exceptions.RedisError):
            count_redis_error(result)
            log.error("enqueue_rejected", error=str(result))
            self._fail(items, MaasError("request queue: redis refused the request"))
            return
        assert isinstance(result, list) and len(result) == len(items), result
        for item, reply in zip(items, result, strict=True):
            if item.future.done():
                if item.future.cancelled() and not isinstance(reply, list) and reply and group[4].max_in_flight:
                    # The caller left (cancel, deadline) while its entry was admitted: free its slot.
                    self.send_soon([release_command(group[3], group[2], item.entry.id)])
                continue
            if isinstance(reply, list):
                item.future.set_exception(refusal(group[3], group[4], reply))
            else:
                item.future.set_result(reply not in (0, None))

    @staticmethod
    def _fail(items: list[_Pending], error: MaasError) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)
