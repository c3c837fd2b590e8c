"""Workers that share a cache directory (``maas up --workers N``) download one version at the same time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from onnx import TensorProto, helper, numpy_helper

from services.common.embedded_redis import EmbeddedRedis
from services.common.registry_client import RegistryClient
from tests.integration.suite import Suite

pytestmark = pytest.mark.integration

WORKERS = 4
SIZE = 1024


def weighty_model() -> bytes:
    """Return y = x @ W, W a [1024, 1024] FP32 initializer: 4 MiB, several download chunks."""
    weights = numpy_helper.from_array(np.random.default_rng(3).standard_normal((SIZE, SIZE)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "weighty",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SIZE])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    running = await Suite(redis_server.url, tmp_path).start(with_worker=False)
    yield running
    await running.stop()


async def test_concurrent_downloads_into_one_cache_each_end_with_the_whole_file(suite: Suite, tmp_path: Path) -> None:
    model = weighty_model()  # several chunks, so the downloads interleave
    await suite.registry.create_model("shared")
    version = await suite.registry.upload_version("shared", model)
    dest = tmp_path / "cache" / "shared" / "1.onnx"
    clients = [RegistryClient(suite.registry_address) for _ in range(WORKERS)]  # one channel per worker
    try:
        records = await asyncio.gather(*(client.download_version("shared", 1, dest) for client in clients))
    finally:
        for client in clients:
            await client.close()
    assert all(record.sha256 == version.sha256 for record in records)
    assert dest.read_bytes() == model
    assert sorted(path.name for path in dest.parent.iterdir()) == ["1.onnx"]  # no partial file left behind
