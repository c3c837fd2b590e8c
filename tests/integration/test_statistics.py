"""ModelStatistics as Triton reports them, cluster-wide: kept in Redis by gateways and workers."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from onnx import TensorProto, helper

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from services.common import keys
from services.common.embedded_redis import EmbeddedRedis
from services.common.queue import now_ms
from tests.integration.suite import Suite, start_gateway_process
from tests.models import affine_model
from tests.triton import triton_calls

pytestmark = pytest.mark.integration


def _request(rows: int, *, columns: int = 4, model: str = "affine") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, columns])
    request.raw_input_contents.append(np.ones((rows, columns), np.float32).tobytes())
    return request


async def _statistics(suite: Suite, name: str = "affine") -> pb.ModelStatisticsResponse:
    """The model's statistics once the worker recorded its calls.

    A worker counts a batch once it is answered and adds its counts to Redis every
    ``stats_flush_ms``: after the reply. ``run_until_empty`` waits for the answers and sends them.
    """
    assert suite.worker is not None
    await suite.worker.run_until_empty()
    request = pb.ModelStatisticsRequest(name=name)
    response: pb.ModelStatisticsResponse = await suite.inference.ModelStatistics(request, timeout=5)
    return response


async def _fail(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_counts_and_durations_after_calls(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    before = now_ms()
    rows = [1, 2, 3, 1, 1]
    for count in rows:  # one at a time: one model run each
        await suite.inference.ModelInfer(_request(count), timeout=10)
    await _fail(suite.inference, _request(1, columns=3))  # refused by the gateway's validation
    await _fail(suite.inference, _request(9))  # larger than the deployment's max_batch_size (8)
    after = now_ms()

    [stats] = (await _statistics(suite)).model_stats
    assert (stats.name, stats.version) == ("affine", "1")
    assert before <= stats.last_inference <= after
    inference = stats.inference_stats
    assert inference.success.count == 5 and inference.success.ns > 0
    assert inference.fail.count == 2 and inference.fail.ns > 0
    for phase in (inference.queue, inference.compute_input, inference.compute_infer, inference.compute_output):
        assert phase.count == 5 and phase.ns > 0
    assert stats.inference_count == sum(rows)  # batch rows, as Triton counts them
    assert stats.execution_count == 5
    by_size = {batch.batch_size: batch for batch in stats.batch_stats}
    assert sorted(by_size) == [1, 2, 3]
    assert [by_size[size].compute_infer.count for size in (1, 2, 3)] == [3, 1, 1]
    assert all(batch.compute_infer.ns > 0 and batch.compute_input.ns > 0 for batch in stats.batch_stats)
    assert all(batch.compute_input.count == batch.compute_output.count == batch.compute_infer.count
               for batch in stats.batch_stats)  # fmt: skip


async def test_batched_calls_count_fewer_executions_than_inferences(suite: Suite) -> None:
    # The worker waits up to 500 ms to fill a batch of 8: 16 concurrent calls make a few batches.
    await suite.push("affine", affine_model(), max_batch_size=8, max_wait_ms=500)
    await asyncio.gather(*(suite.inference.ModelInfer(_request(1), timeout=20) for _ in range(16)))

    [stats] = (await _statistics(suite)).model_stats
    assert stats.inference_stats.success.count == 16
    assert stats.inference_stats.compute_infer.count == 16
    assert stats.inference_count == 16
    assert 2 <= stats.execution_count < stats.inference_count
    assert sum(batch.compute_infer.count for batch in stats.batch_stats) == stats.execution_count
    assert sum(batch.batch_size * batch.compute_infer.count for batch in stats.batch_stats) == 16
    # Every request of a batch is charged its batch's run (Triton's semantics).
    assert stats.inference_stats.compute_infer.ns >= sum(batch.compute_infer.ns for batch in stats.batch_stats)


def _reshape_model() -> bytes:
    """Y = Reshape(x, shape): valid to the gateway and the worker, fails in ORT for a bad ``shape``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape", [x, shape], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _reshape_request(rows: int, shape: list[int]) -> pb.ModelInferRequest:
    request = _request(rows, model="reshape")
    request.inputs.add(name="shape", datatype="INT64", shape=[2])
    request.raw_input_contents.append(np.array(shape, np.int64).tobytes())
    return request


