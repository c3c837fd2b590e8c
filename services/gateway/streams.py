"""ModelStreamInfer: many requests in flight on one stream, each answered as it completes.

A stream's requests take the same path as ModelInfer calls (validation, queue, reply), up to
``max_in_flight`` at once: the next request is read off the stream only when one of them is
answered, so a fast sender is slowed by HTTP/2 flow control instead of filling the gateway.
Answers go out in completion order (requests to one model mostly complete in order; across
models they need not): clients match them by the request's ``id``.

A generative model's request is answered by several responses (Triton's decoupled models): its
handler yields them as they come, and the request's slot frees with the last one.

A request's error is its answer (the stream stays open). The stream ends:
- OK, when the client half-closes and every request read has been answered;
- with the error, when a message on it is not a ModelInferRequest (after the requests before
  it are answered);
- UNAVAILABLE, when the gateway drains (SIGTERM): it reads no more requests, answers the ones
  it holds, and ends; requests without an answer were never run, and may be sent again on a
  new stream;
- cancelled, when the client cancels or the stream's deadline passes: requests still waiting
  are forgotten (a worker may still run them; their answers are dropped);
- with a request's error, when its handler raises ``EndStream`` (a request that timed out
  with the stream's own deadline: DEADLINE_EXCEEDED, not an answer the deadline may overtake).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeAlias, TypeVar

import grpc
from prometheus_client import Gauge

from services.common.errors import Unavailable
from services.common.interceptors import status_of
from services.common.tasks import finish_tasks

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Error: TypeAlias = tuple[grpc.StatusCode, str]

OPEN_STREAMS = Gauge("maas_gateway_open_streams", "ModelStreamInfer streams open on this gateway")


class EndStream(Exception):
    """Raised by a request's handler: ``error`` ends the whole stream instead of answering that request."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Abort:
    """A request's ``EndStream``: the stream ends with its error at once."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _End:
    """The reader's last word: the stream half-closed (``error`` None) or failed."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _Drain:
    """Put on every open stream's queue when the gateway drains."""


class _Partial(Generic[Req, Resp]):
    """A response to a request that more responses follow (a generation's tokens)."""

    __slots__ = ("request", "response")

    def __init__(self, request: Req, response: Resp) -> None:
        self.request = request
        self.response = response


_DRAIN = _Drain()


class _Stream(Generic[Req, Resp]):
    """One open stream: a reader task that starts requests, and the queue of their answers."""

    def __init__(
        self, requests: AsyncIterator[Req], handle: Callable[[Req], AsyncIterator[Resp]], max_in_flight: int
    ) -> None:
        self._requests = requests
        self._handle = handle
        self._slots = asyncio.Semaphore(max_in_flight)
        self.queue: asyncio.Queue[
            _End | _Abort | _Drain | _Partial[Req, Resp] | tuple[Req, Resp | None, Error | None]
        ] = asyncio.Queue()
        self.running: set[asyncio.Task[None]] = set()
        self.pending = 0
        """Requests started whose answer has not been taken off the queue."""

    async def read(self) -> None:
        """Start each request as it arrives, holding a slot for it; end with an ``_End``."""
        try:
            async for request in self._requests:
                await self._slots.acquire()
                self.pending += 1
                task = asyncio.create_task(self._run(request))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
        except Exception as exc:  # a message that is not a ModelInferRequest (MaasError), or a bug
            self.queue.put_nowait(_End(exc))
        else:
            self.queue.put_nowait(_End(None))

    async def _run(self, request: Req) -> None:
        last: Resp | None = None
        try:
            async for response in self._handle(request):
                if last is not None:
                    self.queue.put_nowait(_Partial(request, last))
                last = response
            outcome: tuple[Req, Resp | None, Error | None] = (request, last, None)
        except EndStream as end:
            self.queue.put_nowait(_Abort(end.error))
            return
        except Exception as exc:  # every other failure is this request's answer, not the stream's end
            if last is not None:
                self.queue.put_nowait(_Partial(request, last))
            outcome = (request, None, status_of(exc))
        self.queue.put_nowait(outcome)

    def answered(self) -> None:
        """Free the slot of a request whose answer has been taken."""
        self.pending -= 1
        self._slots.release()


class Streams:
    """The gateway's open ModelStreamInfer streams, and their drain on shutdown."""

    def __init__(self, max_in_flight: int) -> None:
        self._max_in_flight = max_in_flight
        self._open: set[_Stream[Any, Any]] = set()
        self._draining = False
        OPEN_STREAMS.set_function(lambda: len(self._open))

    def drain(self) -> None:
        """Make every stream (and every stream opened from now on) stop reading and end."""
        self._draining = True
        for stream in self._open:
            stream.queue.put_nowait(_DRAIN)

    async def serve(
        self, requests: AsyncIterator[Req], handle: Callable[[Req], AsyncIterator[Resp]]
    ) -> AsyncIterator[tuple[Req, Resp | None, Error | None]]:
        """Yield ``(request, response, error)`` for each response of the stream's requests, as each comes.

        ``handle`` yields a request's responses (one, or a generation's several); the last one,
        or the error that ended them, is the request's answer.

        Raises:
            MaasError: A message on the stream is not a request (after the answers before it).
            Unavailable: The gateway is draining (after the answers to the requests it read).
        """
        stream: _Stream[Req, Resp] = _Stream(requests, handle, self._max_in_flight)
        self._open.add(stream)
        if self._draining:
            stream.queue.put_nowait(_DRAIN)
        reader = asyncio.create_task(stream.read())
        reading, failure = True, None
        try:
            while reading or stream.pending:
                item = await stream.queue.get()
                if isinstance(item, _End):
                    reading, failure = False, item.error or failure
                elif isinstance(item, _Abort):
                    failure = item.error
                    break
                elif isinstance(item, _Partial):
                    yield item.request, item.response, None
                elif isinstance(item, _Drain):
                    if reading and not reader.done():
                        reader.cancel()
                        reading, failure = (
                            False,
                            Unavailable(
                                "the gateway is shutting down: requests without an answer on this stream were "
                                "not run; send them again on a new stream"
                            ),
                        )
                else:
                    stream.answered()
                    yield item
        finally:
            self._open.discard(stream)
            await finish_tasks([reader, *stream.running], timeout_s=0)
        if failure is not None:
            raise failure
