"""The queue consumer of one model version: read batches, run them, reply, ack; reclaim the dead's work.

Protocol (DESIGN.md, "Queue protocol: traps to avoid"):

- Read with ``XREADGROUP ... COUNT max_batch_size BLOCK block_ms`` (<= 1 s, so a drain is seen)
  and run what came at once: batches form by themselves while the previous batch computes,
  because requests pile up in the stream. A deployment with ``max_wait_ms`` > 0 waits that long
  to top a partial batch up; otherwise a partial batch waits ``busy_fill_us`` only when the
  queue is backing up (``_fill_wait_s``). The batch runs in a task; ``max_concurrent_batches`` bounds the
  batches whose model runs go on at once, and a batch's replies are written while the next batch
  is read and run.
- A batch's replies go first to their gateways' reply listeners, when the entries name one
  (``services.inference.direct_replies``); only those a listener acknowledged skip the MULTI's
  XADD, and the MULTI waits for the acknowledgements, so no reply is lost to a listener. When
  every reply of a batch was acknowledged, its MULTI (acks, deletes) is held back
  and goes with the next XREADGROUP, in the same write, or alone after ``held_ack_ms``
  (``services.inference.acks``): one round trip fewer a batch.
- A batch's answers are one MULTI: an ``XADD reply NOMKSTREAM`` per answer (to whichever gateway
  waits for it), then one ``XACK`` and one ``XDEL`` of every entry, so XLEN is the backlog, a dead
  gateway's reply stream is never recreated, and a worker killed mid-write leaves either every
  entry answered and acked or every entry pending (to be reclaimed and run again).
  On a Redis Cluster each reply stream is its own slot, which a MULTI cannot span: the replies
  (and the tenants' usage counts) go first, then the MULTI of the queue's slot (XACK, XDEL,
  dead letter). A worker killed in between leaves entries answered but pending:
  they run again and their second reply is dropped by the gateway (at most one reply).
- A batch answered and acked is counted in the worker's ``RunStats`` (``ModelStatistics``), which adds
  every model version's counts to Redis in one round trip every ``stats_flush_ms``.
- Every ``reclaim_interval_s`` entries idle longer than ``reclaim_idle_ms`` are claimed with
  XAUTOCLAIM and run one by one; those delivered more than ``max_deliveries`` times go to the
  dead-letter stream with an INTERNAL reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from prometheus_client import Counter, Histogram

from services.common import keys, stats, tracing, usage
from services.common.errors import InvalidArgument, MaasError
from services.common.metadata import DeploymentRecord
from services.common.queue import Entry, MalformedEntry, QueuedRequest, Reply, now_ms, stream_entries
from services.common.redis_conn import command_slot, count_redis_error, is_cluster, send_commands
from services.common.tasks import finish_tasks
from services.inference import batcher, convert
from services.inference.acks import Command, HeldAcks
from services.inference.direct_replies import DirectReplies
from services.inference.runtime import InferRequest, InferResult, ModelRuntime
from services.inference.settings import InferenceSettings

log = structlog.get_logger(__name__)

REQUESTS = Counter(
    "maas_inference_requests", "Queued requests answered by this worker, by status code.", ["model", "version", "code"]
)
BATCH_SIZE = Histogram(
    "maas_inference_batch_size_requests",
    "Requests per model run (stacked batches and single runs).",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
RUN_SECONDS = Histogram("maas_inference_run_seconds", "Duration of one model run, in seconds.", ["model", "version"])
QUEUE_WAIT = Histogram(
    "maas_inference_queue_wait_seconds",
    "Time from a request's XADD to the queue until a worker took it up, in seconds.",
    ["model", "version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DEAD_LETTERED = Counter(
    "maas_inference_dead_lettered", "Requests moved to the dead-letter stream (poison).", ["model", "version"]
)

_BACKOFF_INITIAL_S = 0.5
_BACKOFF_MAX_S = 5.0
_CLAIM_COUNT = 100
_DEAD_LETTER_MAXLEN = 10_000
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _flat(fields: Mapping[Any, Any]) -> list[Any]:
    """A stream entry's fields as XADD takes them: name, value, name, value, ..."""
    return [item for pair in fields.items() for item in pair]


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """Return ``action`` made idempotent: only its first call acts."""
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return call


