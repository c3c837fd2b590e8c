"""The request path on a real 3-master Redis Cluster (issue 10 point 5): no failover, no resharding.

Every service runs in cluster mode (``redis_cluster``) against ``tests.redis_cluster``: models whose
queues land on different masters, a worker killed with SIGKILL while it answers, tenant quotas
(taken in the tenant's slot before the queue's), and registry events reaching the gateway.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from services.common import keys
from services.common.auth import TenantQuota
from services.common.queue import QueuedRequest, now_ms
from services.common.redis_conn import create_redis, send_commands
from services.gateway.admission import Admission
from tests.integration.suite import Suite, queue_settled, start_worker_process
from tests.integration.test_queue_faults import _KILLED, ROWS, _client
from tests.integration.test_quotas import _affine, _infer, _tenant_key
from tests.integration.test_rollout import _call, _eventually, _push_versions, _ready
from tests.models import affine_model
from tests.redis_cluster import RedisCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One 3-master cluster for the module (about 3 s to form); emptied after each test."""
    running = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield running
    running.stop()


@pytest.fixture
async def suite(cluster: RedisCluster, tmp_path: Path) -> AsyncIterator[Suite]:
    """Registry, gateway and an in-process worker, all in cluster mode."""
    running = await Suite(cluster.url, tmp_path, cluster=True).start()
    yield running
    await running.stop()
    _flush(cluster)


def _spread_names(cluster: RedisCluster, count: int) -> list[str]:
    """Model names whose version-1 queues land on ``count`` different masters."""
    by_node: dict[int, str] = {}
    for index in range(1000):
        by_node.setdefault(cluster.node_of(keys.queue(f"m{index}", 1)), f"m{index}")
        if len(by_node) == count:
            return sorted(by_node.values())
    raise AssertionError("no spread found")


def _request(model: str, value: float) -> object:
    from inference import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.full((2, 4), value, np.float32).tobytes())
    return request


async def test_keys_share_their_slot_by_hash_tag_and_commands_route_per_node(cluster: RedisCluster) -> None:
    data_plane = [keys.queue("m", 3), keys.dead_letter("m", 3), keys.stats("m", 3), keys.stats_window("m", 3, 7)]
    assert len({cluster.node_of(key) for key in data_plane}) == 1
    tenant = [keys.quota_bucket("t"), keys.quota_in_flight("t"), keys.usage("t")]
    assert len({cluster.node_of(key) for key in tenant}) == 1
    registry = [keys.MODELS, keys.DEPLOYMENTS, keys.model("a"), keys.versions("b"), keys.aliases("c")]
    assert len({cluster.node_of(key) for key in registry}) == 1
    client = create_redis(cluster.url, timeout_s=5, cluster=True)
    try:
        names = _spread_names(cluster, 3)
        commands: list[tuple[object, ...]] = [("XADD", keys.queue(name, 1), "*", "f", name) for name in names]
        commands += [("MULTI",), ("XLEN", keys.queue(names[0], 1)), ("HINCRBY", keys.stats(names[0], 1), "n", 1)]
        commands += [("EXEC",), ("HINCRBY", keys.usage("t"), "calls", 2)]
        replies = await send_commands(client, commands)
        assert replies[3:] == [b"OK", b"QUEUED", b"QUEUED", [1, 1], 2]  # in order, across three masters
        assert [await client.xlen(keys.queue(name, 1)) for name in names] == [1, 1, 1]
        [error] = await send_commands(client, [("DEL", keys.queue(names[0], 1), keys.queue(names[1], 1))])
        assert isinstance(error, redis.exceptions.ClusterCrossSlotError)
    finally:
        _flush(cluster)
        await client.aclose()


