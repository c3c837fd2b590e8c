"""``GetClusterStatus``, ``maas status`` and ``maas top``: workers, queues and last-minute calls."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from services.common.errors import PermissionDenied
from services.common.registry_client import RegistryClient
from services.common.status import ClusterStatus, QueueStatus
from tests.integration.suite import Suite, run_cli
from tests.integration.test_redis_acl import AclRedis, _denials
from tests.models import affine_model

pytestmark = pytest.mark.integration


def _request(columns: int = 4) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, columns])
    request.raw_input_contents.append(np.ones((1, columns), np.float32).tobytes())
    return request


async def _traffic(suite: Suite, *, calls: int, fails: int) -> None:
    for _ in range(calls):
        await suite.inference.ModelInfer(_request(), timeout=10)
    for _ in range(fails):  # refused by the gateway's validation: counted as failed calls
        with pytest.raises(grpc.aio.AioRpcError):
            await suite.inference.ModelInfer(_request(columns=3), timeout=10)


async def _counted(registry: RegistryClient, calls: int) -> QueueStatus:
    """The affine queue once the gateway's flush has added ``calls`` calls to the window."""
    async with asyncio.timeout(10):
        while True:
            status = await registry.get_cluster_status()
            [queue] = status.queues
            if round(queue.calls.calls_per_s * queue.calls.window_s) >= calls:
                return queue
            await asyncio.sleep(0.2)


async def test_status_shows_workers_queues_rates_and_percentiles(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    await _traffic(suite, calls=6, fails=2)
    queue = await _counted(suite.registry, 8)
    assert (queue.model, queue.version, queue.pool, queue.state) == ("affine", 1, "default", "serving")
    assert (queue.workers, queue.length, queue.pending, queue.oldest_age_ms) == (1, 0, 0, 0)
    calls = queue.calls
    assert 50 <= calls.window_s <= 60
    assert round(calls.calls_per_s * calls.window_s) == 8
    assert round(calls.errors_per_s * calls.window_s) == 2
    assert 0 < calls.p50_ms <= calls.p99_ms < float("inf")

    status = await suite.registry.get_cluster_status()
    [worker] = status.workers
    assert worker.worker_id == suite.worker_settings.worker_id
    assert (worker.pool, worker.models, worker.in_flight) == ("default", ("affine:1",), 0)
    assert (worker.generations, worker.max_generations) == (0, 0)  # no generative model: "-" in maas status
    assert worker.providers == ("CPUExecutionProvider",)
    assert 0 <= worker.heartbeat_age_ms < 10_000


async def test_status_counts_a_backlog_and_its_oldest_entry(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    await suite.push("later", affine_model(), pool="gpu")  # no worker of pool gpu: its calls wait
    request = _request()
    request.model_name = "later"
    waiting = [asyncio.ensure_future(suite.inference.ModelInfer(request, timeout=3)) for _ in range(2)]
    async with asyncio.timeout(5):
        while (queue := _queue(await suite.registry.get_cluster_status(), "later")).length < 2:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    queue = _queue(await suite.registry.get_cluster_status(), "later")
    assert (queue.pool, queue.workers, queue.length, queue.pending) == ("gpu", 0, 2, 0)
    assert queue.state == "waiting for a worker"
    assert 300 <= queue.oldest_age_ms < 3_000
    for task in waiting:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await task
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _queue(status: ClusterStatus, model: str) -> QueueStatus:
    [queue] = [q for q in status.queues if q.model == model]
    return queue


async def test_cli_status_json_and_top(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    await _traffic(suite, calls=3, fails=0)
    await _counted(suite.registry, 3)

    code, stdout, stderr = await run_cli(suite, "status", "--json")
    assert code == 0, stderr
    data = json.loads(stdout)
    assert [w["models"] for w in data["workers"]] == [["affine:1"]]
    [queue] = data["queues"]
    assert (queue["model"], queue["version"], queue["state"], queue["length"]) == ("affine", 1, "serving", 0)
    assert queue["calls"]["calls_per_s"] > 0 and queue["calls"]["p99_ms"] > 0

    code, stdout, stderr = await run_cli(suite, "status")
    assert code == 0, stderr
    assert "workers" in stdout and "queues" in stdout and "affine:1" in stdout and "serving" in stdout

    code, stdout, stderr = await run_cli(suite, "top", "--iterations", "2", "--interval", "0.2")
    assert code == 0, stderr
    assert stdout.count("cluster at ") == 2 and stdout.count("affine:1") == 4  # workers and queues, twice


async def test_cluster_status_needs_the_admin_scope(redis_server: object, tmp_path: Path) -> None:
    running = await Suite(redis_server.url, tmp_path, auth={}).start(with_worker=False)  # type: ignore[attr-defined]
    try:
        await running.registry.create_tenant("team-a")
        key = (await running.registry.create_api_key("team-a", "reader", ["read"]))[1]
        assert (await running.registry.get_cluster_status()).workers == ()
        reader = RegistryClient(running.registry_address, metadata=[("authorization", f"Bearer {key}")])
        try:
            with pytest.raises(PermissionDenied):
                await reader.get_cluster_status()
        finally:
            await reader.close()
    finally:
        await running.stop()


async def test_cluster_status_works_on_the_registry_redis_user(tmp_path: Path) -> None:
    acl = AclRedis(tmp_path / "redis")
    admin = aioredis.Redis(port=acl.server.port)
    running = await Suite(acl.server.url, tmp_path, role_urls=acl.urls).start()
    try:
        await running.push("affine", affine_model())
        await _traffic(running, calls=2, fails=0)
        queue = await _counted(running.registry, 2)
        assert queue.workers == 1
        await running.registry.create_model("never-read")
        await running.registry.upload_version("never-read", affine_model())
        await running.registry.deploy("never-read", 1, pool="elsewhere")  # a queue no group exists for yet
        assert _queue(await running.registry.get_cluster_status(), "never-read").pending == 0
    finally:
        await running.stop()
        acl_log = await admin.execute_command("ACL", "LOG")
        await admin.aclose()
        acl.server.stop()
    assert _denials(acl_log) == []
