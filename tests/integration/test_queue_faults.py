"""Faults on the optimised request path, with real processes and signals.

- A worker killed (SIGKILL) while it writes a batch's pipelined replies loses no call.
- Redis killed (SIGKILL) without persistence comes back empty: the calls waiting for a reply
  fail at once with UNAVAILABLE instead of waiting out their deadline.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from services.common import keys
from services.common.embedded_redis import EmbeddedRedis
from tests.integration.suite import Suite, queue_settled, start_worker_process
from tests.models import affine_model

pytestmark = pytest.mark.integration

ROWS = 256
"""Rows per call: replies of 4 KiB, so a batch's MULTI carries real bytes when the worker dies."""


_KILLED = "killed-worker"
"""The id of the worker killed and restarted: a restart under the same id runs its pending entries at once."""


def _request(model: str, value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[ROWS, 4])
    request.raw_input_contents.append(np.full((ROWS, 4), value, np.float32).tobytes())
    return request


async def _client(suite: Suite, first: int, stop: asyncio.Event, results: dict[int, float]) -> None:
    index = first
    while not stop.is_set():
        response = await suite.inference.ModelInfer(_request("pipelined", float(index)), timeout=60)
        values = np.frombuffer(response.raw_output_contents[0], np.float32)
        assert values.shape == (ROWS * 4,) and np.all(values == values[0])
        results[index] = float(values[0])
        index += 1


@pytest.mark.timeout(180)
async def test_worker_killed_while_writing_replies_loses_no_call(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    running = await Suite(redis_server.url, tmp_path, timeout_s=60).start(with_worker=False)
    worker = None
    try:
        await running.push("pipelined", affine_model(), max_batch_size=ROWS)
        worker = await start_worker_process(running, tmp_path, "w0", worker_id=_KILLED)
        stop, results = asyncio.Event(), {}
        clients = [asyncio.ensure_future(_client(running, 10_000 * c, stop, results)) for c in range(16)]
        rng = random.Random(7)
        killed_with_calls_in_flight = 0
        for attempt in range(3):
            await asyncio.sleep(rng.uniform(0.3, 0.8))
            answered = len(results)
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
            killed_with_calls_in_flight += len(results) > 0 and not any(c.done() for c in clients)
            worker = await start_worker_process(running, tmp_path, f"w{attempt + 1}", worker_id=_KILLED)
            assert len(results) >= answered
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)  # every call of every client got its one, correct reply
        assert killed_with_calls_in_flight == 3
        assert len(results) > 100
        assert all(value == 2.0 * index + 1 for index, value in results.items())
        assert await queue_settled(running.redis, keys.queue("pipelined", 1))
    finally:
        if worker is not None and worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
            await worker.wait()
        await running.stop()


@pytest.mark.timeout(120)
async def test_a_worker_killed_while_holding_acks_leaves_its_calls_to_another_once(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # The reply reached the gateway, the acks wait for a read that never comes (held for 10 s).
    running = await Suite(redis_server.url, tmp_path).start(with_worker=False)
    holder = other = None
    try:
        await running.push("held", affine_model(), max_batch_size=ROWS)
        # Its statistics go to Redis every 10 ms: had it counted the batch before its ack, they would be there.
        holder = await start_worker_process(running, tmp_path, "holder", held_ack_ms="10000", stats_flush_ms="10")
        response = await running.inference.ModelInfer(_request("held", 3.0), timeout=20)
        assert np.all(np.frombuffer(response.raw_output_contents[0], np.float32) == 7.0)
        queue = keys.queue("held", 1)
        assert (await redis_client.xpending(queue, keys.QUEUE_GROUP))["pending"] == 1  # answered, not acked
        await asyncio.sleep(0.2)  # many of its flushes
        assert b"inference_count" not in await redis_client.hgetall(keys.stats("held", 1)), "it counts once acked"
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        # Another worker reclaims the entry, runs it again and acks it; its second reply finds no
        # call waiting and is dropped: the caller had its one reply.
        other = await start_worker_process(running, tmp_path, "other", reclaim_idle_ms="300", reclaim_interval_s="0.2")
        assert await queue_settled(redis_client, queue, timeout_s=20)
        async with asyncio.timeout(10):  # the other worker adds its statistics every 100 ms
            while b"inference_count" not in await redis_client.hgetall(keys.stats("held", 1)):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a few flushes more: nothing else comes
        stats = await redis_client.hgetall(keys.stats("held", 1))
        assert int(stats[b"inference_count"]) == ROWS, "the killed worker never counted what it did not ack"
    finally:
        for process in (holder, other):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await process.wait()
        await running.stop()


@pytest.mark.timeout(120)
async def test_redis_killed_without_persistence_fails_waiting_calls_at_once(tmp_path: Path) -> None:
    own_redis = EmbeddedRedis(tmp_path / "redis", persistence=False).start()
    restarted = EmbeddedRedis(tmp_path / "redis", port=own_redis.port, persistence=False)
    running = await Suite(own_redis.url, tmp_path).start()
    try:
        await running.push("unserved", affine_model(), pool="nobody-serves-this", max_batch_size=ROWS)
        calls = [
            asyncio.ensure_future(running.inference.ModelInfer(_request("unserved", 1.0), timeout=10)) for _ in range(5)
        ]
        # Queued, waiting for a worker that never comes (a loaded machine may take a while to
        # resolve the model and enqueue: wait for the five, not for a fixed time).
        queue, deadline = keys.queue("unserved", 1), asyncio.get_running_loop().time() + 8
        while await running.redis.xlen(queue) < 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert await running.redis.xlen(queue) == 5
        own_redis.kill()
        restarted.start()  # empty: the queued requests and the reply stream are gone
        loop = asyncio.get_running_loop()
        back = loop.time()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        elapsed_s = loop.time() - back
        assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes), outcomes
        errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert {e.code() for e in errors} == {grpc.StatusCode.UNAVAILABLE}
        assert {e.details() for e in errors} == {
            "redis lost the queued request (it restarted without its data); retry the call"
        }
        assert elapsed_s < 2.0
    finally:
        await running.stop()
        restarted.stop()
