"""What a worker tells Prometheus about its queues and itself, read at scrape time.

Per model version it serves: the queue's length (XLEN: the backlog, acknowledged entries are
deleted), its consumer group's pending entries (XPENDING summary), the age of its oldest entry
(the first id's millisecond part; pending entries count, they are still unanswered) and the
dead-letter stream's length, all in one round trip (``collectors.LoopCollector``, cached 1 s).
Every worker of a pool reports the same queues: dashboards take the ``max``.

Per worker: ``maas_inference_workers{pool}`` is 1 and ``maas_inference_loaded_models`` is 1
per loaded version; dashboards and alerts ``sum`` them over processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import Histogram

from services.common import keys, stats
from services.common.collectors import GaugeSpec, LoopCollector, Samples, register
from services.common.queue import now_ms
from services.common.redis_conn import count_redis_error, send_commands

QUEUE_LENGTH = "maas_inference_queue_length"
QUEUE_PENDING = "maas_inference_queue_pending"
QUEUE_OLDEST_AGE = "maas_inference_queue_oldest_age_seconds"
DEAD_LETTER_LENGTH = "maas_inference_dead_letter_length"
WORKERS = "maas_inference_workers"
LOADED_MODELS = "maas_inference_loaded_models"

_VERSION = ("model", "version")

QUEUES = register(
    LoopCollector(
        [
            GaugeSpec(QUEUE_LENGTH, "Entries in the model version's queue (waiting or being run).", _VERSION),
            GaugeSpec(QUEUE_PENDING, "Entries read by a worker and not yet answered (XPENDING).", _VERSION),
            GaugeSpec(QUEUE_OLDEST_AGE, "Age of the queue's oldest entry, in seconds (0: empty).", _VERSION),
            GaugeSpec(DEAD_LETTER_LENGTH, "Entries in the model version's dead-letter stream.", _VERSION),
            GaugeSpec(WORKERS, "Live inference workers in this process, by pool.", ("pool",), merge="sum"),
            GaugeSpec(LOADED_MODELS, "Model versions loaded by this process's workers.", ("pool", *_VERSION), "sum"),
        ]
    )
)
MODEL_LOAD_SECONDS = Histogram(
    "maas_inference_model_load_seconds",
    "Time to load a model version (download if not cached, then create its session), in seconds.",
    ["model", "version"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


def watch_worker(owner: object, pool: str, served: Callable[[], Sequence[str]], redis: aioredis.Redis) -> None:
    """Expose ``owner``'s queues and state until ``unwatch_worker``; call on the worker's loop.

    Args:
        owner: The worker (identifies it in ``unwatch_worker``).
        pool: Its pool.
        served: Returns the ``model:version`` names it serves now.
        redis: Its Redis client (the worker ACL allows XLEN, XPENDING and XRANGE on its queues).
    """

    async def refresh() -> Samples:
        versions = [tuple(name.rsplit(":", 1)) for name in served()]
        samples = await _queue_samples(redis, versions)
        samples[WORKERS] = {(pool,): 1.0}
        samples[LOADED_MODELS] = {(pool, model, version): 1.0 for model, version in versions}
        return samples

    QUEUES.add(owner, refresh)


def unwatch_worker(owner: object) -> None:
    """Stop exposing ``owner`` (drained)."""
    QUEUES.remove(owner)


async def _queue_samples(redis: aioredis.Redis, versions: Sequence[tuple[str, ...]]) -> Samples:
    commands: list[tuple[Any, ...]] = []
    for model, version in versions:
        queue = keys.queue(model, int(version))
        commands += [
            ("XLEN", queue),
            ("XPENDING", queue, keys.QUEUE_GROUP),
            ("XRANGE", queue, "-", "+", "COUNT", 1),
            ("XLEN", keys.dead_letter(model, int(version))),
        ]
    replies = await send_commands(redis, commands) if commands else []
    now = now_ms()
    samples: Samples = {QUEUE_LENGTH: {}, QUEUE_PENDING: {}, QUEUE_OLDEST_AGE: {}, DEAD_LETTER_LENGTH: {}}
    for index, labels in enumerate(versions):
        length, pending, first, dead = (_ok(reply) for reply in replies[4 * index : 4 * index + 4])
        samples[QUEUE_LENGTH][labels] = float(length or 0)
        samples[QUEUE_PENDING][labels] = float(pending[0] if pending else 0)
        samples[QUEUE_OLDEST_AGE][labels] = _age_s(first, now)
        samples[DEAD_LETTER_LENGTH][labels] = float(dead or 0)
    return samples


def _ok(reply: Any) -> Any:
    """A reply, or None for an error reply (NOGROUP before the group exists), counted."""
    if isinstance(reply, redis.exceptions.ResponseError):
        count_redis_error(reply)
        return None
    return reply


def _age_s(first: Any, now: int) -> float:
    """Age of the entry in an ``XRANGE ... COUNT 1`` reply, 0 for none."""
    if not first:
        return 0.0
    entry_id = first[0][0]
    added_ms = stats.entry_time_ns(entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()) // 1_000_000
    return max(0.0, (now - added_ms) / 1000)
