"""Replies straight to the gateways' reply listeners (``services.gateway.direct_replies``).

One connection per gateway address, shared by every consumer of this worker. ``send`` writes a
batch's replies to a gateway as one frame and returns once the gateway acknowledged it; the
consumer acks the queue entries only then. It returns False when the gateway cannot be reached,
refuses the token or does not acknowledge in time: the consumer then XADDs those replies to the
gateway's reply stream, as without a listener. An address that failed is not tried again for
``retry_after_s``, so a gateway whose listener workers cannot reach costs them one failed connect
per interval, not one per batch. A listener that also binds a Unix socket on this worker's host
is reached there (``ReplyAddress.local_socket``), else, or when that fails, over TCP.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Sequence

import structlog

from services.common.queue import ACK, WELCOME, Reply, ReplyAddress, hello, pack_replies
from services.common.tasks import finish_tasks

log = structlog.get_logger(__name__)


_CONNECT_ERRORS = (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError)


class _Link:
    """One connection to a gateway's listener: frames out, one ACK byte back per frame, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._acks = asyncio.create_task(self._read_acks(), name="direct-reply-acks")

    @property
    def is_open(self) -> bool:
        return not self._acks.done()

    async def send(self, replies: Sequence[Reply], timeout_s: float) -> None:
        """Write one frame and wait for its ACK.

        Raises:
            ConnectionError: The connection broke (before the ACK).
            TimeoutError: No ACK within ``timeout_s``.
        """
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(acked)
        self._writer.writelines(pack_replies(replies))
        async with asyncio.timeout(timeout_s):
            await self._writer.drain()
            await acked

    async def _read_acks(self) -> None:
        error: Exception = ConnectionError("the gateway closed the reply connection")
        try:
            while True:
                data = await self._reader.read(4096)
                if not data:
                    break
                if data.strip(ACK):
                    error = ConnectionError(f"the gateway answered {data[:16]!r}, not ACKs")
                    break
                for _ack in data:
                    # NOTE: a sender whose wait timed out cancelled its future: its ACK is just counted off.
                    acked = self._waiting.popleft() if self._waiting else None
                    if acked is not None and not acked.done():
                        acked.set_result(None)
        except OSError as exc:
            error = ConnectionError(f"reply connection: {exc}")
        finally:
            self._writer.close()
            while self._waiting:
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_exception(error)

    async def close(self) -> None:
        self._writer.close()
        await finish_tasks([self._acks], 0)


class DirectReplies:
    """This worker's connections to gateways' reply listeners (see the module's notes).

    Args:
        timeout_s: How long a connect, the listener's welcome, or a frame's ACK may take.
        retry_after_s: How long an address that failed is left alone.
    """

    def __init__(self, timeout_s: float, retry_after_s: float = 5.0) -> None:
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._links: dict[str, asyncio.Task[_Link | None]] = {}
        self._failed_until: dict[str, float] = {}

    async def send(self, reply_addr: str, replies: Sequence[Reply]) -> bool:
        """Hand ``replies`` to the gateway at ``reply_addr``; True once it acknowledged them."""
        link = await self._link(reply_addr)
        if link is None:
            return False
        try:
            await link.send(replies, self._timeout_s)
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.info("direct_reply_failed", address=reply_addr.partition("/")[0], error=str(exc) or type(exc).__name__)
            self._forget(reply_addr)
            await link.close()
            return False
        return True

    async def close(self) -> None:
        """Close every connection."""
        tasks, self._links = list(self._links.values()), {}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            link = None if task.cancelled() else task.result()
            if link is not None:
                await link.close()

    async def _link(self, reply_addr: str) -> _Link | None:
        if self._failed_until.get(reply_addr, 0.0) > time.monotonic():
            return None
        task = self._links.get(reply_addr)
        if task is not None and task.done() and (task.cancelled() or not _is_open(task.result())):
            task = None
        if task is None:
            self._drop_closed()
            task = self._links[reply_addr] = asyncio.create_task(self._connect(reply_addr), name="direct-reply-connect")
        return await asyncio.shield(task)

    async def _connect(self, reply_addr: str) -> _Link | None:
        try:
            address = ReplyAddress.parse(reply_addr)
            local = address.local_socket()
            if local:
                try:
                    return await self._open(address.token, asyncio.open_unix_connection(local), via="unix")
                except _CONNECT_ERRORS as exc:
                    log.info("direct_replies_socket_unreachable", path=local, error=_describe(exc), fallback="tcp")
            return await self._open(address.token, asyncio.open_connection(address.host, address.port), via="tcp")
        except _CONNECT_ERRORS as exc:
            self._forget(reply_addr)
            log.info(
                "direct_replies_unreachable", address=reply_addr.partition("/")[0],
                error=_describe(exc), retry_in_s=self._retry_after_s,
            )  # fmt: skip
            return None

    async def _open(
        self, token: bytes, opening: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]], *, via: str
    ) -> _Link:
        """Open a connection, say hello with ``token`` and take the listener's welcome.

        Raises:
            OSError, TimeoutError, asyncio.IncompleteReadError: It could not (the connection is closed).
        """
        writer = None
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await opening
                writer.write(hello(token))
                welcome = await reader.readexactly(len(WELCOME))
            if welcome != WELCOME:
                raise ConnectionError(f"the listener answered {welcome!r}")
        except BaseException:
            if writer is not None:
                writer.close()
            raise
        log.info("direct_replies_connected", peer=str(writer.get_extra_info("peername") or ""), via=via)
        return _Link(reader, writer)

    def _forget(self, reply_addr: str) -> None:
        now = time.monotonic()
        # NOTE: a restarted gateway has a new token, so a new address: forget the old ones.
        self._failed_until = {addr: until for addr, until in self._failed_until.items() if until > now}
        self._failed_until[reply_addr] = now + self._retry_after_s
        self._links.pop(reply_addr, None)

    def _drop_closed(self) -> None:
        """Forget the connections that closed (their gateways went away, or will be reconnected)."""
        self._links = {
            addr: task
            for addr, task in self._links.items()
            if not task.done() or (not task.cancelled() and _is_open(task.result()))
        }


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _is_open(link: _Link | None) -> bool:
    return link is not None and link.is_open
