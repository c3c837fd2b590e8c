"""Tenant quotas at the gateway: the quota cache, the refusals, the in-flight release and usage counts.

The limits themselves are enforced in Redis by the admission script (``ENQUEUE_MANY_LUA``), in
the same call that checks the queue length and XADDs the entry, so they hold across every
gateway replica and cost no extra round trip:

- Rate: a token bucket per tenant (``keys.quota_bucket``): ``rps`` tokens a second, at most
  ``burst``; each admitted call takes one. Time is Redis's ``TIME``, so gateway clocks do not
  matter.
- Concurrency: the calls in flight per tenant (``keys.quota_in_flight``), a sorted set of
  ``<reply stream>:<call id>`` scored by the call's deadline (epoch ms). A call ends (reply,
  error, deadline, client cancel) in ``Router._send``'s ``finally``, which hands its ZREM to
  the next admission round trip. If the gateway dies first, the member expires at the call's
  deadline (the script drops expired members before counting), so a crash holds a slot for at
  most ``default_timeout_s``; a counter with a TTL would instead leak or free slots wholesale.

On a Redis Cluster the tenant's keys (``{tenant}``) and the queue (``{model:version}``) are in
different slots, which one script cannot span; admission (``services.gateway.admission``) then
takes the quota first and gives back what the queue refused (``give_back_commands``).

Calls without a tenant (auth off) and tenants without limits skip both. Quotas are read from
the tenant records (``keys.TENANTS``, written by the registry's ``SetTenantQuota``) and cached;
the registry's ``tenant_quota_set`` event clears the cache on every gateway.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter

from services.common import events, keys, usage
from services.common.auth import QUOTA_EVENT, TenantQuota, TenantRecord
from services.common.errors import ResourceExhausted
from services.common.redis_conn import redis_errors
from services.common.tasks import finish_tasks

log = structlog.get_logger(__name__)

TENANT_REQUESTS = Counter(
    "maas_gateway_tenant_requests",
    "Inference calls by tenant and final code (quota refusals included)",
    ["tenant", "code"],
)
IN_FLIGHT_RETRY_MS = 100
"""The wait suggested at the in-flight cap (when a call ends is unknown)."""
RATE_LIMITED, AT_IN_FLIGHT_CAP = 1, 2
"""Refusal kinds in the admission script's replies."""
FLUSH_INTERVAL_S = 1.0
"""How often the counted calls are sent to Redis (``services.common.usage``)."""

Commands = list[tuple[Any, ...]]


class RateLimited(ResourceExhausted):
    """A tenant is over its rate limit: no token before ``retry_after_ms``."""

    def __init__(self, tenant: str, quota: TenantQuota, retry_after_ms: int) -> None:
        """Name the tenant's limit and the wait."""
        super().__init__(
            f"tenant '{tenant}' is over its rate limit of {quota.rps:g} calls/s (burst {quota.burst}); "
            f"retry in {retry_after_ms} ms",
            retry_after_ms=retry_after_ms,
        )
        self.retry_after_ms = retry_after_ms


def refusal(tenant: str, quota: TenantQuota, reply: Sequence[int]) -> ResourceExhausted:
    """The error of a call the admission script refused for ``tenant``'s quota.

    Args:
        tenant: The calling key's tenant.
        quota: The quota the call was checked against.
        reply: The script's reply for the call: ``[1, wait ms]`` or ``[2, calls in flight]``.
    """
    kind, value = int(reply[0]), int(reply[1])
    if kind == RATE_LIMITED:
        return RateLimited(tenant, quota, value)
    return ResourceExhausted(
        f"tenant '{tenant}' has {value} calls in flight, its limit (max_in_flight {quota.max_in_flight}); "
        f"retry in {IN_FLIGHT_RETRY_MS} ms or when a call ends",
        retry_after_ms=IN_FLIGHT_RETRY_MS,
    )


def release_command(tenant: str, reply_to: str, call_id: str) -> tuple[str, ...]:
    """The command that frees one call's in-flight slot (the member the admission script added)."""
    return ("ZREM", keys.quota_in_flight(tenant), f"{reply_to}:{call_id}")


GIVE_BACK_LUA = """
-- KEYS[1]: a tenant's token bucket; ARGV[1]: tokens to return (calls the queue refused after
-- the quota was taken, on a Redis Cluster). A bucket that expired meanwhile was full: nothing to
-- return. The admission script caps the tokens at the burst when it next reads them.
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', ARGV[1]) end
return 1
"""
"""Return tokens to a tenant's bucket (cluster admission: calls the queue refused)."""


