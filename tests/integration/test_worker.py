"""The inference worker on a real Redis: queue protocol, batching, faults, drain and direct gRPC.

Most tests serve models from a directory (``DirectoryModelSource``); the registry tests and
the process fault test use the real registry service.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from services.common import keys
from services.common.dtypes import from_onnx
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import NotFound
from services.common.metadata import DeploymentRecord, TensorSpec, VersionRecord
from services.common.queue import QueuedRequest, Reply, now_ms
from services.common.redis_conn import create_redis
from services.common.registry_client import RegistryClient
from services.inference.server import create_server
from services.inference.settings import InferenceSettings
from services.inference.worker import InferenceWorker, ModelSource
from services.registry.server import create_server as create_registry_server
from services.registry.server import create_store
from services.registry.settings import RegistrySettings
from tests.models import affine_model, slow_model, two_io_model

pytestmark = pytest.mark.integration

REPLIES = keys.replies("gw-test")
QUEUE = keys.queue("affine", 1)
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, INTERNAL = 0, 3, 4, 13


def _specs(values: Any) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            name=value.name,
            datatype=from_onnx(value.type.tensor_type.elem_type).name,
            shape=tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim),
        )
        for value in values
    )


class DirectoryModelSource:
    """A model source without a registry: ``<root>/<model>/<version>.onnx``, deployments set in code."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.deployments: list[DeploymentRecord] = []
        self.downloads = 0

    def add(self, model: str, data: bytes, version: int = 1, **options: Any) -> None:
        path = self.root / model / f"{version}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.deployments.append(DeploymentRecord(model=model, version=version, **options))

    async def list_deployments(self, pool: str = "") -> list[DeploymentRecord]:
        return [d for d in self.deployments if not pool or d.pool == pool]

    async def get_version(self, model: str, version: int = 0) -> VersionRecord:
        path = self.root / model / f"{version}.onnx"
        if not await asyncio.to_thread(path.exists):
            raise NotFound(f"model '{model}' version {version} not found")
        data = await asyncio.to_thread(path.read_bytes)
        try:
            graph = onnx.load_from_string(data).graph
        except DecodeError:  # a file ONNX Runtime will refuse: the worker must survive it
            graph = onnx.GraphProto()
        return VersionRecord(
            model=model,
            version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            inputs=_specs(graph.input),
            outputs=_specs(graph.output),
            created_at_ms=0,
        )

    async def download_version(self, model: str, version: int, dest: Path) -> VersionRecord:
        record = await self.get_version(model, version)
        data = await asyncio.to_thread((self.root / model / f"{version}.onnx").read_bytes)
        dest.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(dest.write_bytes, data)
        self.downloads += 1
        return record


@pytest.fixture
def source(tmp_path: Path) -> DirectoryModelSource:
    models = DirectoryModelSource(tmp_path / "models")
    models.add("affine", affine_model(), max_batch_size=4, max_wait_ms=20)
    return models


def worker_settings(redis_url: str, tmp_path: Path, **overrides: Any) -> InferenceSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "cache_dir": tmp_path / "cache",
        "worker_id": "w1",
        "providers": "cpu",
        "intra_op_threads": 1,
        "block_ms": 100,
        "reclaim_interval_s": 0.1,
        "heartbeat_interval_s": 0.1,
        "reconcile_interval_s": 30.0,
        "shutdown_grace_s": 5.0,
    }
    return InferenceSettings(**(values | overrides))


@asynccontextmanager
async def running_worker(settings: InferenceSettings, source: ModelSource) -> AsyncIterator[InferenceWorker]:
    client = create_redis(settings.redis_url, timeout_s=5)
    worker = InferenceWorker(settings, client, source)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain()
        await client.aclose()


def affine_request(x: np.ndarray[Any, Any], request_id: str = "") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="affine",
        id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[np.asarray(x, dtype=np.float32).tobytes()],
    )


def rows(start: int, count: int = 1) -> np.ndarray[Any, Any]:
    return np.arange(start, start + 4 * count, dtype=np.float32).reshape(count, 4)


async def create_reply_stream(redis: aioredis.Redis, key: str = REPLIES) -> None:
    """Create an empty stream, as a gateway does (workers reply with NOMKSTREAM)."""
    await redis.xadd(key, {"init": "1"})
    await redis.xtrim(key, maxlen=0)


