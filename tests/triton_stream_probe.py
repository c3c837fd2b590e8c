"""Stream requests with an unmodified tritonclient (sync ``start_stream`` or aio ``stream_infer``).

Runs in its own process, as triton_probe.py does. Reads a JSON list of requests on stdin, each
``{"id": ..., "x": [[...]]}`` (FP32 input "x" of model "affine"), prints one JSON answer per
request: ``{"id": ..., "y": [[...]]}`` or ``{"error": message}``.

Usage: python tests/triton_stream_probe.py URL sync|aio MODEL  <  requests.json
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException


def _inputs(module: Any, request: dict[str, Any]) -> list[Any]:
    array = np.array(request["x"], dtype=np.float32)
    tensor = module.InferInput("x", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return [tensor]


def _answer(result: Any, error: InferenceServerException | None) -> dict[str, Any]:
    if error is not None:
        return {"error": error.message()}
    return {"id": result.get_response().id, "y": result.as_numpy("y").tolist()}


def run_sync(url: str, model: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue[dict[str, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(_answer(result, error)))
    for request in requests:
        client.async_stream_infer(model, _inputs(grpcclient, request), request_id=request["id"])
    collected = [answers.get(timeout=60) for _ in requests]
    client.stop_stream()
    client.close()
    return collected


async def run_aio(url: str, model: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async def generate() -> AsyncIterator[dict[str, Any]]:
        for request in requests:
            yield {"model_name": model, "inputs": _inputs(aioclient, request), "request_id": request["id"]}

    collected = []
    async with aioclient.InferenceServerClient(url) as client:
        async for result, error in client.stream_infer(generate()):
            collected.append(_answer(result, error))
            if len(collected) == len(requests):
                break
    return collected


def main() -> None:
    url, mode, model = sys.argv[1:4]
    requests = json.load(sys.stdin)
    answers = run_sync(url, model, requests) if mode == "sync" else asyncio.run(run_aio(url, model, requests))
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
