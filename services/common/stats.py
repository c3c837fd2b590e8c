"""Triton's statistics extension, cluster-wide: one Redis hash per model version, added to with HINCRBY.

Every gateway and every worker adds what it saw to ``keys.stats(model, version)``, so any
gateway answers ``ModelStatistics`` for the whole cluster. Who adds what (Triton's semantics,
docs/protocol/extension_statistics.md):

- Gateways, end to end: ``success`` (count and ns of the calls that succeeded), ``fail`` (of
  those that failed after their model version was resolved) and ``last_inference`` (epoch ms,
  kept as the largest any gateway saw). A gateway counts in memory (``CallStats.record``) and
  adds its counts every ``FLUSH_INTERVAL_S`` in one round trip, so a call costs no Redis command;
  it adds its own unsent counts to what it reads, so it reports its own calls at once and other
  gateways' calls within a flush interval.
- Workers, per batch once it is answered and acked (``BatchStats``), counted in memory and added every
  ``MAAS_INFERENCE_STATS_FLUSH_MS`` in one round trip (``RunStats``): for each request that ran
  successfully, its ``queue`` wait (from its stream entry id's timestamp to the
  start of the batch), ``compute_input`` (decoding the request, stacking the batch),
  ``compute_infer`` (the model run of its batch) and ``compute_output`` (splitting the batch,
  encoding the response); as in Triton, every request of a batch is charged its batch's run, so
  ``ns / count`` is the mean time a request spent there. ``inference_count`` counts batch rows
  (a request of shape [8, ...] to a batchable model counts 8, any request to another model 1),
  ``execution_count`` model runs, and ``batch_stats`` the runs of each batch size with their
  compute times.

The hashes have no TTL (a redeploy keeps them); the registry deletes them with their model.

For "the last minute" (``maas status``), the same flush also adds each version's calls to a
short-lived window hash, ``keys.stats_window(model, version, slot)`` of ``WINDOW_SLOT_S`` slots
(expiring after ``WINDOW_TTL_S``): counts of calls and failures and an end-to-end latency
histogram in fixed ``LATENCY_BUCKETS_MS``; ``window_summary`` turns the last ``WINDOW_SLOTS``
slots into rates and p50/p99. It costs no extra round trip.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, Self, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.common import keys
from services.common.queue import now_ms
from services.common.redis_conn import redis_errors, send_commands
from services.common.tasks import finish_tasks

log = structlog.get_logger(__name__)

FLUSH_INTERVAL_S = 1.0
"""How often a gateway adds its counted calls to Redis."""

# Hash fields.
SUCCESS_COUNT = "success_count"
SUCCESS_NS = "success_ns"
FAIL_COUNT = "fail_count"
FAIL_NS = "fail_ns"
LAST_INFERENCE = "last_inference"
"""Epoch ms of the latest call any gateway finished (only ever raised: ``MAX_FIELD_LUA``)."""
COMPUTE_COUNT = "compute_count"
"""Requests that ran successfully: the count of ``queue`` and of the three compute phases."""
QUEUE_NS = "queue_ns"
COMPUTE_INPUT_NS = "compute_input_ns"
COMPUTE_INFER_NS = "compute_infer_ns"
COMPUTE_OUTPUT_NS = "compute_output_ns"
INFERENCE_COUNT = "inference_count"
EXECUTION_COUNT = "execution_count"
_BATCH_PREFIX = "batch:"
"""Per batch size: ``batch:<size>:count``, ``...:input_ns``, ``...:infer_ns``, ``...:output_ns``."""

MAX_FIELD_LUA = """
-- KEYS[1]: hash; ARGV[1]: field; ARGV[2]: value. Sets the field unless it holds a larger value.
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""

WINDOW_SLOT_S = 10
"""Width of one window slot, in seconds."""
WINDOW_SLOTS = 6
"""Slots read for "the last minute": the current one and the five before it."""
WINDOW_TTL_S = 120
"""A window hash expires this long after its last flush (past any read of it)."""
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)
"""Upper bounds of the window latency histogram; a last bucket holds everything slower."""
WINDOW_CALLS = "calls"
WINDOW_FAILS = "fails"
_LATENCY_PREFIX = "le:"
"""Window histogram fields: ``le:<index into LATENCY_BUCKETS_MS>`` (the last index: slower)."""

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class _Addable(Protocol):
    def add(self, other: Self) -> None: ...


