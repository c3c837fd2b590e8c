"""Admission: enqueue calls unless their queue is full, coalescing calls that arrive together.

Every call that reaches ``Admission.enqueue`` while the previous round trip is in flight joins
the next one: a single pipelined round trip carries one ``ENQUEUE_MANY_LUA`` script per queue,
so the queue limit stays an atomic check per queue (exact at the limit) while the per-call cost
of a Redis command (packing, a pooled connection, a parse, a task switch) is shared. The calling
tenant's quota (``services.gateway.quotas``) is checked and taken in the same script, per entry;
entries of different tenants go to separate scripts of the same round trip. Commands that need
no answer (in-flight releases, usage counts: ``send_soon``) ride along, before the scripts.

On a Redis Cluster one script cannot span the queue's slot (``{model:version}``) and the
tenant's (``{tenant}``), so a limited tenant's calls take two round trips, in this order:

1. The same script with the tenant's two keys alone takes each call's token and in-flight slot
   (or refuses it: RESOURCE_EXHAUSTED at once), atomically per tenant across every gateway.
2. The script with the queue alone admits the granted calls while the queue has room.
3. Calls the queue refused give their token and slot back (``quotas.give_back_commands``, sent
   with the next round trip).

So a tenant never gets more than its quota: the quota is taken before the call is queued. The
price is conservative: between steps 1 and 3 a refused call holds its token and slot for a round
trip, so a concurrent call of the same tenant may be refused although it would have fit; a
gateway that dies in between loses that token (the bucket refills) and the slot expires at the
call's deadline, as for any call of a dead gateway. The queue limit stays one atomic check per
queue. Tagging the tenant's counters per queue instead would have made the quota per model
version, not per tenant. On a single Redis nothing changes: one script, one round trip.
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
from services.common.redis_conn import count_redis_error, is_cluster, redis_errors, send_commands
from services.common.tasks import finish_tasks
from services.gateway.quotas import Commands, give_back_commands, refusal, release_command

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
_Group = tuple[str, int, str, str, TenantQuota, str]
"""Entries that share one script: queue, max length, reply stream, tenant and its quota, reply listener."""


def _quota_keys(group: _Group) -> tuple[str, ...]:
    tenant, quota = group[3], group[4]
    return (keys.quota_bucket(tenant), keys.quota_in_flight(tenant)) if quota.is_limited else ()


def _script(group: _Group, items: list[_Pending], script_keys: tuple[str, ...]) -> tuple[Any, ...]:
    _queue, max_length, reply_to, tenant, quota, reply_addr = group
    return (
        "EVAL", ENQUEUE_MANY_LUA, len(script_keys), *script_keys, max_length, reply_to, tenant,
        quota.rps, quota.burst, quota.max_in_flight, reply_addr, *(v for i in items for v in i.entry.enqueue_args()),
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
            entry = item.entry
            groups[(item.queue, item.max_length, entry.reply_to, entry.tenant, quota, entry.reply_addr)].append(item)
        later, self._later = self._later, []
        is_split = is_cluster(self._redis)
        if is_split:  # the quota first, in the tenant's slot (see the module's notes)
            granted = await self._take_quotas(groups, later, batch)
            if granted is None:
                return
            groups, later = granted, []
        scripts = [_script(g, items, (g[0],) if is_split else (g[0], *_quota_keys(g))) for g, items in groups.items()]
        results = await self._send([*later, *scripts], len(later), batch)
        if results is None:
            return
        for (group, items), result in zip(groups.items(), results, strict=True):
            self._resolve(group, items, result, gives_back=is_split)

    async def _send(self, commands: Commands, later: int, batch: list[_Pending]) -> list[Any] | None:
        """Send ``commands`` (the first ``later`` need no answer); return the others' replies, None if failed."""
        try:
            with redis_errors("request queue"):
                results = await send_commands(self._redis, commands)
        except MaasError as exc:
            # NOTE: lost releases and counts: the in-flight members expire at their deadlines.
            log.warning("admission_commands_lost", commands=later, error=exc.message)
            self._fail(batch, exc)
            return None
        for result in results[:later]:
            if isinstance(result, redis.exceptions.RedisError):
                count_redis_error(result)
                log.warning("admission_command_rejected", error=str(result))
        return results[later:]

    async def _take_quotas(
        self, groups: dict[_Group, list[_Pending]], later: Commands, batch: list[_Pending]
    ) -> dict[_Group, list[_Pending]] | None:
        """Take the limited groups' quota (cluster step 1); return the groups of the calls to enqueue."""
        limited = [(group, items) for group, items in groups.items() if group[4].is_limited]
        scripts = [_script(group, items, _quota_keys(group)) for group, items in limited]
        results = await self._send([*later, *scripts], len(later), batch)
        if results is None:
            return None
        granted = {group: items for group, items in groups.items() if not group[4].is_limited}
        for (group, items), result in zip(limited, results, strict=True):
            if isinstance(result, redis.exceptions.RedisError):
                self._resolve(group, items, result)
                continue
            assert isinstance(result, list) and len(result) == len(items), result
            refused = [(item, reply) for item, reply in zip(items, result, strict=True) if isinstance(reply, list)]
            kept = [item for item, reply in zip(items, result, strict=True) if not isinstance(reply, list)]
            self._resolve(group, [item for item, _reply in refused], [reply for _item, reply in refused])
            gone = [item for item in kept if item.future.done()]  # the caller left: not worth a queue slot
            self._give_back(group, gone)
            if len(gone) < len(kept):
                granted[group] = [item for item in kept if not item.future.done()]
        return granted

    def _give_back(self, group: _Group, items: list[_Pending]) -> None:
        if items:
            self.send_soon(give_back_commands(group[3], group[4], group[2], [item.entry.id for item in items]))

    def _resolve(self, group: _Group, items: list[_Pending], result: object, *, gives_back: bool = False) -> None:
        """Settle ``items`` with their script replies; ``gives_back``: return the quota of those refused."""
        if isinstance(result, redis.exceptions.RedisError):
            count_redis_error(result)
            log.error("enqueue_rejected", error=str(result))
            self._fail(items, MaasError("request queue: redis refused the request"))
            if gives_back and group[4].is_limited:
                self._give_back(group, items)
            return
        assert isinstance(result, list) and len(result) == len(items), result
        if gives_back and group[4].is_limited:
            self._give_back(group, [item for item, reply in zip(items, result, strict=True) if reply in (0, None)])
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
