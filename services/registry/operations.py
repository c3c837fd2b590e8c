"""Optimisation operations in Redis, so that any registry replica can answer a poll.

Each operation is one JSON value (``OperationRecord``), field ``record`` of the hash
``keys.operation(id)``, written whole with HSET and PEXPIRE in one MULTI: it expires ``ttl_s`` after
its last write, so a finished operation stays readable for about a day and then vanishes by itself.
(A hash, not SET: the registry's Redis user may not SET, which would let it overwrite workers'
heartbeats on Redis 6.2, where ACLs cannot tie a command to some key patterns only.)

Abandoned operations: the registry that runs an operation renews its ``lease_until_ms`` (every
third of the lease). If that registry dies, nobody renews it; whoever reads the operation next
after the lease expired marks it FAILED (UNAVAILABLE, "start it again") in a WATCH/MULTI
transaction, so no operation stays PENDING or RUNNING forever, and two readers agree.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from services.common import keys
from services.common.errors import InvalidArgument, NotFound
from services.common.optimization import OperationRecord
from services.common.queue import now_ms
from services.common.redis_conn import redis_errors

_WHAT = "operation store"
_FIELD = "record"
_ID_RE = re.compile(r"[0-9a-f]{32}")
_ABANDONED = "the registry running this operation stopped before it ended (its lease expired): start it again"


def new_operation_id() -> str:
    """Return a fresh operation id (32 lower-case hex characters)."""
    return uuid.uuid4().hex


def check_operation_id(operation_id: str) -> None:
    """Refuse a malformed operation id.

    Raises:
        InvalidArgument: It is not 32 lower-case hex characters.
    """
    if not _ID_RE.fullmatch(operation_id):
        shown = operation_id[:40].encode("unicode_escape").decode()
        raise InvalidArgument(f"id '{shown}' is not an operation id: expected 32 lower-case hex characters")


class OperationStore:
    """Reads and writes operations; marks abandoned ones FAILED when it reads them.

    Args:
        redis: Client of the registry's metadata.
        ttl_s: Expiry of an operation after its last write.
        lease_s: How long a running operation stays alive without a renewal.
        poll_interval_s: How often ``watch`` reads an operation that has not ended.
    """

    def __init__(self, redis: aioredis.Redis, *, ttl_s: int, lease_s: float, poll_interval_s: float = 0.25) -> None:
        self._redis = redis
        self._ttl_ms = ttl_s * 1000
        self.lease_s = lease_s
        self._poll_interval_s = poll_interval_s

    async def save(self, record: OperationRecord) -> OperationRecord:
        """Store ``record`` with a fresh ``updated_at_ms`` and, unless it ended, a renewed lease.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        at_ms = now_ms()
        lease = record.lease_until_ms if record.is_done else at_ms + int(self.lease_s * 1000)
        stored = replace(record, updated_at_ms=at_ms, lease_until_ms=lease)
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                self._write(pipe, keys.operation(record.id), stored)
                await pipe.execute()
        return stored

    def _write(self, pipe: Any, key: str, record: OperationRecord) -> None:
        pipe.hset(key, _FIELD, record.to_json())
        pipe.pexpire(key, self._ttl_ms)

    async def get(self, operation_id: str) -> OperationRecord:
        """Return an operation; one whose lease expired is marked FAILED first.

        Raises:
            InvalidArgument: The id is malformed.
            NotFound: No such operation (or it expired).
            Unavailable: Redis cannot be reached.
        """
        check_operation_id(operation_id)
        key = keys.operation(operation_id)
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                raw = await pipe.hget(key, _FIELD)
                if raw is None:
                    raise NotFound(f"operation '{operation_id}' not found (unknown, or expired)")
                record = OperationRecord.from_json(raw)
                if record.is_done or record.lease_until_ms >= now_ms():
                    return record
                failed = record.failed("UNAVAILABLE", _ABANDONED, now_ms())
                pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                self._write(pipe, key, failed)
                try:
                    await pipe.execute()
                except redis.exceptions.WatchError:  # the runner or another reader wrote first
                    return await self.get(operation_id)
        return failed

    async def watch(self, operation_id: str) -> AsyncGenerator[OperationRecord, None]:
        """Yield the operation now, then each change of it, until it ends.

        NOTE: it polls (every ``poll_interval_s``): an operation changes a handful of times in
        minutes, and a key read costs less than a pub/sub channel per operation in every role's ACL.

        Raises:
            InvalidArgument: The id is malformed.
            NotFound: No such operation, or it expired meanwhile.
            Unavailable: Redis cannot be reached.
        """
        last = await self.get(operation_id)
        yield last
        while not last.is_done:
            await asyncio.sleep(self._poll_interval_s)
            current = await self.get(operation_id)
            if current != last:
                last = current
                yield current