_Key = TypeVar("_Key")
_Counts = TypeVar("_Counts", bound=_Addable)


@dataclass(frozen=True)
class Duration:
    """A count and the total nanoseconds of its occurrences (Triton's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchSizeStats:
    """The model runs of one batch size (Triton's ``InferBatchStatistics``)."""

    batch_size: int
    count: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


@dataclass(frozen=True)
class VersionStats:
    """The cluster-wide statistics of one model version (Triton's ``ModelStatistics``)."""

    model: str
    version: int
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: tuple[BatchSizeStats, ...] = ()
    """By batch size, smallest first."""


def _batch_field(size: int, what: str) -> str:
    return f"{_BATCH_PREFIX}{size}:{what}"


def parse(model: str, version: int, fields: Mapping[str, int]) -> VersionStats:
    """Build a version's statistics from its hash fields (names as in this module, integer values)."""
    computed = fields.get(COMPUTE_COUNT, 0)
    sizes = sorted(
        {int(name.split(":")[1]) for name in fields if name.startswith(_BATCH_PREFIX) and name.count(":") == 2}
    )
    return VersionStats(
        model=model,
        version=version,
        last_inference_ms=fields.get(LAST_INFERENCE, 0),
        inference_count=fields.get(INFERENCE_COUNT, 0),
        execution_count=fields.get(EXECUTION_COUNT, 0),
        success=Duration(fields.get(SUCCESS_COUNT, 0), fields.get(SUCCESS_NS, 0)),
        fail=Duration(fields.get(FAIL_COUNT, 0), fields.get(FAIL_NS, 0)),
        queue=Duration(computed, fields.get(QUEUE_NS, 0)),
        compute_input=Duration(computed, fields.get(COMPUTE_INPUT_NS, 0)),
        compute_infer=Duration(computed, fields.get(COMPUTE_INFER_NS, 0)),
        compute_output=Duration(computed, fields.get(COMPUTE_OUTPUT_NS, 0)),
        batches=tuple(
            BatchSizeStats(
                batch_size=size,
                count=fields.get(_batch_field(size, "count"), 0),
                compute_input_ns=fields.get(_batch_field(size, "input_ns"), 0),
                compute_infer_ns=fields.get(_batch_field(size, "infer_ns"), 0),
                compute_output_ns=fields.get(_batch_field(size, "output_ns"), 0),
            )
            for size in sizes
        ),
    )


def _increments(key: str, fields: Mapping[str, int]) -> list[tuple[Any, ...]]:
    return [("HINCRBY", key, name, value) for name, value in fields.items() if value]


def entry_time_ns(entry_id: bytes) -> int:
    """When a stream entry was added, in epoch ns (from its id's millisecond part)."""
    return int(entry_id.split(b"-", 1)[0]) * 1_000_000


RequestTimes = tuple[int, int, int, int]
"""One request that ran successfully, for ``BatchStats.group_ran``: its queue wait, decode and
encode times (ns) and its batch rows."""


class BatchStats:
    """What worker batches add to their model version's statistics.

    Filled while a batch runs; once the batch is answered and acked it is added to the worker's
    ``RunStats`` (so a batch that is not acked adds nothing), whose ``commands`` are the HINCRBYs,
    one per field that changed.
    """

    __slots__ = ("_batches", "computed", "executions", "infer_ns", "input_ns", "output_ns", "queue_ns", "rows")

    def __init__(self) -> None:
        """Start with nothing counted."""
        self.computed = self.rows = self.executions = 0
        self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0
        self._batches: dict[int, list[int]] = {}

    def group_ran(
        self, requests: Sequence[RequestTimes], *, input_ns: int, output_ns: int, runs: Sequence[tuple[int, int]]
    ) -> None:
        """Count one group of requests that ran together (stacked into one model run, normally).

        Args:
            requests: The group's requests that succeeded, with their own times.
            input_ns: Time spent stacking the group's inputs.
            output_ns: Time spent splitting its outputs.
            runs: (batch rows, ns) of each successful model run of the group: one, unless the
                stacked run failed and its requests ran one by one (then the decode and encode
                times all go to the first run's batch statistics).
        """
        infer_ns = sum(ns for _rows, ns in runs)
        decode_ns = encode_ns = 0
        for queue_ns, decoded_ns, encoded_ns, rows in requests:
            self.computed += 1
            self.rows += rows
            self.queue_ns += max(0, queue_ns)
            self.input_ns += decoded_ns + input_ns
            self.infer_ns += infer_ns
            self.output_ns += encoded_ns + output_ns
            decode_ns += decoded_ns
            encode_ns += encoded_ns
        for rows, ns in runs:
            self.executions += 1
            totals = self._batches.setdefault(rows, [0, 0, 0, 0])
            totals[0] += 1
            totals[1] += decode_ns + input_ns
            totals[2] += ns
            totals[3] += encode_ns + output_ns
            decode_ns = encode_ns = 0

    def add(self, other: BatchStats) -> None:
        """Count ``other``'s batches here too."""
        self.computed += other.computed
        self.rows += other.rows
        self.executions += other.executions
        self.queue_ns += other.queue_ns
        self.input_ns += other.input_ns
        self.infer_ns += other.infer_ns
        self.output_ns += other.output_ns
        for size, values in other._batches.items():
            totals = self._batches.setdefault(size, [0, 0, 0, 0])
            for index, value in enumerate(values):
                totals[index] += value

    def commands(self, key: str) -> list[tuple[Any, ...]]:
        """The HINCRBY commands that add these batches to the hash ``key`` (none if nothing ran)."""
        if not self.computed and not self.executions:
            return []
        fields = {
            COMPUTE_COUNT: self.computed,
            INFERENCE_COUNT: self.rows,
            EXECUTION_COUNT: self.executions,
            QUEUE_NS: self.queue_ns,
            COMPUTE_INPUT_NS: self.input_ns,
            COMPUTE_INFER_NS: self.infer_ns,
            COMPUTE_OUTPUT_NS: self.output_ns,
        }
        for size, (count, input_ns, infer_ns, output_ns) in self._batches.items():
            fields[_batch_field(size, "count")] = count
            fields[_batch_field(size, "input_ns")] = input_ns
            fields[_batch_field(size, "infer_ns")] = infer_ns
            fields[_batch_field(size, "output_ns")] = output_ns
        return _increments(key, fields)


@dataclass
class _Calls:
    """One model version's calls counted by a gateway and not yet added to Redis."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    last_ms: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    """Calls by window histogram bucket (index into ``LATENCY_BUCKETS_MS``)."""

    def fields(self) -> dict[str, int]:
        return {SUCCESS_COUNT: self.success, SUCCESS_NS: self.success_ns, FAIL_COUNT: self.fail, FAIL_NS: self.fail_ns}

    def add(self, other: _Calls) -> None:
        self.success += other.success
        self.success_ns += other.success_ns
        self.fail += other.fail
        self.fail_ns += other.fail_ns
        self.last_ms = max(self.last_ms, other.last_ms)
        for bucket, count in other.latency.items():
            self.latency[bucket] = self.latency.get(bucket, 0) + count

    def window_fields(self) -> dict[str, int]:
        fields = {WINDOW_CALLS: self.success + self.fail, WINDOW_FAILS: self.fail}
        return fields | {f"{_LATENCY_PREFIX}{bucket}": count for bucket, count in self.latency.items()}


class _PeriodicCounts(Generic[_Key, _Counts]):
    """Counts kept in memory by key and added to Redis every ``interval_s``, in one round trip.

    ``start`` starts the flush task; ``stop`` ends it and sends what is left. A flush that fails
    keeps its counts for the next one. Subclasses count into ``_pending`` (``_counts``) and say
    how the counts taken become commands (``_commands``).
    """

    def __init__(self, redis: aioredis.Redis, *, interval_s: float, new: Callable[[], _Counts]) -> None:
        """Count for ``redis``'s statistics hashes (nothing is sent before ``start``); ``new``: empty counts."""
        self.redis = redis
        self.interval_s = interval_s
        self._new = new
        self._pending: dict[_Key, _Counts] = {}
        self._lock: asyncio.Lock | None = None
        """Held by a flush (and a gateway's read, so it sees every call exactly once)."""
        self._task: asyncio.Task[None] | None = None

    @property
    def is_empty(self) -> bool:
        """Whether everything counted was sent."""
        return not self._pending

    def _counts(self, key: _Key) -> _Counts:
        """The counts pending for ``key`` (new ones if none)."""
        counts = self._pending.get(key)
        if counts is None:
            counts = self._pending[key] = self._new()
        return counts

    async def start(self) -> None:
        """Start adding the counts to Redis every ``interval_s``."""
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._flush_loop(), name="stats-flush")

    async def stop(self) -> None:
        """Stop the flush task, then send what is still counted (logged, not raised, if Redis is away)."""
        if self._task is None:
            return
        await finish_tasks([self._task], 0)
        self._task = None
        try:
            await self.flush()
        except _REDIS_ERRORS as exc:
            log.warning("stats_flush_failed", error=str(exc), models=len(self._pending))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except _REDIS_ERRORS as exc:  # kept for the next flush
                log.warning("stats_flush_failed", error=str(exc), models=len(self._pending))
            except Exception:  # a supervised loop: log and go on
                log.exception("stats_flush_crashed")

    async def flush(self) -> None:
        """Add the counts to Redis in one round trip; on failure they are kept for the next one.

        Raises:
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: Redis is away.
        """
        assert self._lock is not None, f"{type(self).__name__}.start() was not called"
        async with self._lock:
            taken, self._pending = self._pending, {}
            if not taken:
                return
            commands = self._commands(taken)
            try:
                replies = await send_commands(self.redis, commands)
            except BaseException:
                # NOTE: at-least-once, as everywhere: a flush cut off after Redis applied it counts twice.
                for key, counts in taken.items():
                    self._counts(key).add(counts)
                raise
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):  # e.g. WRONGTYPE: someone else's key
                log.warning("stats_flush_rejected", error=str(reply))

    def _commands(self, taken: Mapping[_Key, _Counts]) -> list[tuple[Any, ...]]:
        """The commands that add the ``taken`` counts to Redis."""
        raise NotImplementedError


