"""Scale to zero: a call for a deployed model with no live worker waits in its queue for one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from services.common import keys
from services.common.embedded_redis import EmbeddedRedis
from services.common.stats import EXECUTION_COUNT
from tests.integration.suite import Suite, run_cli
from tests.models import affine_model

pytestmark = pytest.mark.integration


@pytest.fixture
async def cold(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    """Registry and gateway with ``affine`` deployed, and no worker (``maas up --workers 0``)."""
    running = await Suite(redis_server.url, tmp_path, timeout_s=60).start(with_worker=False)
    await running.push("affine", affine_model())
    yield running
    await running.stop()


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.array([[1, 2, 3, 4]], np.float32).tobytes())
    return request


async def _queue_length(suite: Suite, length: int) -> None:
    async with asyncio.timeout(5):
        while await suite.redis.xlen(keys.queue("affine", 1)) != length:
            await asyncio.sleep(0.05)


async def test_a_call_waits_for_a_worker_that_starts_later(cold: Suite) -> None:
    call = asyncio.ensure_future(cold.inference.ModelInfer(_request(), timeout=30))
    await _queue_length(cold, 1)
    code, stdout, stderr = await run_cli(cold, "status", "--json")
    assert code == 0, stderr
    [queue] = json.loads(stdout)["queues"]
    assert (queue["model"], queue["state"], queue["workers"], queue["length"]) == (
        "affine",
        "waiting for a worker",
        0,
        1,
    )
    code, stdout, _ = await run_cli(cold, "status")
    assert "waiting for a worker" in stdout

    await asyncio.sleep(2)  # the cold start
    assert not call.done()
    await cold.start_worker()
    reply = await call
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).shape == (4,)
    await _queue_length(cold, 0)
    [queue] = (await cold.registry.get_cluster_status()).queues
    assert (queue.state, queue.workers) == ("serving", 1)


async def test_a_call_past_its_deadline_ends_and_is_never_computed(cold: Suite) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cold.inference.ModelInfer(_request(), timeout=1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await cold.redis.xlen(keys.queue("affine", 1)) == 1  # still queued: no worker read it

    worker = await cold.start_worker()
    await worker.run_until_empty(timeout_s=10)
    assert await cold.redis.xlen(keys.queue("affine", 1)) == 0  # answered (expired) and deleted
    assert await cold.redis.hget(keys.stats("affine", 1), EXECUTION_COUNT) is None  # no model run
