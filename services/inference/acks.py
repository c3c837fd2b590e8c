"""Acks held back to ride with the consumer's next read (``services.inference.consumer``).

A batch whose replies every gateway acknowledged on its reply listener needs one more write to
Redis: the MULTI that acks and deletes its entries (and counts the tenants' compute). Sent on its own
it costs a round trip a batch: the worker and Redis each wake once more, right when the gateway
and its client need the CPU to answer. So those commands wait here and go with the consumer's
next XREADGROUP, in the same write (``take``), or alone once ``delay_s`` has passed without a
read (``flush``): an idle worker's acks land at most ``delay_s`` late.

What counts only once the entries are acked (the batch's statistics) waits with them
(``hold``'s ``on_acked``) and is counted when their MULTI went through.

Nothing is lost by waiting: the entries stay pending until the MULTI runs, and they count as
in flight (``ids``), so the consumer keeps them claimed and never reclaims them itself. A worker
killed before the MULTI leaves them pending: another worker runs them again and the gateway
drops the second reply, as for a worker killed before any ack (at-least-once, at most one reply).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
import structlog

from services.common.redis_conn import count_redis_error

log = structlog.get_logger(__name__)

Command = tuple[Any, ...]


@dataclass
class Taken:
    """What one ``take`` took: the entries its block acks and what to do once they are acked."""

    ids: set[bytes] = field(default_factory=set)
    on_acked: list[Callable[[], None]] = field(default_factory=list)


class HeldAcks:
    """The held-back MULTI of one consumer.

    Args:
        send: Sends a list of commands in one round trip and returns their replies.
        delay_s: The longest a held command waits for a read to carry it.
        on_sent: Called after a flush, sent or failed (the consumer's progress signal).
    """

    def __init__(
        self,
        send: Callable[[Sequence[Command]], Awaitable[list[Any]]],
        delay_s: float,
        on_sent: Callable[[], None],
    ) -> None:
        self._send = send
        self._delay_s = delay_s
        self._on_sent = on_sent
        self._commands: list[Command] = []
        self.ids: set[bytes] = set()
        """Entries answered whose ack is held here or on its way (still pending in Redis)."""
        self._untaken = Taken()
        """Those of ``ids`` whose commands no ``take`` has taken yet, with their ``on_acked``."""
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def hold(
        self, ids: Iterable[bytes], commands: Sequence[Command], on_acked: Callable[[], None] | None = None
    ) -> None:
        """Hold ``commands`` (a MULTI's body) that ack ``ids``, until the next read or ``delay_s``.

        ``on_acked`` is called once their MULTI went through (not if it failed: they run again).
        """
        self.ids.update(ids)
        self._untaken.ids.update(ids)
        if on_acked is not None:
            self._untaken.on_acked.append(on_acked)
        self._commands += commands
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._flush_soon)

    def take(self) -> tuple[list[Command], Taken]:
        """Take what is held, as a whole MULTI block ([] if nothing), and what it acks.

        The caller sends the block and then calls ``settled`` with what was taken, whatever happened.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        commands, self._commands = self._commands, []
        taken, self._untaken = self._untaken, Taken()
        return ([("MULTI",), *commands, ("EXEC",)] if commands else []), taken

    def settled(self, taken: Taken, result: Any) -> None:
        """``taken``'s block was sent (``result``: its EXEC reply) or failed (an exception).

        Either way its entries are no longer held: acked, or pending for a reclaim to run them again.
        """
        self.ids -= taken.ids
        if isinstance(result, asyncio.CancelledError):
            pass  # a stopping read: the block went out or not; those not acked are reclaimed
        elif isinstance(result, BaseException):  # EXECABORT included: nothing applied, they run again
            count_redis_error(result)
            log.warning("held_acks_failed", entries=len(taken.ids), error=str(result) or type(result).__name__)
        elif isinstance(result, list):  # EXEC ran the block
            for reply in result:
                if isinstance(reply, redis.exceptions.ResponseError):
                    log.warning("held_ack_rejected", error=str(reply))
            for acked in taken.on_acked:
                acked()
        self._on_sent()

    async def flush(self) -> None:
        """Send what is held now, alone (a stopping consumer, or ``delay_s`` passed)."""
        block, taken = self.take()
        if not block:
            return
        try:
            result = (await self._send(block))[-1]
        except (redis.exceptions.RedisError, OSError) as exc:
            self.settled(taken, exc)
            return
        except BaseException as exc:
            self.settled(taken, exc)
            raise
        self.settled(taken, result)

    async def close(self) -> None:
        """Send what is held and wait for flushes under way."""
        await self.flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush(), name="held-acks")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)