async def enqueue(
    redis: aioredis.Redis,
    call_id: str,
    payload: bytes,
    *,
    reply_to: str = REPLIES,
    deadline_ms: int | None = None,
    queue: str = QUEUE,
) -> None:
    queued = QueuedRequest(id=call_id, reply_to=reply_to, deadline_ms=deadline_ms or now_ms() + 60_000, payload=payload)
    await redis.xadd(queue, queued.to_fields())  # type: ignore[arg-type]


async def enqueue_affine(redis: aioredis.Redis, call_id: str, x: np.ndarray[Any, Any], **kwargs: Any) -> None:
    await enqueue(redis, call_id, affine_request(x, request_id=f"client-{call_id}").SerializeToString(), **kwargs)


async def read_replies(redis: aioredis.Redis, key: str = REPLIES) -> dict[str, list[Reply]]:
    replies: dict[str, list[Reply]] = {}
    for _entry_id, fields in await redis.xrange(key):
        reply = Reply.from_fields(fields)
        replies.setdefault(reply.id, []).append(reply)
    return replies


def output_y(reply: Reply) -> np.ndarray[Any, Any]:
    response = pb.ModelInferResponse.FromString(reply.payload)
    assert [(o.name, o.datatype) for o in response.outputs] == [("y", "FP32")]
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))


def batch_stats(model: str = "affine") -> tuple[float, float, float]:
    """(runs, requests run, runs of at most 2 requests) so far, from the batch size histogram."""
    labels = {"model": model, "version": "1"}
    name = "maas_inference_batch_size_requests"
    count = REGISTRY.get_sample_value(f"{name}_count", labels) or 0.0
    total = REGISTRY.get_sample_value(f"{name}_sum", labels) or 0.0
    small = REGISTRY.get_sample_value(f"{name}_bucket", {**labels, "le": "2.0"}) or 0.0
    return count, total, small


def answered(code: str, model: str = "affine") -> float:
    labels = {"model": model, "version": "1", "code": code}
    return REGISTRY.get_sample_value("maas_inference_requests_total", labels) or 0.0


async def group_pending(redis: aioredis.Redis, queue: str = QUEUE) -> int:
    summary = await redis.xpending(queue, keys.QUEUE_GROUP)
    return int(summary["pending"])


async def assert_drained(redis: aioredis.Redis) -> None:
    """The queue holds nothing and nothing read is unacknowledged."""
    assert await redis.xlen(QUEUE) == 0
    assert await group_pending(redis) == 0


async def eventually(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s} s")


# Queue protocol ---------------------------------------------------------------------------