class CallStats(_PeriodicCounts[tuple[str, int], _Calls]):
    """A gateway's end-to-end call statistics: counted in memory, added to Redis every ``interval_s``."""

    def __init__(self, redis: aioredis.Redis, *, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Count calls for ``redis``'s statistics hashes (nothing is sent before ``start``)."""
        super().__init__(redis, interval_s=interval_s, new=_Calls)

    def record(self, model: str, version: int, ok: bool, duration_ns: int) -> None:
        """Count one finished call (no I/O: it is sent with the next flush)."""
        calls = self._counts((model, version))
        if ok:
            calls.success += 1
            calls.success_ns += duration_ns
        else:
            calls.fail += 1
            calls.fail_ns += duration_ns
        calls.last_ms = now_ms()
        bucket = bisect.bisect_left(LATENCY_BUCKETS_MS, duration_ns / 1e6)
        calls.latency[bucket] = calls.latency.get(bucket, 0) + 1

    def _commands(self, taken: Mapping[tuple[str, int], _Calls]) -> list[tuple[Any, ...]]:
        """Each version's counts, and its calls in the current window slot."""
        slot = window_slot(time.time())
        commands: list[tuple[Any, ...]] = []
        for (model, version), calls in taken.items():
            key, window = keys.stats(model, version), keys.stats_window(model, version, slot)
            commands += _increments(key, calls.fields())
            commands.append(("EVAL", MAX_FIELD_LUA, 1, key, LAST_INFERENCE, calls.last_ms))
            commands += [*_increments(window, calls.window_fields()), ("EXPIRE", window, WINDOW_TTL_S)]
        return commands

    async def read(self, versions: Iterable[tuple[str, int]]) -> list[VersionStats]:
        """Return the cluster-wide statistics of ``versions`` (one round trip), in their order.

        Versions nobody has counted anything for are left out. This gateway's unsent counts are
        added, so its own calls show at once.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        assert self._lock is not None, "CallStats.start() was not called"
        wanted: Sequence[tuple[str, int]] = list(dict.fromkeys(versions))
        if not wanted:
            return []
        async with self._lock:
            with redis_errors("statistics"):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for model, version in wanted:
                        pipe.hgetall(keys.stats(model, version))
                    hashes: list[dict[bytes, bytes]] = await pipe.execute()
            pending = {key: self._pending[key] for key in wanted if key in self._pending}
        found = []
        for (model, version), raw in zip(wanted, hashes, strict=True):
            fields = {name.decode(): int(value) for name, value in raw.items()}
            calls = pending.get((model, version))
            if calls is not None:
                for name, value in calls.fields().items():
                    fields[name] = fields.get(name, 0) + value
                fields[LAST_INFERENCE] = max(fields.get(LAST_INFERENCE, 0), calls.last_ms)
            if fields:
                found.append(parse(model, version, fields))
        return found


class RunStats(_PeriodicCounts[str, BatchStats]):
    """A worker's statistics of the batches it answered, by hash key, added to Redis every ``interval_s``.

    Not in each batch's MULTI, as they were: a batch's statistics are up to 11 HINCRBYs (7 fields
    and 4 of its batch size), more than its other commands together, and Redis, shared by every
    worker and gateway, ran them for every batch. Counted here they cost one round trip an
    interval, whatever the load. A batch is added once its entries are acked, so a batch that
    runs again (its worker died before the ack) counts once. The price: a worker killed before
    its next flush loses the counts of its last ``interval_s``, as a gateway does.
    """

    def __init__(self, redis: aioredis.Redis, *, interval_s: float) -> None:
        """Count batches for ``redis``'s statistics hashes (nothing is sent before ``start``)."""
        super().__init__(redis, interval_s=interval_s, new=BatchStats)

    def add(self, key: str, batch: BatchStats) -> None:
        """Count an answered and acked batch of the version whose hash is ``key`` (sent with the next flush)."""
        if batch.computed or batch.executions:  # nothing ran (every request failed): nothing to send
            self._counts(key).add(batch)

    def _commands(self, taken: Mapping[str, BatchStats]) -> list[tuple[Any, ...]]:
        return [command for key, batches in taken.items() for command in batches.commands(key)]


def window_slot(epoch_s: float) -> int:
    """Return the window slot that ``epoch_s`` falls in."""
    return int(epoch_s // WINDOW_SLOT_S)


def window_keys(model: str, version: int, epoch_s: float) -> tuple[list[str], float]:
    """Return the window hashes of "the last minute" before ``epoch_s``, and the seconds they cover."""
    last = window_slot(epoch_s)
    first = last - WINDOW_SLOTS + 1
    return [keys.stats_window(model, version, slot) for slot in range(first, last + 1)], epoch_s - first * WINDOW_SLOT_S


@dataclass(frozen=True)
class CallWindow:
    """A model version's calls over a recent window, as the gateways saw them."""

    window_s: float = 0.0
    calls_per_s: float = 0.0
    errors_per_s: float = 0.0
    p50_ms: float = 0.0
    """Upper bound of the latency bucket holding the median call (0: no calls)."""
    p99_ms: float = 0.0
    """Upper bound of the bucket holding the 99th percentile (``inf``: slower than the last bound)."""


def window_summary(hashes: Sequence[Mapping[str, int]], window_s: float) -> CallWindow:
    """Add up window hashes (fields as this module writes them) covering ``window_s`` seconds."""
    calls = sum(fields.get(WINDOW_CALLS, 0) for fields in hashes)
    fails = sum(fields.get(WINDOW_FAILS, 0) for fields in hashes)
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for fields in hashes:
        for name, value in fields.items():
            if name.startswith(_LATENCY_PREFIX):
                counts[int(name.removeprefix(_LATENCY_PREFIX))] += value
    seconds = max(window_s, 1e-9)
    return CallWindow(
        window_s=window_s,
        calls_per_s=calls / seconds,
        errors_per_s=fails / seconds,
        p50_ms=latency_quantile_ms(counts, 0.50),
        p99_ms=latency_quantile_ms(counts, 0.99),
    )


def latency_quantile_ms(counts: Sequence[int], quantile: float) -> float:
    """Return the upper bound of the ``LATENCY_BUCKETS_MS`` bucket holding ``quantile`` of ``counts``.

    Args:
        counts: Calls per bucket, one more than there are bounds (the last: slower than all).
        quantile: Between 0 and 1.

    Returns:
        The bucket's bound in ms; ``inf`` for the last bucket; 0 when there are no calls.
    """
    total = sum(counts)
    if not total:
        return 0.0
    rank = quantile * total
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if count and seen >= rank:
            return float(LATENCY_BUCKETS_MS[index]) if index < len(LATENCY_BUCKETS_MS) else float("inf")
    return float("inf")