def is_nogroup(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis's NOGROUP error (the stream or group vanished: restart or flush)."""
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("NOGROUP")


async def sleep_unless(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep ``delay_s`` or until ``stop`` is set; return whether it is set."""
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        return False
    return True


async def supervise(name: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event, **fields: object) -> None:
    """Run ``run`` until it returns or ``stop`` is set, restarting it when it fails.

    Redis trouble is logged at warning and retried with a backoff (0.5 s doubling to 5 s);
    NOGROUP restarts at once (the loop recreates its group); anything else is a bug, logged
    with its traceback, then restarted. Cancellation ends it.
    """
    backoff_s = _BACKOFF_INITIAL_S
    while not stop.is_set():
        started = time.monotonic()
        try:
            await run()
            return
        except _REDIS_ERRORS as exc:
            count_redis_error(exc)
            log.warning("redis_unreachable", loop=name, error=str(exc), retry_in_s=backoff_s, **fields)
        except redis.exceptions.ResponseError as exc:
            count_redis_error(exc)
            if not is_nogroup(exc):
                log.exception("loop_crashed", loop=name, **fields)
            else:
                log.warning("queue_group_missing", loop=name, **fields)
                continue
        except Exception:
            log.exception("loop_crashed", loop=name, **fields)
        if time.monotonic() - started > _BACKOFF_MAX_S:
            backoff_s = _BACKOFF_INITIAL_S
        if await sleep_unless(stop, backoff_s):
            return
        backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)


@dataclass(frozen=True)
class _Job:
    """A decoded, valid request ready to run."""

    entry_id: bytes
    queued: QueuedRequest
    request: InferRequest
    decode_ns: int = 0
    """Time spent decoding and validating it (its share of ``compute_input``)."""
    queue_ns: int = 0
    """Time from its stream entry's creation to the start of its batch."""


@dataclass(frozen=True)
class _Answer:
    """What to do with an entry: reply (if a reply stream is known), then ack and delete it."""

    entry_id: bytes
    reply_to: str | None
    reply: Reply | None
    code: grpc.StatusCode
    reply_addr: str = ""
    """The gateway's reply listener ('': reply through ``reply_to`` only)."""


def _error_answer(entry_id: bytes, queued: QueuedRequest, error: MaasError) -> _Answer:
    reply = Reply(id=queued.id, code=error.grpc_code.value[0], message=error.message)
    return _Answer(entry_id, queued.reply_to, reply, error.grpc_code, queued.reply_addr)


def _malformed_answer(entry_id: bytes, fields: dict[bytes, bytes], exc: MalformedEntry) -> _Answer:
    call_id, reply_to = fields.get(b"id"), fields.get(b"reply")
    log.info("malformed_entry", entry_id=entry_id.decode(), reason=str(exc))
    code = grpc.StatusCode.INVALID_ARGUMENT
    if call_id is None or reply_to is None:
        return _Answer(entry_id, None, None, code)
    reply = Reply(id=call_id.decode(errors="replace"), code=code.value[0], message=f"malformed queue entry: {exc}")
    return _Answer(entry_id, reply_to.decode(errors="replace"), reply, code)


class QueueConsumer:
    """Consumes one model version's queue as ``settings.worker_id`` in group ``keys.QUEUE_GROUP``."""

    def __init__(
        self,
        redis: aioredis.Redis,
        runtime: ModelRuntime | None,
        deployment: DeploymentRecord,
        settings: InferenceSettings,
        *,
        run_stats: stats.RunStats,
        progress: asyncio.Event | None = None,
        direct: DirectReplies | None = None,
    ) -> None:
        """Create a consumer; ``progress`` is set whenever entries were answered (run_until_empty).

        ``run_stats``: the worker's statistics, which each batch answered is added to.
        ``runtime`` is None only for a subclass that runs entries otherwise (``services.inference.generation``).
        ``direct``: the worker's connections to reply listeners (None: replies through the reply streams only).
        """
        self._direct = direct
        self.deployment = deployment
        """The deployment served; the worker replaces it when batching options change."""
        self.queue = keys.queue(deployment.model, deployment.version)
        self.dead_letter = keys.dead_letter(deployment.model, deployment.version)
        self._stats_key = keys.stats(deployment.model, deployment.version)
        self._run_stats = run_stats
        self._redis = redis
        self._session_runtime = runtime
        self._settings = settings
        self._labels = {"model": deployment.model, "version": str(deployment.version)}
        self._counters: dict[grpc.StatusCode, Any] = {}
        """``REQUESTS`` children by code: labelling a metric per request costs a dict lookup and a lock."""
        self._batch_size = BATCH_SIZE.labels(**self._labels)
        self._run_seconds = RUN_SECONDS.labels(**self._labels)
        self._queue_wait = QUEUE_WAIT.labels(**self._labels)
        self._in_flight: set[bytes] = set()
        self._batches: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stop: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        """Batches whose model runs are under way (``max_concurrent_batches``)."""
        self._sending: asyncio.Semaphore | None = None
        """Batches read and not yet answered (twice as many: replies overlap the next run)."""
        self._progress = progress
        self._last_read = 0
        """The last batch read (``busy_fill_min`` requests or more: the next read first looks without blocking)."""
        self._acks = HeldAcks(self._send_commands, settings.held_ack_ms / 1000, self._notify)
        """Acks of batches answered through reply listeners, sent with the next read."""

    @property
    def in_flight(self) -> int:
        """Entries read and not yet answered or acked (the heartbeat's ``in_flight``)."""
        return len(self._in_flight) + len(self._acks)

    @property
    def _runtime(self) -> ModelRuntime:
        assert self._session_runtime is not None, "a consumer without a runtime must override _process"
        return self._session_runtime

    def _concurrent_batches(self) -> int:
        """Batches whose runs go on at once (a generation consumer: generations)."""
        return self._settings.max_concurrent_batches

    def _read_size(self) -> int:
        """Most entries one read takes (a generation consumer: one)."""
        return max(1, self.deployment.max_batch_size)

    def start(self) -> None:
        """Start the read and reclaim loops (the group is created by the loops, retried)."""
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(self._concurrent_batches())
        self._sending = asyncio.Semaphore(2 * self._concurrent_batches())
        self._loops = [
            asyncio.create_task(supervise("read", self._read_loop, self._stop, queue=self.queue)),
            asyncio.create_task(supervise("reclaim", self._reclaim_loop, self._stop, queue=self.queue)),
            asyncio.create_task(supervise("keep-claimed", self._keep_claimed_loop, self._stop, queue=self.queue)),
        ]

    async def stop(self, timeout_s: float) -> None:
        """Stop reading, finish in-flight batches (reply + ack); cancel what outlives ``timeout_s``."""
        if self._stop is None:
            return
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        await finish_tasks(self._loops, timeout_s)
        await finish_tasks(list(self._batches), max(0.0, deadline - time.monotonic()))
        await self._acks.close()

    async def delete_consumer(self) -> bool:
        """Delete this worker's consumer from the group if its pending list is empty.

        Returns:
            Whether the consumer is gone (a consumer with pending entries is kept, or they
            could never be reclaimed).
        """
        try:
            pending = await self._redis.xpending_range(
                self.queue, keys.QUEUE_GROUP, "-", "+", 10, consumername=self._settings.worker_id
            )
            if pending:
                log.warning("consumer_kept", queue=self.queue, pending=len(pending))
                return False
            await self._redis.xgroup_delconsumer(self.queue, keys.QUEUE_GROUP, self._settings.worker_id)
        except redis.exceptions.ResponseError as exc:
            if not is_nogroup(exc):
                raise
        return True

    async def is_idle(self) -> bool:
        """Whether the queue is empty and everything read is answered and acked."""
        return not self._in_flight and not self._acks and await self._redis.xlen(self.queue) == 0

    async def ensure_group(self) -> None:
        """Create the queue's consumer group (and stream) if missing; an existing one is kept."""
        try:
            await self._redis.xgroup_create(self.queue, keys.QUEUE_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # Reading -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._stop is not None and self._slots is not None and self._sending is not None
        await self.ensure_group()
        await self._recover_own_pending()
        while not self._stop.is_set():
            # NOTE: a run slot frees when a batch's runs end, not when its replies are written,
            # so the next batch is read (as late as possible: what piled up meanwhile) and run
            # while the previous replies travel; _sending bounds the batches not yet answered.
            await self._sending.acquire()
            try:
                await self._slots.acquire()
            except BaseException:
                self._sending.release()
                raise
            try:
                entries = [] if self._stop.is_set() else await self._read_batch()
                self._last_read = len(entries)
            except BaseException:
                self._slots.release()
                self._sending.release()
                raise
            if entries:
                self._spawn(entries)
            else:
                self._slots.release()
                self._sending.release()

    async def _recover_own_pending(self) -> None:
        # NOTE: a worker restarted under the same id (`maas up`, a StatefulSet) owns what its
        # previous life left pending, and XREADGROUP ">" never returns those: run them first,
        # one by one like reclaimed entries, instead of waiting reclaim_idle_ms for them.
        cursor = "0-0"
        while self._stop is not None and not self._stop.is_set():
            reply = await self._redis.xreadgroup(
                keys.QUEUE_GROUP, self._settings.worker_id, {self.queue: cursor}, count=_CLAIM_COUNT
            )
            history = stream_entries(reply)
            if not history:
                return
            cursor = history[-1][0].decode()
            vanished = [entry_id for entry_id, fields in history if not fields]
            if vanished:  # deleted while pending (Redis 6.2 keeps them listed): nothing to run
                await self._redis.xack(self.queue, keys.QUEUE_GROUP, *vanished)
            await self._handle_claimed([(entry_id, fields) for entry_id, fields in history if fields])

    async def _read_batch(self) -> list[Entry]:
        size = self._read_size()
        entries: list[Entry] = []
        is_backlog = False
        if self._last_read >= self._settings.busy_fill_min and size > 1:
            # NOTE: after a full enough batch, look without blocking first: requests already
            # waiting mean the queue is backing up, while a blocking read that had to wait means
            # the worker is idle (one round trip more when the queue just emptied, no latency:
            # nothing was waiting). After a smaller batch the queue was not backing up: read
            # blocking at once (it returns what is waiting), one round trip fewer a batch at low load.
            entries = await self._read(size, None)
            is_backlog = len(entries) >= self._settings.busy_fill_min
        if not entries:
            entries = await self._read(size, self._settings.block_ms)
        wait_s = self._fill_wait_s(is_backlog)
        if not entries or len(entries) >= size or wait_s <= 0:
            return entries
        # NOTE: Redis resolves BLOCK timeouts on its hz tick (100 ms by default), so a short
        # XREADGROUP BLOCK <max_wait_ms> would wait up to 100 ms. The fill wait uses the event
        # loop's timer and a non-blocking read instead. Entries waiting for it count as in flight
        # already: kept claimed, never reclaimed (by this worker or another) and run twice.
        ids = [entry_id for entry_id, _fields in entries]
        self._in_flight.update(ids)
        try:
            await asyncio.sleep(wait_s)
            return entries + await self._read(size - len(entries), None)
        except BaseException:
            self._in_flight.difference_update(ids)
            raise

    def _fill_wait_s(self, is_backlog: bool) -> float:
        """How long a partial batch waits for more: the deployment's ``max_wait_ms``, else the busy fill.

        The busy fill (``busy_fill_us``) applies when requests were found waiting (``is_backlog``)
        and the model's batches run for less than it: each batch costs a few round trips (worker,
        Redis, gateways) whatever its size, which a fuller batch shares among more calls; a slower
        model's batches fill up by themselves while it runs. Measured (bench/, tiny model, 2 cores,
        medians of 6 alternating runs): 32 clients +9 % req/s and -11 % CPU per call, 8 clients
        unchanged; 1 client never waits.
        """
        if self.deployment.max_wait_ms > 0:
            return self.deployment.max_wait_ms / 1000
        fill_s = self._settings.busy_fill_us / 1e6
        return fill_s if is_backlog and self._runtime.run_times.typical_s < fill_s else 0.0

    async def _read(self, count: int, block_ms: int | None) -> list[Entry]:
        command: list[str | int] = ["XREADGROUP", "GROUP", keys.QUEUE_GROUP, self._settings.worker_id, "COUNT", count]
        if block_ms is not None:
            command += ["BLOCK", block_ms]
        # NOTE: the held-back acks ride in the same write (a MULTI before the read): one wake of
        # Redis and of this worker fewer a batch. Redis runs them before the read blocks.
        held, taken = self._acks.take()
        settled = not held

        def on_held(replies: list[Any]) -> None:  # the MULTI's outcome, before the read returns
            nonlocal settled
            if not settled:
                settled = True
                self._acks.settled(taken, replies[-1])

        try:
            replies = await send_commands(
                self._redis, [*held, [*command, "STREAMS", self.queue, ">"]], early=len(held), on_early=on_held
            )
        except BaseException as exc:
            if not settled:
                self._acks.settled(taken, exc)
            raise
        reply = replies[-1]
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply  # NOGROUP: the supervisor restarts the loop, which recreates the group
        return stream_entries(reply)

    def _spawn(self, entries: list[Entry]) -> None:
        assert self._slots is not None
        ids = [entry_id for entry_id, _fields in entries]
        self._in_flight.update(ids)
        release = _once(self._slots.release)
        task = asyncio.create_task(self._process(entries, ran=release))
        self._batches.add(task)
        task.add_done_callback(lambda done: self._batch_done(done, ids, release))

    def _notify(self) -> None:
        if self._progress is not None:
            self._progress.set()

    def _batch_done(self, task: asyncio.Task[None], ids: Sequence[bytes], release: Callable[[], None]) -> None:
        assert self._sending is not None
        self._batches.discard(task)
        self._in_flight.difference_update(ids)
        release()
        self._sending.release()
        self._notify()
        error = None if task.cancelled() else task.exception()
        # NOTE: a failed batch's entries stay pending; reclaim runs them again one by one.
        if isinstance(error, _REDIS_ERRORS) or (error is not None and is_nogroup(error)):
            count_redis_error(error)
            log.warning("reply_failed", queue=self.queue, error=str(error))
        elif error is not None:
            log.error("batch_failed", queue=self.queue, exc_info=error)

    # Processing --------------------------------------------------------------------------

    async def _process(self, entries: Sequence[Entry], *, ran: Callable[[], None] | None = None) -> None:
        """Answer ``entries``; ``ran`` is called once the model runs are over, before the replies go out."""
        now = now_ms()
        started_ns = time.time_ns()
        trace = tracing.batch_trace(entries, started_ns, self._labels)  # None when tracing is off
        answers: list[_Answer] = []
        jobs: list[_Job] = []
        for entry_id, fields in entries:
            queue_ns = max(0, started_ns - stats.entry_time_ns(entry_id))
            self._queue_wait.observe(queue_ns / 1e9)
            admitted = self._admit(entry_id, fields, now, queue_ns)
            if isinstance(admitted, _Job):
                jobs.append(admitted)
            else:
                answers.append(admitted)
        batch_stats = stats.BatchStats()
        charges = usage.ComputeCharges(self._labels)
        assembled_ns = time.time_ns()
        answers += await self._run_jobs(jobs, batch_stats, charges)
        if trace is not None:
            trace.ran([job.entry_id for job in jobs], assembled_ns, time.time_ns())
        if ran is not None:
            ran()  # the next batch may be read and run while these replies are written
        await self._send_all(answers, first=charges.commands(), batch_stats=batch_stats)
        if trace is not None:
            trace.replied({answer.entry_id: answer.code.name for answer in answers}, time.time_ns())

    def _admit(self, entry_id: bytes, fields: dict[bytes, bytes], now: int, queue_ns: int) -> _Job | _Answer:
        try:
            queued = QueuedRequest.from_fields(fields)
        except MalformedEntry as exc:
            return _malformed_answer(entry_id, fields, exc)
        if queued.deadline_ms <= now:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            reply = Reply(id=queued.id, code=code.value[0], message="deadline exceeded before the request ran")
            return _Answer(entry_id, queued.reply_to, reply, code, queued.reply_addr)
        started = time.perf_counter_ns()
        try:
            request = convert.decode_infer_request(queued.payload)
            self._runtime.signature.validate(request)
        except InvalidArgument as exc:
            log.info("request_rejected", request_id=queued.request_id, reason=exc.message)
            return _error_answer(entry_id, queued, exc)
        return _Job(entry_id, queued, request, time.perf_counter_ns() - started, queue_ns)

    async def _run_jobs(
        self, jobs: Sequence[_Job], batch_stats: stats.BatchStats, charges: usage.ComputeCharges
    ) -> list[_Answer]:
        requests = [job.request for job in jobs]
        outcomes: dict[int, batcher.Outcome] = {}
        groups: list[tuple[list[int], batcher.Timing]] = []
        for group in batcher.plan_groups(requests, self._runtime.signature):
            timing = batcher.Timing()
            results = await self._run_group([requests[index] for index in group], timing)
            outcomes.update(zip(group, results, strict=True))
            groups.append((group, timing))
        answers: dict[int, _Answer] = {}
        for group, timing in groups:
            ran: list[stats.RequestTimes] = []
            share_ns = (timing.input_ns + timing.output_ns + sum(ns for _rows, ns in timing.runs)) // len(group)
            for index in group:
                job = jobs[index]
                started = time.perf_counter_ns()
                answer = answers[index] = self._answer(job, outcomes[index])
                if answer.code is grpc.StatusCode.OK:
                    rows = batcher.batch_rows(job.request, self._runtime.signature) or 1
                    encode_ns = time.perf_counter_ns() - started
                    ran.append((job.queue_ns, job.decode_ns, encode_ns, rows))
                    charges.charge(job.queued.tenant, job.decode_ns + share_ns + encode_ns)
            batch_stats.group_ran(ran, input_ns=timing.input_ns, output_ns=timing.output_ns, runs=timing.runs)
        return [answers[index] for index in range(len(jobs))]

    async def _run_group(self, group: Sequence[InferRequest], timing: batcher.Timing) -> list[batcher.Outcome]:
        started = time.perf_counter()
        results = await batcher.run_group(self._runtime.run, group, self._runtime.signature, timing)
        run_s = time.perf_counter() - started
        self._batch_size.observe(len(group))
        self._run_seconds.observe(run_s)
        log.debug("batch_ran", queue=self.queue, size=len(group), run_ms=round(run_s * 1000, 3))
        return results

    def _answer(self, job: _Job, outcome: batcher.Outcome) -> _Answer:
        if isinstance(outcome, MaasError):
            return _error_answer(job.entry_id, job.queued, outcome)
        outputs = self._runtime.classify(outcome, job.request)
        result = InferResult(self._runtime.model, self._runtime.version, job.request.id, outputs)
        reply = Reply(id=job.queued.id, code=0, payload=convert.encode_infer_response(result))
        return _Answer(job.entry_id, job.queued.reply_to, reply, grpc.StatusCode.OK, job.queued.reply_addr)

    async def _send_all(
        self,
        answers: Sequence[_Answer],
        *,
        first: Sequence[Command] = (),
        batch_stats: stats.BatchStats | None = None,
    ) -> None:
        """Reply to, ack and delete ``answers`` in one MULTI, after the commands in ``first``.

        The replies whose gateways have a reply listener go there first; the MULTI then XADDs
        only those it did not acknowledge (``services.inference.direct_replies``). The batch's
        statistics count once its entries are acked (so a batch that runs again counts once).
        """
        if not answers:
            return
        delivered = await self._send_direct(answers) if self._direct is not None else set()
        ids = [answer.entry_id for answer in answers]
        replies = [
            ("XADD", answer.reply_to, "NOMKSTREAM", "*", *_flat(answer.reply.to_fields()))
            for answer in answers
            if answer.reply is not None and answer.reply_to is not None and answer.entry_id not in delivered
        ]
        ack = [("XACK", self.queue, keys.QUEUE_GROUP, *ids), ("XDEL", self.queue, *ids)]
        if delivered and not replies and self._settings.held_ack_ms and not is_cluster(self._redis):
            # Every reply reached its gateway: the acks wait for the next read (see the module's notes).
            self._acks.hold(ids, [*first, *ack], None if batch_stats is None else partial(self._count, batch_stats))
        else:
            await self._send_multi(first, replies, ack)
            if batch_stats is not None:
                self._count(batch_stats)
        for answer in answers:
            self._answered(answer.code)

    def _count(self, batch: stats.BatchStats) -> None:
        """Count an answered and acked batch in the worker's statistics."""
        self._run_stats.add(self._stats_key, batch)

    async def _send_multi(self, first: Sequence[Command], replies: Sequence[Command], ack: Sequence[Command]) -> None:
        """Send ``first``, the stream ``replies`` and ``ack`` in one MULTI (on a Redis Cluster, as slots allow)."""
        if is_cluster(self._redis):  # replies first, then the queue slot's MULTI (see the module's notes)
            slot = command_slot(ack[0])
            self._log_rejected(
                await send_commands(self._redis, [*replies, *(c for c in first if command_slot(c) != slot)])
            )
            commands = [("MULTI",), *(c for c in first if command_slot(c) == slot), *ack, ("EXEC",)]
        else:
            commands = [("MULTI",), *first, *replies, *ack, ("EXEC",)]
        results = (await send_commands(self._redis, commands))[-1]
        if isinstance(results, redis.exceptions.ResponseError):
            raise results  # EXECABORT: nothing was applied, the entries stay pending
        self._log_rejected(results)

    async def _send_commands(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        return await send_commands(self._redis, commands)

    async def _send_direct(self, answers: Sequence[_Answer]) -> set[bytes]:
        """Hand the replies to their gateways' listeners; return the entries whose replies were acknowledged."""
        assert self._direct is not None
        by_gateway: dict[str, list[_Answer]] = {}
        for answer in answers:
            if answer.reply_addr and answer.reply is not None and answer.reply.seq < 0:
                by_gateway.setdefault(answer.reply_addr, []).append(answer)
        if not by_gateway:
            return set()
        if len(by_gateway) == 1:
            # NOTE: awaited in place, not in a gather's task: the frame is then written before
            # the read loop (woken by ``ran``) writes its next XREADGROUP, so the reply leaves
            # first (README, "The request path": measured side by side with bench/ab.py).
            [(address, group)] = by_gateway.items()
            return await self._send_to(address, group)
        sent = await asyncio.gather(*(self._send_to(address, group) for address, group in by_gateway.items()))
        return set().union(*sent)

    async def _send_to(self, address: str, group: Sequence[_Answer]) -> set[bytes]:
        """Hand ``group``'s replies to the listener at ``address``; return their entries if it acknowledged them."""
        assert self._direct is not None
        ok = await self._direct.send(address, [answer.reply for answer in group if answer.reply])
        return {answer.entry_id for answer in group} if ok else set()

    def _log_rejected(self, results: Sequence[Any]) -> None:
        for result in results:
            if isinstance(result, redis.exceptions.ResponseError):
                # e.g. WRONGTYPE: a reply key that is not a stream; that caller gets its deadline.
                log.warning("reply_rejected", queue=self.queue, error=str(result))

    def _answered(self, code: grpc.StatusCode) -> None:
        counter = self._counters.get(code)
        if counter is None:
            counter = self._counters[code] = REQUESTS.labels(code=code.name, **self._labels)
        counter.inc()

    # Reclaiming --------------------------------------------------------------------------

    async def _keep_claimed_loop(self) -> None:
        # NOTE: an entry idle longer than reclaim_idle_ms is taken by another worker and run
        # twice. Re-claiming our in-flight entries (JUSTID: no delivery count) resets their idle
        # time, so a batch that runs long is never stolen and the reclaim idle time can be short.
        assert self._stop is not None
        period_s = self._settings.reclaim_idle_ms / 3000
        while not await sleep_unless(self._stop, period_s):
            ids: list[Any] = sorted(self._owned())
            if ids:
                await self._redis.xclaim(self.queue, keys.QUEUE_GROUP, self._settings.worker_id, 0, ids, justid=True)

    def _owned(self) -> set[bytes]:
        """Entries this consumer holds in Redis: read and unanswered, or answered with their ack held."""
        return self._in_flight | self._acks.ids

    async def _reclaim_loop(self) -> None:
        assert self._stop is not None
        await self.ensure_group()
        while not await sleep_unless(self._stop, self._settings.reclaim_interval_s):
            await self.reclaim()

    async def reclaim(self) -> int:
        """Claim entries idle longer than ``reclaim_idle_ms`` and answer them one by one.

        Returns:
            How many claimed entries were answered or dead-lettered.
        """
        cursor: bytes | str = "0-0"
        handled = 0
        while self._stop is None or not self._stop.is_set():
            reply = await self._redis.xautoclaim(
                self.queue,
                keys.QUEUE_GROUP,
                self._settings.worker_id,
                min_idle_time=self._settings.reclaim_idle_ms,
                start_id=cursor,
                count=_CLAIM_COUNT,
            )
            # NOTE: Redis >= 7 appends the ids of deleted entries (already dropped from the
            # pending list); 6.2 returns nil in their place and keeps them pending.
            cursor, claimed = reply[0], reply[1]
            owned = self._owned()
            entries = [(i, f) for i, f in claimed if i is not None and i not in owned]
            if any(entry_id is None for entry_id, _fields in claimed):
                await self._ack_vanished({entry_id for entry_id, _fields in entries})
            handled += await self._handle_claimed(entries)
            if cursor in (b"0-0", "0-0"):
                break
        return handled

    async def _ack_vanished(self, claimed: set[bytes]) -> None:
        """Ack this consumer's pending entries whose stream entry was deleted (Redis 6.2)."""
        pending: list[dict[str, Any]] = await self._redis.xpending_range(
            self.queue, keys.QUEUE_GROUP, "-", "+", 10 * _CLAIM_COUNT, consumername=self._settings.worker_id
        )
        for item in pending:
            entry_id: bytes = item["message_id"]
            if entry_id in claimed or entry_id in self._owned():  # looked at afresh: the awaits below
                continue
            if not await self._redis.xrange(self.queue, entry_id, entry_id, count=1):
                await self._redis.xack(self.queue, keys.QUEUE_GROUP, entry_id)

    async def _delivery_counts(self, ids: Sequence[bytes]) -> dict[bytes, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(self.queue, keys.QUEUE_GROUP, entry_id, entry_id, 1)
            replies = await pipe.execute()
        return {item["message_id"]: int(item["times_delivered"]) for reply in replies for item in reply}

    async def _handle_claimed(self, entries: Sequence[Entry]) -> int:
        if not entries:
            return 0
        assert self._slots is not None
        counts = await self._delivery_counts([entry_id for entry_id, _fields in entries])
        for entry_id, fields in entries:
            deliveries = counts.get(entry_id, 0)
            log.info("entry_reclaimed", queue=self.queue, entry_id=entry_id.decode(), deliveries=deliveries)
            if deliveries > self._settings.max_deliveries:
                await self._move_to_dead_letter(entry_id, fields, deliveries)
                continue
            # NOTE: after a crash the whole batch is redelivered; one by one, only poison fails.
            async with self._slots:
                self._in_flight.add(entry_id)
                try:
                    await self._process([(entry_id, fields)])
                finally:
                    self._in_flight.discard(entry_id)
                    self._notify()
        return len(entries)

    async def _move_to_dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        code = grpc.StatusCode.INTERNAL
        message = f"request failed {self._settings.max_deliveries} times; moved to dead-letter stream"
        dead = {**fields, b"dlq_entry_id": entry_id, b"dlq_deliveries": str(deliveries).encode()}
        call_id, reply_to = fields.get(b"id"), fields.get(b"reply")
        reply = None
        if call_id is not None and reply_to is not None:
            reply = Reply(id=call_id.decode(errors="replace"), code=code.value[0], message=message)
        answer = _Answer(entry_id, None if reply_to is None else reply_to.decode(errors="replace"), reply, code)
        to_dead_letter = ("XADD", self.dead_letter, "MAXLEN", "~", _DEAD_LETTER_MAXLEN, "*", *_flat(dead))
        await self._send_all([answer], first=[to_dead_letter])
        DEAD_LETTERED.labels(**self._labels).inc()
        self._notify()
        log.warning("request_dead_lettered", queue=self.queue, entry_id=entry_id.decode(), deliveries=deliveries)