def give_back_commands(tenant: str, quota: TenantQuota, reply_to: str, call_ids: Sequence[str]) -> Commands:
    """The commands that return the quota taken for ``call_ids`` (their tokens and in-flight slots)."""
    commands: Commands = [release_command(tenant, reply_to, call_id) for call_id in call_ids]
    if quota.max_in_flight <= 0:
        commands = []
    if quota.rps > 0 and call_ids:
        commands.append(("EVAL", GIVE_BACK_LUA, 1, keys.quota_bucket(tenant), len(call_ids)))
    return commands


class Quotas:
    """A gateway's view of tenant quotas and its per-tenant call counts.

    Args:
        redis: Client for tenant records and events (its socket timeout exceeds one second).
        send_soon: Sends commands with the next admission round trip (``Admission.send_soon``).
        ttl_s: How long a quota is trusted without reading it again (events clear it sooner).
    """

    def __init__(self, redis: aioredis.Redis, send_soon: Callable[[Commands], None], *, ttl_s: float) -> None:
        self._redis = redis
        self._send_soon = send_soon
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, TenantQuota]] = {}
        self._empty_until: dict[str, float] = {}
        """Tenants whose bucket was empty, until when (loop time): refused here, without Redis."""
        self._generation = 0
        self._counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._counters: dict[tuple[str, str], Any] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start following registry events and sending the counted calls."""
        self._tasks = [
            asyncio.create_task(self._follow_events(), name="quota-events"),
            asyncio.create_task(self._flush_loop(), name="usage-flush"),
        ]

    async def stop(self) -> None:
        """Stop both loops; hand what is still counted to admission."""
        await finish_tasks(self._tasks, 0)
        self._tasks = []
        self._flush()

    def invalidate(self) -> None:
        """Forget every quota read (a read in flight is not cached either) and every empty bucket."""
        self._generation += 1
        self._cache.clear()
        self._empty_until.clear()

    async def quota(self, tenant: str) -> TenantQuota:
        """Return ``tenant``'s quota (no limits for an unknown tenant).

        Raises:
            Unavailable: Redis cannot be reached.
        """
        now = asyncio.get_running_loop().time()
        cached = self._cache.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        generation = self._generation
        with redis_errors("tenant quotas"):
            raw = await self._redis.hget(keys.TENANTS, tenant)
        quota = TenantRecord.from_json(raw).quota if raw is not None else TenantQuota()
        if generation == self._generation:
            self._cache[tenant] = (now + self._ttl_s, quota)
        return quota

    def check_bucket(self, tenant: str, quota: TenantQuota) -> None:
        """Refuse a call at once while the tenant's bucket is known to be empty.

        The script said when the next token comes; no gateway can add one sooner, so a flooding
        tenant costs no Redis round trip until then.

        Raises:
            RateLimited: The bucket is empty, with the wait left.
        """
        until = self._empty_until.get(tenant)
        if until is None:
            return
        left_s = until - asyncio.get_running_loop().time()
        if left_s <= 0 or not quota.rps:
            del self._empty_until[tenant]
            return
        raise RateLimited(tenant, quota, max(1, round(left_s * 1000)))

    def bucket_empty(self, tenant: str, retry_after_ms: int) -> None:
        """Remember that ``tenant``'s bucket has no token for ``retry_after_ms``."""
        self._empty_until[tenant] = asyncio.get_running_loop().time() + retry_after_ms / 1000

    def release(self, tenant: str, reply_to: str, call_id: str) -> None:
        """Free a call's in-flight slot (sent with the next admission round trip, at once)."""
        self._send_soon([release_command(tenant, reply_to, call_id)])

    def record(self, tenant: str, code: str) -> None:
        """Count one finished call of ``tenant`` (in the metrics now, in Redis within a second)."""
        counter = self._counters.get((tenant, code))
        if counter is None:
            counter = self._counters[(tenant, code)] = TENANT_REQUESTS.labels(tenant=tenant, code=code)
        counter.inc()
        counts = self._counts[tenant]
        counts[0] += 1
        counts[1] += code != "OK"

    def _flush(self) -> None:
        taken, self._counts = self._counts, defaultdict(lambda: [0, 0])
        commands: Commands = []
        for tenant, (calls, errors) in taken.items():
            commands.append(("HINCRBY", keys.usage(tenant), usage.CALLS, calls))
            if errors:
                commands.append(("HINCRBY", keys.usage(tenant), usage.ERRORS, errors))
        if commands:
            self._send_soon(commands)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self._flush()

    async def _follow_events(self) -> None:
        await events.invalidate_on(self._redis, {QUOTA_EVENT}, self.invalidate, cache="quotas")
