"""The gateway's reply stream: one reader resolves every waiting call by its id."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from prometheus_client import Counter, Histogram

from services.common.errors import Unavailable
from services.common.queue import MalformedEntry, Reply, stream_entries
from services.common.redis_conn import count_redis_error, send_commands
from services.common.stats import entry_time_ns
from services.common.tasks import finish_tasks

log = structlog.get_logger(__name__)

_MAX_BACKOFF_S = 5.0
_READ_COUNT = 512
_LOST_MESSAGE = "redis lost the queued request (it restarted without its data); retry the call"

REPLY_LAG = Histogram(
    "maas_gateway_reply_lag_seconds",
    "Time from a worker's XADD of a reply to this gateway's read of it, in seconds (clocks of Redis and gateway).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

REPLIES = Counter(
    "maas_gateway_replies_total",
    "Replies received, by the path they took: direct (the reply listener) or stream (the Redis reply stream)",
    ["path"],
)


class ReplyReader:
    """Owns this gateway's reply stream: keeps it alive and routes replies to waiting calls.

    A reply whose call is no longer waiting (late or duplicate) is dropped: each client gets
    at most one reply.
    """

    def __init__(self, redis: aioredis.Redis, stream: str, *, ttl_s: float, block_ms: int) -> None:
        self.stream = stream
        self._redis = redis
        self._ttl_s = ttl_s
        self._block_ms = block_ms
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._streams: dict[str, asyncio.Queue[Reply]] = {}
        """Calls answered by several replies (generations: ``expect_many``)."""
        self._last_id = "0-0"
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: asyncio.Event | None = None
        self._by_stream = REPLIES.labels(path="stream")

    @property
    def in_flight(self) -> int:
        """Number of calls waiting for a reply."""
        return len(self._waiting) + len(self._streams)

    async def start(self) -> None:
        """Create the stream and start the reader and keep-alive tasks."""
        self._idle = asyncio.Event()
        self._idle.set()
        await self._create_stream()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="reply-reader"),
            asyncio.create_task(self._keepalive_loop(), name="reply-keepalive"),
        ]

    async def stop(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for in-flight calls, then stop and delete the stream."""
        log.info("reply_reader_stopping", in_flight=self.in_flight)
        if self._idle is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        await finish_tasks(self._tasks, 0)
        try:
            await self._redis.delete(self.stream)
        except redis.exceptions.RedisError as exc:
            log.warning("reply_stream_delete_failed", error=str(exc))

    def expect(self, call_id: str) -> asyncio.Future[Reply]:
        """Register a call before its request is enqueued; await the returned future."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        if self._idle is not None:
            self._idle.clear()
        return future

    def expect_many(self, call_id: str) -> asyncio.Queue[Reply]:
        """Register a call answered by several replies (a generation's tokens), in order; ``forget`` it at its end."""
        replies: asyncio.Queue[Reply] = asyncio.Queue()
        self._streams[call_id] = replies
        if self._idle is not None:
            self._idle.clear()
        return replies

    def forget(self, call_id: str) -> None:
        """Stop waiting for a call (answered, timed out or cancelled)."""
        self._waiting.pop(call_id, None)
        self._streams.pop(call_id, None)
        if not self._waiting and not self._streams and self._idle is not None:
            self._idle.set()

    async def _create_stream(self) -> None:
        # An empty stream key must exist so workers' XADD NOMKSTREAM can reach it.
        entry_id = await self._redis.xadd(self.stream, {"hello": "1"})
        await self._redis.xdel(self.stream, entry_id)
        await self._redis.expire(self.stream, int(self._ttl_s))
        self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                if not await self._redis.expire(self.stream, int(self._ttl_s)):
                    await self._create_stream()
            except redis.exceptions.RedisError as exc:
                log.warning("reply_stream_keepalive_failed", error=str(exc))

    async def _read_loop(self) -> None:
        backoff_s = 0.1
        while True:
            try:
                await self._read_once()
                backoff_s = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a supervised loop: log, back off, go on
                count_redis_error(exc)
                log.warning("reply_reader_failed", error=str(exc), retry_in_s=backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
                await self._ensure_stream()

    async def _ensure_stream(self) -> None:
        try:
            if not await self._redis.exists(self.stream):
                await self._recover_lost_stream()
        except redis.exceptions.RedisError as exc:
            log.warning("reply_stream_check_failed", error=str(exc))

    async def _recover_lost_stream(self) -> None:
        # NOTE: the stream is gone only if Redis lost its data (a restart without persistence, a
        # failover to a replica that lagged, a flush): the requests of the calls waiting now are
        # gone with it, and workers' NOMKSTREAM replies to them were dropped. Fail them at once
        # instead of letting each wait out its deadline, then recreate the stream for new calls.
        waiting = list(self._waiting.values())
        self._waiting.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(Unavailable(_LOST_MESSAGE))
        for call_id, replies in self._streams.items():
            replies.put_nowait(Reply(id=call_id, code=grpc.StatusCode.UNAVAILABLE.value[0], message=_LOST_MESSAGE))
        self._streams.clear()
        if self._idle is not None:
            self._idle.set()
        await self._create_stream()
        log.warning("reply_stream_lost", stream=self.stream, failed_calls=len(waiting))

    async def _read_once(self) -> None:
        # One round trip: check the stream still exists, trim what was read (exactly: an
        # approximate MINID keeps whole macro nodes), then block for new replies.
        replies = await send_commands(
            self._redis,
            [
                ("EXISTS", self.stream),
                ("XTRIM", self.stream, "MINID", self._last_id),
                ("XREAD", "COUNT", _READ_COUNT, "BLOCK", self._block_ms, "STREAMS", self.stream, self._last_id),
            ],
        )
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                raise reply
        exists, _trimmed, batches = replies
        if not exists:
            await self._recover_lost_stream()
            return
        entries = stream_entries(batches)
        if entries:
            self._last_id = entries[-1][0].decode()
            read_ns = time.time_ns()
            for entry_id, _fields in entries:
                REPLY_LAG.observe(max(0, read_ns - entry_time_ns(entry_id)) / 1e9)
        for _entry_id, fields in entries:
            self._resolve(fields)
        if entries:
            # NOTE: let the calls just resolved answer their clients before this task writes
            # the next read: that write is a system call on every call's critical path.
            await asyncio.sleep(0)

    def _resolve(self, fields: dict[bytes, bytes]) -> None:
        try:
            reply = Reply.from_fields(fields)
        except MalformedEntry as exc:
            log.warning("reply_malformed", error=str(exc))
            return
        self._by_stream.inc()
        self.deliver(reply)

    def deliver(self, reply: Reply) -> None:
        """Hand ``reply`` to the call waiting for it; drop it if none waits (late or duplicate)."""
        replies = self._streams.get(reply.id)
        if replies is not None:
            replies.put_nowait(reply)
            return
        future = self._waiting.pop(reply.id, None)
        if future is None or future.done():
            log.debug("reply_dropped", call_id=reply.id)
            return
        future.set_result(reply)
