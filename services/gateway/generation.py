"""The gateway's side of a generation: put its partial replies in order, resume or fail a redelivery, cancel.

A worker writes one partial reply per token (``services.inference.generation``), each with the
token's index (``seq``) and the delivery of the queue entry that produced it (``attempt``). When
a worker dies mid-generation, another one runs the entry again from the start (attempt + 1):

- deterministic decoding (greedy, or sampling with a seed) gives the same tokens again: the
  tokens already forwarded are skipped, so the client's stream goes on with no duplicate and no
  gap;
- unseeded sampling gives other tokens: once a token was forwarded, the call ends UNAVAILABLE
  as soon as the new attempt shows (the rest would not continue the text the client has).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.common import keys
from services.common.errors import Unavailable, code_from_value, error_for_code
from services.common.queue import Reply

log = structlog.get_logger(__name__)

_CANCEL_TTL_MS = 120_000
"""How long a cancel flag lives: longer than a worker's reclaim of a dead worker's entry takes."""
_CANCEL_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class GenerationPiece:
    """One response of a generation: the text of a token, or the end."""

    text: bytes
    is_final: bool = False
    finish_reason: str = ""
    """On the final piece: why the generation ended (``services.common.generation.FINISH_*``)."""
    payload: bytes = b""
    """On the final piece: the worker's serialized ``ModelInferResponse`` with the whole text."""
    version: int = 0
    """The model version generating it (set by the router)."""
    has_output: bool = True
    """False for Triton's empty final response (``enable_empty_final_response``): no ``text`` output."""


class TokenOrder:
    """Turns a call's partial replies into the pieces to forward, in order, each once."""

    def __init__(self, *, is_deterministic: bool) -> None:
        self._is_deterministic = is_deterministic
        self._attempt = 0
        self.forwarded = 0
        """Tokens forwarded to the client so far."""

    def accept(self, reply: Reply) -> GenerationPiece | None:
        """Return the piece to forward for ``reply``, or None when it repeats one already forwarded.

        Raises:
            MaasError: The worker answered with an error (its code and message).
            Unavailable: A redelivered unseeded sampling after tokens were forwarded.
        """
        if reply.code != 0:
            raise error_for_code(code_from_value(reply.code), reply.message)
        if reply.seq < 0:  # not a partial reply: a worker that runs the version as a plain model
            return GenerationPiece(b"", is_final=True, payload=reply.payload)
        if reply.attempt < self._attempt:
            return None  # a late reply of an earlier delivery
        if reply.attempt > self._attempt:
            if self._attempt and self.forwarded and not self._is_deterministic:
                raise Unavailable(
                    f"the worker generating this answer died after {self.forwarded} tokens; unseeded sampling "
                    "cannot be resumed (set the 'seed' parameter to make it resumable); retry the call"
                )
            if self._attempt:
                log.info("generation_resumed", attempt=reply.attempt, forwarded=self.forwarded)
            self._attempt = reply.attempt
        text = reply.piece
        if reply.seq < self.forwarded:
            if not reply.is_final:
                return None
            text = b""
        else:
            self.forwarded = reply.seq + 1
        return GenerationPiece(text, reply.is_final, reply.finish_reason, reply.payload if reply.is_final else b"")


async def cancel(client: aioredis.Redis, call_id: str) -> None:
    """Tell the worker generating ``call_id`` to stop (its caller went away); best effort."""
    with contextlib.suppress(redis.exceptions.RedisError, TimeoutError):
        async with asyncio.timeout(_CANCEL_TIMEOUT_S):
            await client.set(keys.generation_cancel(call_id), b"1", px=_CANCEL_TTL_MS)