async def test_a_failed_model_run_is_a_fail_with_no_compute(suite: Suite) -> None:
    await suite.push("reshape", _reshape_model())
    await suite.inference.ModelInfer(_reshape_request(2, [1, 8]), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.inference.ModelInfer(_reshape_request(2, [3, 3]), timeout=10)
    assert "model run failed" in (info.value.details() or "")

    [stats] = (await _statistics(suite, "reshape")).model_stats
    inference = stats.inference_stats
    assert (inference.success.count, inference.fail.count) == (1, 1)
    assert inference.queue.count == inference.compute_infer.count == 1
    # Not batchable (``shape`` has no batch dimension): each request counts one inference.
    assert (stats.inference_count, stats.execution_count) == (1, 1)
    assert [(batch.batch_size, batch.compute_infer.count) for batch in stats.batch_stats] == [(1, 1)]


async def _wait_for_calls(stub: pb_grpc.GRPCInferenceServiceStub, calls: int, rows: int) -> pb.ModelStatistics:
    """The statistics once ``calls`` calls (gateways' counts) and ``rows`` rows (the worker's) are in."""
    async with asyncio.timeout(15):  # a gateway adds its counts to Redis every second, a worker every 100 ms
        while True:
            found = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="affine"), timeout=5)).model_stats
            if found:
                inference = found[0].inference_stats
                if inference.success.count + inference.fail.count >= calls and found[0].inference_count >= rows:
                    return found[0]
            await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_every_gateway_reports_the_whole_cluster(suite: Suite, tmp_path: Path) -> None:
    await suite.push("affine", affine_model())
    process, address = await start_gateway_process(suite, tmp_path / "gateway-a.json", drain_delay_s="0")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            gateway_a = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(3):
                await gateway_a.ModelInfer(_request(1), timeout=10)
            await _fail(gateway_a, _request(1, columns=5))
            await suite.inference.ModelInfer(_request(2), timeout=10)  # through gateway B

            # B sees A's calls once A has flushed them; A sees B's likewise.
            from_b = await _wait_for_calls(suite.inference, 5, 5)
            from_a = await _wait_for_calls(gateway_a, 5, 5)
            for stats in (from_b, from_a):
                assert stats.inference_stats.success.count == 4
                assert stats.inference_stats.fail.count == 1
                assert stats.inference_count == 5
                assert stats.execution_count == 4

            for _ in range(2):
                await gateway_a.ModelInfer(_request(1), timeout=10)
        # A stopping adds what it counted since its last flush.
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
        [stats] = (await _statistics(suite)).model_stats
        assert stats.inference_stats.success.count == 6
        assert stats.inference_stats.fail.count == 1
        assert stats.inference_count == 7
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_tritonclient_reads_the_statistics(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    x = {"x": {"data": np.arange(8).reshape(2, 4).tolist(), "dtype": "float32"}}
    infer = {"op": "infer", "model": "affine", "inputs": x}
    assert all("ok" in result for result in await asyncio.to_thread(triton_calls, suite.gateway_address, [infer] * 2))
    assert suite.worker is not None
    await suite.worker.run_until_empty()  # it also sends the worker's statistics (every 100 ms otherwise)
    statistics = [{"op": "statistics", "model": "affine"}, {"op": "statistics"}]
    results = await asyncio.to_thread(triton_calls, suite.gateway_address, statistics)
    one, every = results[0]["ok"], results[1]["ok"]
    assert one == every
    [stats] = one["model_stats"]
    assert stats["name"] == "affine" and stats["version"] == "1"
    assert stats["inference_count"] == "4" and stats["execution_count"] == "2"
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == "2" and int(inference["success"]["ns"]) > 0
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[phase]["count"] == "2" and int(inference[phase]["ns"]) > 0
    [batch] = stats["batch_stats"]
    assert batch["batch_size"] == "2" and batch["compute_infer"]["count"] == "2"


async def test_statistics_survive_a_redeploy_and_go_with_the_model(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    await suite.inference.ModelInfer(_request(1), timeout=10)
    await suite.registry.undeploy("affine")
    await suite.registry.deploy("affine", 1)
    assert suite.worker is not None
    await suite.worker.reconcile()
    await suite.inference.ModelInfer(_request(1), timeout=10)
    [stats] = (await _statistics(suite)).model_stats
    assert stats.inference_stats.success.count == 2

    await suite.gateway.stats.flush()  # nothing of it waits in the gateway's memory any more
    await suite.registry.delete_model("affine")
    await suite.push("affine", affine_model())  # the same name and version number again
    assert list((await _statistics(suite)).model_stats) == []
    assert list((await suite.inference.ModelStatistics(pb.ModelStatisticsRequest(), timeout=5)).model_stats) == []


async def test_a_worker_adds_its_statistics_every_interval_and_what_is_left_when_it_drains(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # Not in each batch's MULTI (11 HINCRBYs a batch here): counted in memory, added in one
    # round trip every stats_flush_ms (60 s here: longer than the test) and when it drains.
    suite = await Suite(redis_server.url, tmp_path).start(with_worker=False)
    try:
        worker = await suite.start_worker(stats_flush_ms=60_000)
        await suite.push("affine", affine_model())
        for count in (1, 2, 1, 3, 1, 1):  # one at a time: one batch each
            await suite.inference.ModelInfer(_request(count), timeout=10)
        await asyncio.sleep(0.3)  # past the held acks (10 ms), which carried the counts before
        stored = await redis_client.hgetall(keys.stats("affine", 1))  # the gateway's, if it flushed
        assert b"inference_count" not in stored and b"compute_count" not in stored
        [stats] = (await suite.inference.ModelStatistics(pb.ModelStatisticsRequest(name="affine"))).model_stats
        assert stats.inference_stats.success.count == 6  # the gateway adds its unsent counts
        assert (stats.inference_count, stats.execution_count, stats.inference_stats.queue.count) == (0, 0, 0)

        await worker.drain()
        [stats] = (await suite.inference.ModelStatistics(pb.ModelStatisticsRequest(name="affine"))).model_stats
        assert (stats.inference_count, stats.execution_count) == (9, 6)
        assert stats.inference_stats.queue.count == stats.inference_stats.compute_infer.count == 6
        by_size = {batch.batch_size: batch.compute_infer.count for batch in stats.batch_stats}
        assert by_size == {1: 4, 2: 1, 3: 1}
    finally:
        await suite.stop()


async def test_a_workers_statistics_reach_redis_within_its_interval_without_a_drain(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    for _ in range(5):
        await suite.inference.ModelInfer(_request(2), timeout=10)
    stats = await _wait_for_calls(suite.inference, 5, 10)  # every 100 ms, by default
    assert (stats.inference_count, stats.execution_count, stats.inference_stats.compute_infer.count) == (10, 5, 5)
