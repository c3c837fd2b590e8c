"""The cluster at a glance (``GetClusterStatus``): worker heartbeats and queues, read from Redis.

Workers come from their heartbeat keys (``services.inference.worker``: pool, providers, loaded
models, in-flight entries). For each version a deployment serves: the queue's length (XLEN:
answered entries are deleted, so it is the backlog), its pending entries (XPENDING summary of
the ``workers`` group), the oldest entry's age (its id's timestamp, XRANGE ... COUNT 1), and
the gateways' window hashes of the last minute (``services.common.stats``). Everything is read
in two round trips, whatever the number of workers and versions (after the SCAN).

A caller that does not see every model (a tenant administrator's key, or a key with model
patterns) gets the queues of the deployments it may see (``ModelStore.list_deployments`` filters
them) and every live worker, but each worker's loaded models and load errors only for those
models: the infrastructure is shared, other tenants' model names are not.

NOTE: ages are measured on this host's clock against Redis's entry ids and the heartbeats'
timestamps: hosts must keep their clocks synchronised (NTP), as the deadlines already require.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from services.common import auth, keys
from services.common.metadata import DeploymentRecord
from services.common.redis_conn import redis_errors
from services.common.stats import entry_time_ns, window_keys, window_summary
from services.common.status import ClusterStatus, QueueStatus, WorkerStatus

_WINDOW_COMMANDS = 3
"""Commands per version before its window hashes: XLEN, XPENDING, XRANGE."""


class ClusterStatusReader:
    """Reads the cluster status from Redis for the deployments ``deployments`` lists."""

    def __init__(self, redis: aioredis.Redis, deployments: Callable[[], Awaitable[list[DeploymentRecord]]]) -> None:
        """Read from ``redis``; ``deployments`` lists every deployment (``ModelStore.list_deployments``)."""
        self._redis = redis
        self._deployments = deployments

    async def read(self) -> ClusterStatus:
        """Return the live workers and the queue of every deployed version.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        deployments = await self._deployments()  # only those the calling key may see
        deployed = _served(deployments)
        with redis_errors("cluster status"):
            beats = await self._heartbeats()
            now_s = time.time()
            replies = await self._queue_replies(deployed, now_s)
        now_ms = int(now_s * 1000)
        workers = tuple(sorted((_worker(beat, now_ms) for beat in beats), key=lambda w: w.worker_id))
        if not _sees_every_model():
            workers = tuple(_only(worker, {d.model for d in deployments}) for worker in workers)
        loaded: dict[str, int] = {}
        for worker in workers:
            for name in worker.models:
                loaded[name] = loaded.get(name, 0) + 1
        queues = tuple(
            _queue(deployment, loaded.get(f"{deployment.model}:{deployment.version}", 0), reply, now_s)
            for deployment, reply in zip(deployed, replies, strict=True)
        )
        return ClusterStatus(workers=workers, queues=queues, time_ms=now_ms)

    async def _heartbeats(self) -> list[dict[str, Any]]:
        names = [name async for name in self._redis.scan_iter(match=f"{keys.WORKER_PREFIX}*", count=100)]
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(name)
            raws: list[bytes | None] = await pipe.execute()
        return [beat for raw in raws if raw and isinstance(beat := _json(raw), dict)]

    async def _queue_replies(self, deployed: Sequence[DeploymentRecord], now_s: float) -> list[list[Any]]:
        if not deployed:
            return []
        per_version = 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for deployment in deployed:
                queue = keys.queue(deployment.model, deployment.version)
                pipe.xlen(queue)
                pipe.xpending(queue, keys.QUEUE_GROUP)
                pipe.xrange(queue, count=1)
                windows, _ = window_keys(deployment.model, deployment.version, now_s)
                for window in windows:
                    pipe.hgetall(window)
                per_version = _WINDOW_COMMANDS + len(windows)
            flat: list[Any] = await pipe.execute(raise_on_error=False)
        for reply in flat:
            # NOGROUP: no worker has ever read the queue (its XPENDING counts 0); anything else is a bug.
            if isinstance(reply, redis.exceptions.ResponseError) and not str(reply).startswith("NOGROUP"):
                raise reply
        return [flat[i : i + per_version] for i in range(0, len(flat), per_version)]


def _sees_every_model() -> bool:
    """Whether the calling key sees every model: auth off, or a ``system`` key whose patterns include ``*``."""
    identity = auth.current_identity()
    return identity is None or (not auth.is_restricted() and "*" in identity.models)


def _only(worker: WorkerStatus, models: set[str]) -> WorkerStatus:
    """``worker`` with the loaded versions and load errors of ``models`` only (``name:version...``)."""
    return replace(
        worker,
        models=tuple(m for m in worker.models if m.partition(":")[0] in models),
        load_errors=tuple(e for e in worker.load_errors if e.partition(":")[0] in models),
    )


def _served(deployments: Sequence[DeploymentRecord]) -> list[DeploymentRecord]:
    """One record per served version (each with ``version`` set), by model then version."""
    served = [replace(d, version=version) for d in deployments for version in d.served_versions]
    return sorted(served, key=lambda d: (d.model, d.version))


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _worker(beat: Mapping[str, Any], now_ms: int) -> WorkerStatus:
    return WorkerStatus(
        worker_id=str(beat.get("worker_id", "")),
        pool=str(beat.get("pool", "")),
        host=str(beat.get("host", "")),
        providers=tuple(beat.get("providers", ())),
        models=tuple(beat.get("models", ())),
        in_flight=int(beat.get("in_flight", 0)),
        heartbeat_age_ms=max(0, now_ms - int(beat.get("ts_ms", now_ms))),
        load_errors=tuple(str(error) for error in beat.get("load_errors", ())),
        generations=int(beat.get("generations", 0)),
        max_generations=int(beat.get("max_generations", 0)),
    )


def _queue(deployment: DeploymentRecord, workers: int, reply: Sequence[Any], now_s: float) -> QueueStatus:
    length, pending, oldest, *windows = reply
    _, window_s = window_keys(deployment.model, deployment.version, now_s)
    hashes = [
        {name.decode(): int(value) for name, value in fields.items()} for fields in windows if isinstance(fields, dict)
    ]
    oldest_age_ms = 0
    if isinstance(oldest, list) and oldest:
        oldest_age_ms = max(0, int(now_s * 1000) - entry_time_ns(oldest[0][0]) // 1_000_000)
    return QueueStatus(
        model=deployment.model,
        version=deployment.version,
        pool=deployment.pool,
        workers=workers,
        length=length if isinstance(length, int) else 0,
        pending=_pending_count(pending),
        oldest_age_ms=oldest_age_ms,
        calls=window_summary(hashes, window_s),
    )


def _pending_count(reply: Any) -> int:
    """The XPENDING summary's count; 0 when the group does not exist yet (NOGROUP: no worker ever read)."""
    if isinstance(reply, redis.exceptions.ResponseError) or not isinstance(reply, dict):
        return 0
    return int(reply.get("pending", 0))
