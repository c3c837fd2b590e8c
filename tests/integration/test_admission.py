"""Coalesced admission on a real Redis: one round trip for calls that arrive together, exact limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from services.common import keys
from services.common.errors import Unavailable
from services.common.queue import QueuedRequest, now_ms
from services.gateway.admission import Admission
from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = pytest.mark.integration


def _entry(call_id: str) -> QueuedRequest:
    return QueuedRequest(id=call_id, reply_to="maas:v1:replies:t", deadline_ms=now_ms() + 60_000, payload=b"p")


async def _eval_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_eval", {}).get("calls", 0))


@pytest.fixture
async def admission(redis_client: aioredis.Redis) -> AsyncIterator[Admission]:
    running = Admission(redis_client)
    await running.start()
    yield running
    await running.stop()


async def test_calls_of_one_turn_share_one_round_trip_and_stop_exactly_at_the_limit(
    redis_client: aioredis.Redis, admission: Admission
) -> None:
    full, roomy = keys.queue("full", 1), keys.queue("roomy", 1)
    await redis_client.xadd(full, {"already": "queued"})
    before = await _eval_calls(redis_client)

    results = await asyncio.gather(
        *(admission.enqueue(full, 5, _entry(f"f{i}")) for i in range(7)),
        *(admission.enqueue(roomy, 100, _entry(f"r{i}")) for i in range(3)),
    )

    # One script per queue, in one pipelined round trip; the queue already held one entry.
    assert await _eval_calls(redis_client) - before == 2
    assert results == [True] * 4 + [False] * 3 + [True] * 3
    assert await redis_client.xlen(full) == 5
    queued = [QueuedRequest.from_fields(fields) for _id, fields in await redis_client.xrange(roomy)]
    assert [q.id for q in queued] == ["r0", "r1", "r2"]
    assert {(q.reply_to, q.payload) for q in queued} == {("maas:v1:replies:t", b"p")}


async def test_a_queue_at_its_limit_admits_again_once_it_drains(
    redis_client: aioredis.Redis, admission: Admission
) -> None:
    queue = keys.queue("m", 1)
    assert [await admission.enqueue(queue, 1, _entry(str(i))) for i in range(2)] == [True, False]
    await redis_client.delete(queue)
    assert await admission.enqueue(queue, 1, _entry("again"))


async def test_redis_unreachable_fails_every_waiting_call(redis_client: aioredis.Redis) -> None:
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    running = Admission(unreachable)
    await running.start()
    try:
        results = await asyncio.gather(
            *(running.enqueue(keys.queue("m", 1), 10, _entry(str(i))) for i in range(3)), return_exceptions=True
        )
    finally:
        await running.stop()
        await unreachable.aclose()
    assert all(isinstance(result, Unavailable) for result in results), results
    assert {str(result) for result in results} == {"request queue: redis unreachable"}


async def test_concurrent_calls_through_the_gateway_fill_the_queue_exactly(suite: Suite) -> None:
    await suite.push("lonely", affine_model(), pool="nobody-serves-this", max_queue_length=5)
    request = pb.ModelInferRequest(model_name="lonely")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())

    calls = [suite.inference.ModelInfer(request, timeout=2) for _ in range(12)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    codes = sorted(o.code().name for o in outcomes if isinstance(o, grpc.aio.AioRpcError))
    assert codes == ["DEADLINE_EXCEEDED"] * 5 + ["RESOURCE_EXHAUSTED"] * 7
    assert await suite.redis.xlen(keys.queue("lonely", 1)) == 5
