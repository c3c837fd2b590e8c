"""Size limits: oversized calls are refused by the gateway before anything reaches Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from onnx import TensorProto

from inference import grpc_service_pb2 as pb
from services.common import keys
from services.common.embedded_redis import EmbeddedRedis
from tests.integration.suite import Suite
from tests.models import identity_model

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
TENSOR_LIMIT = 256 * 1024
ROW_BYTES = 4096
"""One row of the model's FP32 [-1, 1024] input."""


def _request(rows: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="limited")
    request.inputs.add(name="inp", datatype="FP32", shape=[rows, 1024])
    request.raw_input_contents.append(np.zeros((rows, 1024), np.float32).tobytes())
    return request


@pytest.fixture
async def limited(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    gateway = {"max_message_bytes": MIB, "max_request_tensor_bytes": TENSOR_LIMIT}
    running = await Suite(redis_server.url, tmp_path, timeout_s=2, gateway=gateway).start(with_worker=False)
    await running.push("limited", identity_model(TensorProto.FLOAT, ["batch", 1024]), max_batch_size=1024)
    yield running
    await running.stop()


async def _refused(suite: Suite, request: pb.ModelInferRequest, **options: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.inference.ModelInfer(request, timeout=10, **options)  # type: ignore[arg-type]
    return info.value


async def test_a_message_over_the_limit_is_resource_exhausted(limited: Suite) -> None:
    error = await _refused(limited, _request(rows=2 * MIB // ROW_BYTES))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await limited.redis.xlen(keys.queue("limited", 1)) == 0


async def test_a_compressed_message_counts_after_decompression(limited: Suite) -> None:
    error = await _refused(limited, _request(rows=2 * MIB // ROW_BYTES), compression=grpc.Compression.Gzip)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await limited.redis.xlen(keys.queue("limited", 1)) == 0


async def test_tensors_over_the_limit_are_refused_before_enqueueing(limited: Suite) -> None:
    over = _request(rows=TENSOR_LIMIT // ROW_BYTES)  # the tensor alone fills the limit; names and shape add
    error = await _refused(limited, over)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (
        f"the request holds {over.ByteSize()} bytes, more than this gateway's limit of {TENSOR_LIMIT} "
        "(max_request_tensor_bytes); split the request"
    )
    assert await limited.redis.xlen(keys.queue("limited", 1)) == 0
    # Under the limit the call is admitted (and, with no worker here, waits out its deadline).
    at_limit = await _refused(limited, _request(rows=TENSOR_LIMIT // ROW_BYTES - 1))
    assert at_limit.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_model_config_reports_the_limits(limited: Suite) -> None:
    config = (await limited.inference.ModelConfig(pb.ModelConfigRequest(name="limited"), timeout=5)).config
    assert config.parameters["max_request_tensor_bytes"].string_value == str(TENSOR_LIMIT)
    assert config.parameters["max_message_bytes"].string_value == str(MIB)
