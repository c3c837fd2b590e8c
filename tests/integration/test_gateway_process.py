"""A real gateway process drains on SIGTERM: every call in flight gets its reply."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.suite import Suite, start_gateway_process
from tests.models import slow_model

pytestmark = pytest.mark.integration

SIZE = 1024


def _slow_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[SIZE, SIZE])
    request.raw_input_contents.append(np.full((SIZE, SIZE), 0.001, np.float32).tobytes())
    return request


@pytest.mark.timeout(120)
async def test_sigterm_lets_every_in_flight_call_finish(suite: Suite, tmp_path: Path) -> None:
    await suite.push("slow", slow_model(size=SIZE, steps=20), max_batch_size=1, max_wait_ms=0)
    process, address = await start_gateway_process(
        suite, tmp_path / "gateway.json", drain_delay_s="1", shutdown_grace_s="30"
    )
    try:
        async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [asyncio.ensure_future(stub.ModelInfer(_slow_request(), timeout=60)) for _ in range(6)]
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            # Endpoints are removed concurrently with SIGTERM: a call arriving now is still served.
            calls.append(asyncio.ensure_future(stub.ModelInfer(_slow_request(), timeout=60)))
            responses = await asyncio.gather(*calls)
        assert [r.outputs[0].name for r in responses] == ["y"] * 7
        async with asyncio.timeout(60):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