async def test_replies_hold_the_model_outputs_and_the_queue_is_emptied(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    inputs = {"a": rows(0), "b": rows(10, 3), "c": rows(-5, 2)}
    for call_id, x in inputs.items():
        await enqueue_affine(redis_client, call_id, x)

    async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
        await worker.run_until_empty()

    replies = await read_replies(redis_client)
    assert sorted(replies) == ["a", "b", "c"]
    for call_id, x in inputs.items():
        [reply] = replies[call_id]
        assert (reply.code, reply.message) == (OK, "")
        response = pb.ModelInferResponse.FromString(reply.payload)
        assert (response.model_name, response.model_version, response.id) == ("affine", "1", f"client-{call_id}")
        np.testing.assert_array_equal(output_y(reply), 2 * x + 1)
    await assert_drained(redis_client)


async def test_requests_are_stacked_up_to_max_batch_size(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    for index in range(6):
        await enqueue_affine(redis_client, f"r{index}", rows(index))
    runs, requests, small = batch_stats()

    async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
        await worker.run_until_empty()

    # max_batch_size is 4: one stacked run of 4 requests, then one of the 2 left.
    after = batch_stats()
    assert (after[0] - runs, after[1] - requests, after[2] - small) == (2, 6, 1)
    replies = await read_replies(redis_client)
    for index in range(6):
        np.testing.assert_array_equal(output_y(replies[f"r{index}"][0]), 2 * rows(index) + 1)


async def test_expired_deadline_gets_deadline_exceeded(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    await enqueue_affine(redis_client, "late", rows(0), deadline_ms=now_ms() - 1)
    await enqueue_affine(redis_client, "timely", rows(0))

    async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
        await worker.run_until_empty()

    replies = await read_replies(redis_client)
    [late], [timely] = replies["late"], replies["timely"]
    assert (late.code, late.message, late.payload) == (
        DEADLINE_EXCEEDED,
        "deadline exceeded before the request ran",
        b"",
    )
    assert timely.code == OK
    assert await redis_client.xlen(QUEUE) == 0


async def test_malformed_entries_get_invalid_argument_and_the_worker_keeps_serving(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
        await enqueue(redis_client, "garbage", b"\xff\xff\xff")
        await enqueue(redis_client, "narrow", affine_request(rows(0)[:, :3]).SerializeToString())
        await redis_client.xadd(QUEUE, {"id": "no-req", "reply": REPLIES})
        await redis_client.xadd(QUEUE, {"junk": "no reply stream at all"})
        await worker.run_until_empty()
        await enqueue_affine(redis_client, "fine", rows(7))
        await worker.run_until_empty()

    replies = await read_replies(redis_client)
    assert {call_id: (r[0].code, r[0].message) for call_id, r in replies.items() if call_id != "fine"} == {
        "garbage": (INVALID_ARGUMENT, "request payload is not a serialized ModelInferRequest"),
        "narrow": (INVALID_ARGUMENT, "input 'x': dimension 1 is 3, expected 4 (shape [-1, 4])"),
        "no-req": (INVALID_ARGUMENT, "malformed queue entry: field req missing"),
    }
    np.testing.assert_array_equal(output_y(replies["fine"][0]), 2 * rows(7) + 1)
    await assert_drained(redis_client)


async def test_one_batch_answers_two_gateways_in_one_round_trip(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    other = keys.replies("gw-other")
    await create_reply_stream(redis_client)
    await create_reply_stream(redis_client, other)
    streams = {"a0": REPLIES, "b0": other, "a1": REPLIES, "b1": other}
    for index, (call_id, reply_to) in enumerate(streams.items()):
        await enqueue_affine(redis_client, call_id, rows(index), reply_to=reply_to)
    runs, requests, _small = batch_stats()

    async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
        await worker.run_until_empty()

    after = batch_stats()
    assert (after[0] - runs, after[1] - requests) == (1, 4)  # one stacked run of all four
    mine, theirs = await read_replies(redis_client), await read_replies(redis_client, other)
    assert (sorted(mine), sorted(theirs)) == (["a0", "a1"], ["b0", "b1"])
    for index, call_id in enumerate(streams):
        [reply] = (mine if call_id.startswith("a") else theirs)[call_id]
        np.testing.assert_array_equal(output_y(reply), 2 * rows(index) + 1)
    await assert_drained(redis_client)


async def test_a_reply_key_of_the_wrong_type_fails_only_its_own_reply(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    broken = keys.replies("gw-broken")
    await redis_client.set(broken, "not a stream")
    await create_reply_stream(redis_client)
    await enqueue_affine(redis_client, "lost", rows(0), reply_to=broken)
    await enqueue_affine(redis_client, "kept", rows(1))

    with capture_logs() as logs:
        async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
            await worker.run_until_empty()

    assert sorted(await read_replies(redis_client)) == ["kept"]
    assert [e["error"][:9] for e in logs if e["event"] == "reply_rejected"] == ["WRONGTYPE"]
    await assert_drained(redis_client)


async def test_a_batch_of_expired_malformed_and_valid_entries_answers_each(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    await enqueue_affine(redis_client, "expired", rows(0), deadline_ms=now_ms() - 1)
    await enqueue(redis_client, "malformed", b"\x0a\xff")
    await enqueue_affine(redis_client, "valid", rows(3))
    await redis_client.xadd(QUEUE, {"id": "fieldless", "reply": REPLIES})
    runs, requests, _small = batch_stats()

    async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
        await worker.run_until_empty()

    after = batch_stats()
    assert (after[0] - runs, after[1] - requests) == (1, 1)  # only the valid entry ran
    replies = await read_replies(redis_client)
    assert {call_id: (r[0].code, len(r)) for call_id, r in replies.items()} == {
        "expired": (DEADLINE_EXCEEDED, 1),
        "malformed": (INVALID_ARGUMENT, 1),
        "valid": (OK, 1),
        "fieldless": (INVALID_ARGUMENT, 1),
    }
    np.testing.assert_array_equal(output_y(replies["valid"][0]), 2 * rows(3) + 1)
    await assert_drained(redis_client)


async def test_entries_waiting_for_a_fuller_batch_are_not_reclaimed_and_run_twice(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    source = DirectoryModelSource(tmp_path / "models")
    source.add("affine", affine_model(), max_batch_size=8, max_wait_ms=600)  # longer than reclaim_idle_ms
    await create_reply_stream(redis_client)
    for index in range(3):
        await enqueue_affine(redis_client, f"w{index}", rows(index))
    settings = worker_settings(redis_server.url, tmp_path, reclaim_idle_ms=100, reclaim_interval_s=0.05)

    async with running_worker(settings, source) as worker:
        await worker.run_until_empty()

    replies = await read_replies(redis_client)
    assert {call_id: len(answers) for call_id, answers in replies.items()} == {"w0": 1, "w1": 1, "w2": 1}


async def test_a_partial_batch_waits_for_more_only_while_the_queue_backs_up(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    source = DirectoryModelSource(tmp_path / "models")
    source.add("affine", affine_model(), max_batch_size=4, max_wait_ms=0)
    await create_reply_stream(redis_client)
    settings = worker_settings(redis_server.url, tmp_path, busy_fill_us=1_000_000, busy_fill_min=2)

    async def replied() -> int:
        return sum(len(answers) for answers in (await read_replies(redis_client)).values())

    async with running_worker(settings, source):
        # An idle worker runs a lone call at once: no fill wait (1 s here).
        started = asyncio.get_running_loop().time()
        await enqueue_affine(redis_client, "alone", rows(0))
        await eventually(lambda: _at_least(replied, 1))
        assert asyncio.get_running_loop().time() - started < 0.9
        runs, requests, _small = batch_stats()

        # Six calls land at once: a full batch of 4 runs, and the 2 left found waiting after it
        # mean the queue backs up: they wait for more, and a call arriving meanwhile joins them.
        async with redis_client.pipeline(transaction=True) as pipe:
            for index in range(6):
                queued = QueuedRequest(
                    id=f"b{index}", reply_to=REPLIES, deadline_ms=now_ms() + 60_000,
                    payload=affine_request(rows(index)).SerializeToString(),
                )  # fmt: skip
                pipe.xadd(QUEUE, queued.to_fields())  # type: ignore[arg-type]
            await pipe.execute()
        await eventually(lambda: _at_least(replied, 5))  # the full batch is answered
        await enqueue_affine(redis_client, "late", rows(9))
        await eventually(lambda: _at_least(replied, 8))

    after = batch_stats()
    assert (after[0] - runs, after[1] - requests) == (2, 7)  # without the wait: 3 runs (4, 2, 1)
    replies = await read_replies(redis_client)
    np.testing.assert_array_equal(output_y(replies["late"][0]), 2 * rows(9) + 1)


async def test_an_idle_worker_reads_each_lone_call_with_one_blocking_read(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # After a batch smaller than busy_fill_min the queue was not backing up: the next read blocks
    # at once instead of looking without blocking first (one round trip fewer a call at 1 client).
    source = DirectoryModelSource(tmp_path / "models")
    source.add("affine", affine_model(), max_batch_size=8)
    await create_reply_stream(redis_client)

    async def xreadgroups() -> int:
        return int((await redis_client.info("commandstats")).get("cmdstat_xreadgroup", {}).get("calls", 0))

    async def replied() -> int:
        return sum(len(answers) for answers in (await read_replies(redis_client)).values())

    async with running_worker(worker_settings(redis_server.url, tmp_path), source):
        await enqueue_affine(redis_client, "first", rows(0))
        await eventually(lambda: _at_least(replied, 1))
        before = await xreadgroups()
        for index in range(1, 11):  # one call at a time: batches of 1
            await enqueue_affine(redis_client, f"c{index}", rows(index))
            await eventually(lambda index=index: _at_least(replied, index + 1))  # type: ignore[misc]
        reads = await xreadgroups() - before
    assert 10 <= reads <= 12  # one blocking read a call (a read may end at its 1 s block time); 20 before


async def _at_least(count: Callable[[], Any], wanted: int) -> bool:
    return bool(await count() >= wanted)


async def test_reply_stream_of_a_gone_gateway_is_not_recreated(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    gone = keys.replies("gone-gateway")
    before = answered("OK")
    await enqueue_affine(redis_client, "orphan", rows(0), reply_to=gone)

    async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
        await worker.run_until_empty()

    assert answered("OK") - before == 1
    assert await redis_client.exists(gone) == 0
    assert await redis_client.xlen(QUEUE) == 0


async def test_group_is_recreated_after_redis_lost_it(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    with capture_logs() as logs:
        async with running_worker(worker_settings(redis_server.url, tmp_path), source) as worker:
            await enqueue_affine(redis_client, "before", rows(0))
            await worker.run_until_empty()
            await redis_client.delete(QUEUE)  # what a Redis restart without persistence does
            await enqueue_affine(redis_client, "after", rows(1))
            await worker.run_until_empty()

    replies = await read_replies(redis_client)
    assert [replies["before"][0].code, replies["after"][0].code] == [OK, OK]
    assert any(entry["event"] == "queue_group_missing" for entry in logs)


# Reclaim and poison -------------------------------------------------------------------------


async def read_as_dead_consumer(redis: aioredis.Redis) -> list[bytes]:
    reply = await redis.xreadgroup(keys.QUEUE_GROUP, "dead", {QUEUE: ">"}, count=100)
    return [entry_id for _stream, entries in reply for entry_id, _fields in entries]


async def test_entries_of_a_dead_consumer_are_reclaimed_and_run_one_by_one(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    await redis_client.xgroup_create(QUEUE, keys.QUEUE_GROUP, id="0", mkstream=True)
    for index in range(3):
        await enqueue_affine(redis_client, f"r{index}", rows(index))
    assert len(await read_as_dead_consumer(redis_client)) == 3
    runs, requests, _small = batch_stats()
    settings = worker_settings(redis_server.url, tmp_path, reclaim_idle_ms=200)

    with capture_logs() as logs:
        async with running_worker(settings, source) as worker:
            await worker.run_until_empty()

    replies = await read_replies(redis_client)
    for index in range(3):
        [reply] = replies[f"r{index}"]
        np.testing.assert_array_equal(output_y(reply), 2 * rows(index) + 1)
    after = batch_stats()
    assert (after[0] - runs, after[1] - requests) == (3, 3)  # never stacked: one run each
    reclaimed = [entry for entry in logs if entry["event"] == "entry_reclaimed"]
    assert [entry["deliveries"] for entry in reclaimed] == [2, 2, 2]
    assert await group_pending(redis_client) == 0


async def test_a_restarted_worker_runs_what_its_previous_life_left_pending(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    await redis_client.xgroup_create(QUEUE, keys.QUEUE_GROUP, id="0", mkstream=True)
    for index in range(3):
        await enqueue_affine(redis_client, f"left-{index}", rows(index))
    # The previous life of worker "w1" read them and died before replying.
    await redis_client.xreadgroup(keys.QUEUE_GROUP, "w1", {QUEUE: ">"}, count=10)
    assert await group_pending(redis_client) == 3
    settings = worker_settings(redis_server.url, tmp_path, worker_id="w1", reclaim_idle_ms=600_000)
    async with running_worker(settings, source) as worker:
        await worker.run_until_empty(timeout_s=10)
    replies = await read_replies(redis_client)
    assert sorted(replies) == ["left-0", "left-1", "left-2"]
    assert np.array_equal(output_y(replies["left-2"][0]), rows(2) * 2 + 1)
    assert await group_pending(redis_client) == 0


async def test_a_long_batch_is_not_stolen_by_a_live_worker(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    models = DirectoryModelSource(tmp_path / "models")
    models.add("slow", slow_model(), max_batch_size=1, max_wait_ms=0)
    queue = keys.queue("slow", 1)
    await create_reply_stream(redis_client)
    x = np.full((1024, 1024), 0.001, np.float32)
    request = pb.ModelInferRequest(
        model_name="slow",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1024, 1024])],
        raw_input_contents=[x.tobytes()],
    )
    fast_reclaim = {"reclaim_idle_ms": 300, "reclaim_interval_s": 0.05}
    one = worker_settings(redis_server.url, tmp_path, worker_id="w1", **fast_reclaim)
    two = worker_settings(redis_server.url, tmp_path / "two", worker_id="w2", **fast_reclaim)
    async with running_worker(one, models), running_worker(two, models):
        await enqueue(redis_client, "long", request.SerializeToString(), queue=queue)
        await eventually(lambda: _any_reply(redis_client), timeout_s=30)
        await asyncio.sleep(0.5)  # a stolen copy would still be running: give it time to reply too
    replies = await read_replies(redis_client)
    assert [reply.code for reply in replies["long"]] == [OK]


async def _any_reply(redis: aioredis.Redis) -> bool:
    return bool(await redis.xlen(REPLIES))


async def test_claimed_entries_that_were_deleted_are_acked(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    await redis_client.xgroup_create(QUEUE, keys.QUEUE_GROUP, id="0", mkstream=True)
    await enqueue_affine(redis_client, "deleted", rows(0))
    await enqueue_affine(redis_client, "kept", rows(1))
    deleted_id, _kept_id = await read_as_dead_consumer(redis_client)
    await redis_client.xdel(QUEUE, deleted_id)  # e.g. an undeploy failed the queue meanwhile
    settings = worker_settings(redis_server.url, tmp_path, reclaim_idle_ms=200)

    async with running_worker(settings, source) as worker:
        await worker.run_until_empty()

    replies = await read_replies(redis_client)
    assert sorted(replies) == ["kept"]
    assert await group_pending(redis_client) == 0


async def test_poison_entry_goes_to_the_dead_letter_stream(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    await redis_client.xgroup_create(QUEUE, keys.QUEUE_GROUP, id="0", mkstream=True)
    await enqueue_affine(redis_client, "poison", rows(0))
    await enqueue_affine(redis_client, "unlucky", rows(1))
    poison_id, _unlucky_id = await read_as_dead_consumer(redis_client)
    # Three workers already died on it: its delivery count is at max_deliveries (3).
    await redis_client.xclaim(QUEUE, keys.QUEUE_GROUP, "dead", 0, [poison_id], retrycount=3)
    settings = worker_settings(redis_server.url, tmp_path, reclaim_idle_ms=200, max_deliveries=3)

    async with running_worker(settings, source) as worker:
        await worker.run_until_empty()

    replies = await read_replies(redis_client)
    [poison], [unlucky] = replies["poison"], replies["unlucky"]
    assert (poison.code, poison.message) == (INTERNAL, "request failed 3 times; moved to dead-letter stream")
    np.testing.assert_array_equal(output_y(unlucky), 2 * rows(1) + 1)
    [(_dlq_id, dead)] = await redis_client.xrange(keys.dead_letter("affine", 1))
    assert QueuedRequest.from_fields(dead).id == "poison"
    assert (dead[b"dlq_entry_id"], dead[b"dlq_deliveries"]) == (poison_id, b"4")
    await assert_drained(redis_client)


# Reconcile, heartbeat, drain ----------------------------------------------------------------


async def test_heartbeat_then_drain_deletes_consumer_and_heartbeat(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    client = create_redis(redis_server.url, timeout_s=5)
    worker = InferenceWorker(worker_settings(redis_server.url, tmp_path), client, source)
    worker.grpc_port = 4321
    await worker.start()
    try:
        await eventually(lambda: redis_client.exists(keys.worker("w1")))
        beat = json.loads(await redis_client.get(keys.worker("w1")))
        assert {k: beat[k] for k in ("worker_id", "pool", "pid", "port", "models")} == {
            "worker_id": "w1",
            "pool": "default",
            "pid": os.getpid(),
            "port": 4321,
            "models": ["affine:1"],
        }
        assert 0 < await redis_client.pttl(keys.worker("w1")) <= 10_000
        for index in range(8):
            await enqueue_affine(redis_client, f"r{index}", rows(index))
        await worker.drain()
    finally:
        await worker.drain()
        await client.aclose()

    # Everything read was answered and acked; what was not read is still queued for others.
    assert len(await read_replies(redis_client)) + await redis_client.xlen(QUEUE) == 8
    assert await group_pending(redis_client) == 0
    consumers = await redis_client.xinfo_consumers(QUEUE, keys.QUEUE_GROUP)
    assert [c["name"] for c in consumers] == []
    assert await redis_client.exists(keys.worker("w1")) == 0
    assert not worker.is_ready


async def test_reconcile_loads_new_unloads_removed_and_survives_a_broken_model(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    source.add("broken", b"this is not onnx")
    settings = worker_settings(redis_server.url, tmp_path)
    with capture_logs() as logs:
        async with running_worker(settings, source) as worker:
            assert worker.is_ready
            assert worker.served_models == ["affine:1"]
            source.deployments = [d for d in source.deployments if d.model != "affine"]
            source.add("two_io", two_io_model())
            await worker.reconcile()
            assert worker.served_models == ["two_io:1"]
            consumers = await redis_client.xinfo_consumers(QUEUE, keys.QUEUE_GROUP)
            assert [c["name"] for c in consumers] == []

    [failure, *_] = [entry for entry in logs if entry["event"] == "model_load_failed"]
    assert failure["model"] == "broken"
    assert "failed to load" in failure["reason"]
    assert failure["log_level"] == "error"


async def test_cached_artifacts_are_not_downloaded_again(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> None:
    settings = worker_settings(redis_server.url, tmp_path)
    async with running_worker(settings, source):
        pass
    async with running_worker(settings, source) as worker:
        assert worker.served_models == ["affine:1"]
    assert source.downloads == 1
    sha256 = hashlib.sha256(affine_model()).hexdigest()
    assert [p.name for p in (tmp_path / "cache" / "affine").iterdir()] == [f"1-{sha256[:12]}.onnx"]


# Direct gRPC service --------------------------------------------------------------------------


@pytest.fixture
async def stub(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, source: DirectoryModelSource, tmp_path: Path
) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    settings = worker_settings(redis_server.url, tmp_path, host="127.0.0.1", port=0)
    async with running_worker(settings, source) as worker:
        handle = create_server(settings, worker)
        await handle.server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                yield pb_grpc.GRPCInferenceServiceStub(channel)
        finally:
            await handle.server.stop(None)


async def test_direct_health_and_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="affine", version="1"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="affine", version="2"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="nope"))).ready
    metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="affine"))
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("affine", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("y", "FP32", [-1, 4])]


async def test_direct_model_infer(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = await stub.ModelInfer(affine_request(rows(3, 2), request_id="direct-1"))

    assert (response.model_name, response.model_version, response.id) == ("affine", "1", "direct-1")
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))
    np.testing.assert_array_equal(y, 2 * rows(3, 2) + 1)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


@pytest.mark.parametrize(
    ("request_message", "code", "details"),
    [
        (affine_request(rows(0)[:, :3]), grpc.StatusCode.INVALID_ARGUMENT, "input 'x': dimension 1 is 3, expected 4"),
        (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' is not loaded"),
        (
            pb.ModelInferRequest(model_name="affine", model_version="9"),
            grpc.StatusCode.NOT_FOUND,
            "model 'affine' version 9 is not loaded",
        ),
    ],
)
async def test_direct_model_infer_errors(
    stub: pb_grpc.GRPCInferenceServiceStub, request_message: pb.ModelInferRequest, code: grpc.StatusCode, details: str
) -> None:
    error = await rpc_error(stub.ModelInfer(request_message))
    assert error.code() == code
    assert details in (error.details() or "")


async def test_other_rpcs_point_to_the_gateway(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    error = await rpc_error(stub.ModelConfig(pb.ModelConfigRequest(name="affine")))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.details() == "ModelConfig is not served by inference workers; use the gateway"

    async def one_request() -> AsyncIterator[pb.ModelInferRequest]:
        yield affine_request(rows(0))

    stream = stub.ModelStreamInfer(one_request())
    error = await rpc_error(stream.read())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# With the real registry ---------------------------------------------------------------------


@asynccontextmanager
async def running_registry(redis_url: str, data_dir: Path) -> AsyncIterator[RegistryClient]:
    """Serve the registry service on a free port; yield a client of it."""
    client = create_redis(redis_url, timeout_s=5)
    settings = RegistrySettings(host="127.0.0.1", port=0, data_dir=data_dir)
    store = create_store(settings, client)
    handle = create_registry_server(settings, store)
    await handle.server.start()
    registry = RegistryClient(f"127.0.0.1:{handle.port}")
    try:
        yield registry
    finally:
        await registry.close()
        await handle.server.stop(None)
        await store.close()
        await client.aclose()


async def test_worker_follows_registry_deployments(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    async with running_registry(redis_server.url, tmp_path / "blobs") as registry:
        await registry.create_model("affine")
        await registry.upload_version("affine", affine_model())
        async with running_worker(worker_settings(redis_server.url, tmp_path), registry) as worker:
            assert worker.is_ready and worker.served_models == []

            await registry.deploy("affine", 1, max_batch_size=4)

            await eventually(lambda: _served(worker, ["affine:1"]))
            await enqueue_affine(redis_client, "via-registry", rows(2))
            await worker.run_until_empty()
            await registry.undeploy("affine")
            await eventually(lambda: _served(worker, []))

    [reply] = (await read_replies(redis_client))["via-registry"]
    np.testing.assert_array_equal(output_y(reply), 2 * rows(2) + 1)


async def _served(worker: InferenceWorker, expected: list[str]) -> bool:
    return worker.served_models == expected


@pytest.mark.timeout(90)
async def test_killed_worker_process_loses_no_request(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    calls = 300
    await create_reply_stream(redis_client)
    async with running_registry(redis_server.url, tmp_path / "blobs") as registry:
        await registry.create_model("affine")
        await registry.upload_version("affine", affine_model())
        # The victim reads every call in one batch, then waits a second to top it up: it is killed
        # with all of them in flight, however fast it would run them.
        await registry.deploy("affine", 1, max_batch_size=1024, max_wait_ms=1000)
        victim = start_worker_process(redis_server.url, registry.address, tmp_path / "victim.log")
        try:
            await eventually(lambda: _beat_lists(redis_client, "victim", "affine:1"), timeout_s=60)
            async with redis_client.pipeline(transaction=False) as pipe:
                for index in range(calls):
                    request = affine_request(rows(index), request_id=f"c{index}")
                    queued = QueuedRequest(f"c{index}", REPLIES, now_ms() + 60_000, request.SerializeToString())
                    pipe.xadd(QUEUE, queued.to_fields())  # type: ignore[arg-type]
                await pipe.execute()
            await eventually(lambda: _has_pending(redis_client, "victim"), timeout_s=30)
        finally:
            victim.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.wait, 10)
        orphaned = await redis_client.xpending_range(QUEUE, keys.QUEUE_GROUP, "-", "+", 1000, consumername="victim")
        assert orphaned, "the victim was killed with work in flight"

        settings = worker_settings(redis_server.url, tmp_path, worker_id="rescuer", reclaim_idle_ms=300)
        async with running_worker(settings, registry) as rescuer:
            await rescuer.run_until_empty(timeout_s=60)

    replies = await read_replies(redis_client)
    assert sorted(replies) == sorted(f"c{index}" for index in range(calls))
    for index in range(calls):
        assert len(replies[f"c{index}"]) == 1, (index, replies[f"c{index}"])
        [reply] = replies[f"c{index}"]  # reply + ack are one transaction: never answered twice
        np.testing.assert_array_equal(output_y(reply), 2 * rows(index) + 1)
    await assert_drained(redis_client)


async def test_sigterm_drains_the_worker_process_and_exits_0(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    await create_reply_stream(redis_client)
    async with running_registry(redis_server.url, tmp_path / "blobs") as registry:
        await registry.create_model("affine")
        await registry.upload_version("affine", affine_model())
        await registry.deploy("affine", 1)
        process = start_worker_process(redis_server.url, registry.address, tmp_path / "victim.log")
        try:
            await eventually(lambda: _beat_lists(redis_client, "victim", "affine:1"), timeout_s=60)
            await enqueue_affine(redis_client, "served", rows(4))
            await eventually(lambda: _has_reply(redis_client, "served"))
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                await asyncio.to_thread(process.wait, 10)

    assert await redis_client.exists(keys.worker("victim")) == 0
    assert await redis_client.xinfo_consumers(QUEUE, keys.QUEUE_GROUP) == []
    log = (tmp_path / "victim.log").read_text()
    assert '"event": "worker_drained"' in log


async def _has_reply(redis: aioredis.Redis, call_id: str) -> bool:
    return call_id in await read_replies(redis)


def start_worker_process(redis_url: str, registry_address: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m services.inference`` as worker "victim", logging to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")} | {
        "MAAS_REDIS_URL": redis_url,
        "MAAS_INFERENCE_REGISTRY_ADDRESS": registry_address,
        "MAAS_INFERENCE_WORKER_ID": "victim",
        "MAAS_INFERENCE_CACHE_DIR": str(log.parent / "victim-cache"),
        "MAAS_INFERENCE_PROVIDERS": "cpu",
        "MAAS_INFERENCE_BLOCK_MS": "100",
        "MAAS_INFERENCE_HEARTBEAT_INTERVAL_S": "0.2",
    }
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "services.inference"], env=env, stdout=out, stderr=out)


async def _beat_lists(redis: aioredis.Redis, worker_id: str, model: str) -> bool:
    raw = await redis.get(keys.worker(worker_id))
    return raw is not None and model in json.loads(raw)["models"]


async def _has_pending(redis: aioredis.Redis, consumer: str) -> bool:
    pending = await redis.xpending_range(QUEUE, keys.QUEUE_GROUP, "-", "+", 1, consumername=consumer)
    return bool(pending)