async def test_calls_to_models_on_three_masters_are_answered(suite: Suite, cluster: RedisCluster) -> None:
    names = _spread_names(cluster, 3)
    for name in names:
        await suite.push(name, affine_model())
    replies = await asyncio.gather(
        *(suite.inference.ModelInfer(_request(name, i), timeout=20) for i in range(6) for name in names)
    )
    for index, reply in enumerate(replies):
        values = np.frombuffer(reply.raw_output_contents[0], np.float32)
        assert np.all(values == 2.0 * (index // 3) + 1)
    assert {cluster.node_of(keys.queue(name, 1)) for name in names} == set(cluster.ports)
    assert suite.worker is not None
    await suite.worker.run_until_empty()  # entries are acked after the replies, then the statistics sent
    for name in names:  # acked and deleted: XLEN is the backlog, and the statistics were counted
        assert await suite.redis.xlen(keys.queue(name, 1)) == 0
        assert int(await suite.redis.hget(keys.stats(name, 1), "compute_count") or 0) == 6  # one flush, 3 masters


async def test_tenant_quota_holds_across_slots(cluster: RedisCluster, tmp_path: Path) -> None:
    running = await Suite(cluster.url, tmp_path, cluster=True, auth={"auth_failures_burst": 100_000}).start()
    try:
        await running.push("affine", affine_model())
        key = await _tenant_key(running, "team-a", rps=1.0, burst=5, max_in_flight=50)
        outcomes = await asyncio.gather(*(_infer(running.inference, key, _affine()) for _ in range(9)))
        codes = [code for code, _details, _trailers in outcomes]
        assert codes.count(grpc.StatusCode.OK) == 5, outcomes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4, outcomes
        for code, details, trailers in outcomes:
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                wait_ms = int(trailers["retry-after-ms"])
                assert (
                    details == f"tenant 'team-a' is over its rate limit of 1 calls/s (burst 5); retry in {wait_ms} ms"
                )
        await _eventually(lambda: _no_calls_in_flight(running, "team-a"))
    finally:
        await running.stop()
        _flush(cluster)


async def test_a_full_queue_gives_the_quota_it_took_back(cluster: RedisCluster) -> None:
    client = create_redis(cluster.url, timeout_s=5, cluster=True)
    admission = Admission(client)
    await admission.start()
    quota = TenantQuota(rps=1.0, burst=3, max_in_flight=2)
    try:
        assert cluster.node_of(keys.quota_bucket("t")) != cluster.node_of(keys.queue("q", 1))
        entry = QueuedRequest(
            id="c1", reply_to=keys.replies("g"), deadline_ms=now_ms() + 60_000, payload=b"p", tenant="t"
        )
        assert await admission.enqueue(keys.queue("q", 1), 0, entry, quota) is False  # the queue is full
        assert await admission.enqueue(keys.queue("q", 1), 10, replace(entry, id="c2"), quota) is True
        await admission.stop()  # sends what is waiting: the give-back of c1
        assert await client.zrange(keys.quota_in_flight("t"), 0, -1) == [f"{keys.replies('g')}:c2".encode()]
        tokens = float(await client.hget(keys.quota_bucket("t"), "tokens"))
        assert 2.0 <= tokens <= 2.1  # 3 - 1 (c2's); c1's came back
        assert await client.xlen(keys.queue("q", 1)) == 1
    finally:
        await admission.stop()
        _flush(cluster)
        await client.aclose()


async def _no_calls_in_flight(suite: Suite, tenant: str) -> bool:
    return await suite.redis.zcard(keys.quota_in_flight(tenant)) == 0


def _flush(cluster: RedisCluster) -> None:
    for port in cluster.ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        client.flushall()
        client.close()


async def test_an_alias_change_reaches_the_gateway_through_events(suite: Suite) -> None:
    await _push_versions(suite, 2)
    assert await _call(suite, "") == 1
    await suite.registry.set_alias("m", "default", 2)
    await _eventually(lambda: _ready(suite, "2"))
    await _eventually(lambda: _answers(suite, 2))


async def _answers(suite: Suite, version: int) -> bool:
    return await _call(suite, "") == version


@pytest.mark.timeout(60)
async def test_worker_killed_while_answering_loses_no_call(cluster: RedisCluster, tmp_path: Path) -> None:
    running = await Suite(cluster.url, tmp_path, cluster=True, timeout_s=30).start(with_worker=False)
    worker = None
    try:
        await running.push("pipelined", affine_model(), max_batch_size=ROWS)
        worker = await start_worker_process(running, tmp_path, "w0", worker_id=_KILLED)
        stop, results = asyncio.Event(), {}
        clients = [asyncio.ensure_future(_client(running, 10_000 * c, stop, results)) for c in range(8)]
        for attempt in range(2):
            await _eventually_answered(results, 20 * (attempt + 1))
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
            worker = await start_worker_process(running, tmp_path, f"w{attempt + 1}", worker_id=_KILLED)
        await _eventually_answered(results, len(results) + 20)
        stop.set()
        await asyncio.gather(*clients)  # every call of every client got its one, correct reply
        assert all(value == 2.0 * index + 1 for index, value in results.items())
        # On a cluster a batch's replies go out before its XACK + XDEL (another slot's MULTI), so
        # the last replies can reach the clients a moment before their entries leave the queue.
        assert await queue_settled(running.redis, keys.queue("pipelined", 1), timeout_s=5.0)
    finally:
        if worker is not None and worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
            await worker.wait()
        await running.stop()


async def _eventually_answered(results: dict[int, float], count: int) -> None:
    async with asyncio.timeout(20):
        while len(results) < count:
            await asyncio.sleep(0.02)


def _ids_on_every_master(cluster: RedisCluster) -> list[str]:
    """Worker ids whose heartbeat keys land on each master."""
    by_node: dict[int, str] = {}
    for index in range(1000):
        by_node.setdefault(cluster.node_of(keys.worker(f"w{index}")), f"w{index}")
        if len(by_node) == len(cluster.ports):
            return sorted(by_node.values())
    raise AssertionError("no spread found")


async def test_cluster_status_finds_workers_and_queues_on_every_master(suite: Suite, cluster: RedisCluster) -> None:
    names = _spread_names(cluster, 3)
    for name in names:
        await suite.push(name, affine_model())
    assert suite.worker is not None
    worker_ids = _ids_on_every_master(cluster)
    for worker_id in worker_ids:  # the worker's own heartbeat, under ids whose keys SCAN finds only on their master
        suite.worker.settings.worker_id = worker_id
        await suite.worker.beat()
    status = await suite.registry.get_cluster_status()
    assert set(worker_ids) <= {worker.worker_id for worker in status.workers}
    served = {f"{name}:1" for name in names}
    assert all(served <= set(worker.models) for worker in status.workers if worker.worker_id in worker_ids)
    mine = [(queue.model, queue.workers, queue.state) for queue in status.queues if queue.model in names]
    assert mine == [(name, len(status.workers), "serving") for name in names]


async def test_an_optimisation_derives_a_served_version_in_cluster_mode(suite: Suite) -> None:
    await suite.push("m", affine_model())
    started = await suite.registry.optimize_version("m", 1, "graph")
    async for operation in suite.registry.watch_operation(started.id):  # noqa: B007  # the last one is kept
        pass
    assert operation.state.name == "SUCCEEDED", operation.error_message
    derived = await suite.registry.get_version("m", 2)
    assert derived.lineage is not None and derived.lineage.source_version == 1 and derived.report is not None
    await suite.registry.deploy("m", 2)
    assert suite.worker is not None
    await suite.worker.reconcile()
    reply = await suite.inference.ModelInfer(_request("m", 1.0), timeout=20)
    assert reply.model_version == "2"
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [3.0] * 8  # y = 2x + 1
