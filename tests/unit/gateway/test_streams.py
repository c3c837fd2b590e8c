"""ModelStreamInfer's request juggling (services/gateway/streams.py), without gRPC: plain async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.common.errors import DeadlineExceeded
from services.gateway.streams import EndStream, Streams


async def _requests(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_a_request_that_ends_its_stream_ends_it_at_once_with_its_error() -> None:
    released = asyncio.Event()

    async def handle(request: str) -> AsyncIterator[str]:
        if request == "slow":
            await released.wait()  # never released: the stream must not wait for it
        if request == "late":
            raise EndStream(DeadlineExceeded("the stream's deadline passed"))
        yield f"answer {request}"

    answers = []
    with pytest.raises(DeadlineExceeded, match="the stream's deadline passed"):
        async with asyncio.timeout(5):
            async for request, response, error in Streams(8).serve(_requests("fast", "slow", "late"), handle):
                answers.append((request, response, error))
    assert answers == [("fast", "answer fast", None)]


async def test_any_other_failure_is_that_requests_answer_and_the_stream_goes_on() -> None:
    async def handle(request: str) -> AsyncIterator[str]:
        if request == "bad":
            raise DeadlineExceeded("no reply from a worker within 1 s")
        yield f"answer {request}"

    answers = [item async for item in Streams(8).serve(_requests("bad", "good"), handle)]
    assert sorted(answers, key=lambda item: item[0]) == [
        ("bad", None, (DeadlineExceeded.grpc_code, "no reply from a worker within 1 s")),
        ("good", "answer good", None),
    ]
