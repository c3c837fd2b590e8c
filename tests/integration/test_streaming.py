"""ModelStreamInfer: many requests in flight per stream, errors per request, backpressure, ends."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from services.common.embedded_redis import EmbeddedRedis
from services.gateway.settings import GatewaySettings
from tests.integration.suite import Suite, start_gateway_process
from tests.models import affine_model, slow_model

pytestmark = pytest.mark.integration

PROBE = Path(__file__).parents[1] / "triton_stream_probe.py"
SLOW = 256


def _affine(request_id: str, rows: list[list[float]], model: str = "affine") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[len(rows), len(rows[0])])
    request.raw_input_contents.append(np.array(rows, np.float32).tobytes())
    return request


def _slow(request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[SLOW, SLOW])
    request.raw_input_contents.append(np.full((SLOW, SLOW), 0.001, np.float32).tobytes())
    return request


def _y(response: pb.ModelInferResponse) -> list[list[float]]:
    shape = list(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(shape).tolist()


async def _requests(items: list[pb.ModelInferRequest], pause_s: float = 0) -> AsyncIterator[pb.ModelInferRequest]:
    for item in items:
        yield item
        if pause_s:
            await asyncio.sleep(pause_s)


def _probe(address: str, mode: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(PROBE), address, mode, "affine"],
        input=json.dumps(requests), capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answers: list[dict[str, Any]] = json.loads(done.stdout)
    return answers


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_tritonclient_streams_with_errors_per_request(suite: Suite, mode: str) -> None:
    await suite.push("affine", affine_model())
    requests: list[dict[str, Any]] = [{"id": str(i), "x": [[float(i)] * 4]} for i in range(40)]
    requests[7] = {"id": "7", "x": [[1.0, 2.0, 3.0]]}  # wrong width: an error for this one only
    answers = await asyncio.to_thread(_probe, suite.gateway_address, mode, requests)
    errors = [a for a in answers if "error" in a]
    assert len(errors) == 1
    assert "dimension 1 is 3, expected 4" in errors[0]["error"]
    good = {a["id"]: a["y"] for a in answers if "id" in a}
    assert good == {str(i): [[2.0 * i + 1] * 4] for i in range(40) if i != 7}


async def test_error_answers_carry_id_and_code_and_the_stream_goes_on(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    items = [
        _affine("a", [[1, 2, 3, 4]]),
        _affine("b", [[1, 2, 3, 4]], model="nope"),
        _affine("c", [[1, 2, 3]]),
        _affine("d", [[0, 0, 0, 0], [1, 1, 1, 1]]),
    ]
    answers = [answer async for answer in suite.inference.ModelStreamInfer(_requests(items))]
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["a", "b", "c", "d"]
    assert _y(by_id["a"].infer_response) == [[3, 5, 7, 9]]
    assert _y(by_id["d"].infer_response) == [[1, 1, 1, 1], [3, 3, 3, 3]]
    assert by_id["a"].error_message == by_id["d"].error_message == ""
    assert by_id["b"].error_message == "model 'nope' not found"
    assert by_id["b"].infer_response.parameters["error_code"].string_param == "NOT_FOUND"
    assert by_id["b"].infer_response.model_name == "nope"
    assert "input 'x': dimension 1 is 3, expected 4" in by_id["c"].error_message
    assert by_id["c"].infer_response.parameters["error_code"].string_param == "INVALID_ARGUMENT"


async def test_many_requests_in_flight_and_half_close_ends_cleanly(suite: Suite) -> None:
    await suite.push("affine", affine_model(), max_batch_size=64)
    items = [_affine(str(i), [[float(i)] * 4]) for i in range(300)]
    call = suite.inference.ModelStreamInfer(_requests(items))
    answers = [answer async for answer in call]
    assert await call.code() == grpc.StatusCode.OK
    assert {a.infer_response.id: _y(a.infer_response)[0][0] for a in answers} == {
        str(i): 2.0 * i + 1 for i in range(300)
    }
    assert suite.gateway.replies.in_flight == 0


async def test_backpressure_bounds_requests_in_flight(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    suite = await Suite(redis_server.url, tmp_path, gateway={"max_stream_in_flight": 2}).start()
    try:
        await _two_in_flight(suite)
    finally:
        await suite.stop()


async def _two_in_flight(suite: Suite) -> None:
    await suite.push("slow", slow_model(size=SLOW, steps=8), max_batch_size=1)
    seen: list[int] = []

    async def sample() -> None:
        while True:
            seen.append(suite.gateway.replies.in_flight)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    try:
        answers = [a async for a in suite.inference.ModelStreamInfer(_requests([_slow(str(i)) for i in range(12)]))]
    finally:
        sampler.cancel()
    assert sorted(int(a.infer_response.id) for a in answers) == list(range(12))
    assert all(a.error_message == "" for a in answers)
    assert max(seen) == 2


async def test_half_close_waits_for_requests_in_flight(suite: Suite) -> None:
    await suite.push("slow", slow_model(size=SLOW, steps=8), max_batch_size=1)
    call = suite.inference.ModelStreamInfer()
    for i in range(4):
        await call.write(_slow(str(i)))
    await call.done_writing()
    answers = [a async for a in call]
    assert sorted(a.infer_response.id for a in answers) == ["0", "1", "2", "3"]
    assert await call.code() == grpc.StatusCode.OK


async def test_cancel_and_deadline_end_the_stream_and_free_the_gateway(suite: Suite) -> None:
    await suite.push("slow", slow_model(size=SLOW, steps=8), max_batch_size=1)
    await suite.push("affine", affine_model())
    call = suite.inference.ModelStreamInfer()
    for i in range(6):
        await call.write(_slow(str(i)))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()

    late = suite.inference.ModelStreamInfer(timeout=0.3)
    for i in range(20):
        await late.write(_slow(str(i)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _answer in late:
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async with asyncio.timeout(10):
        while suite.gateway.replies.in_flight or len(suite.gateway.streams._open):
            await asyncio.sleep(0.02)
    answer = await suite.inference.ModelInfer(_affine("after", [[1, 1, 1, 1]]))
    assert _y(answer) == [[3, 3, 3, 3]]


async def test_undecodable_message_ends_the_stream_after_earlier_answers(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    method = "/inference.GRPCInferenceService/ModelStreamInfer"
    raw = suite.channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    good = _affine("ok", [[1, 2, 3, 4]]).SerializeToString()
    call = raw(_requests([good, b"\xff\xff\xff"]))
    answers = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for answer in call:
            answers.append(pb.ModelStreamInferResponse.FromString(answer))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a serialized inference.ModelInferRequest" in str(raised.value.details())
    assert [a.infer_response.id for a in answers] == ["ok"]


@pytest.mark.timeout(120)
async def test_sigterm_answers_what_the_stream_holds_then_ends_unavailable(suite: Suite, tmp_path: Path) -> None:
    await suite.push("slow", slow_model(size=SLOW, steps=24), max_batch_size=1)
    process, address = await start_gateway_process(
        suite, tmp_path / "gateway.json", drain_delay_s="0.5", shutdown_grace_s="30", max_stream_in_flight="8"
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            for i in range(4):
                await call.write(_slow(str(i)))
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            # Endpoints are removed concurrently with SIGTERM: requests sent now are still served.
            for i in range(2):
                await call.write(_slow(f"late-{i}"))
            answers = []
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                while True:
                    answer = await call.read()
                    assert answer is not grpc.aio.EOF
                    answers.append(answer)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in str(raised.value.details())
        assert sorted(a.infer_response.id for a in answers) == ["0", "1", "2", "3", "late-0", "late-1"]
        assert all(a.error_message == "" for a in answers)
        async with asyncio.timeout(60):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_stream_in_flight_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="max_stream_in_flight"):
        GatewaySettings(max_stream_in_flight=0)
