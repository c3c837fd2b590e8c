"""Call every method of an unmodified tritonclient (sync or aio) once; print the RPC each reached and its code.

Runs in its own process, as triton_probe.py does. The server must serve model "affine" (FP32
input "x" [-1, 4], output "y"). Prints a JSON list of ``[method, rpc, code]``, code "OK" or the
status code name.

Usage: python tests/triton_conformance_probe.py URL sync|aio
"""

from __future__ import annotations

import asyncio
import base64
import faulthandler
import json
import queue
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

MODEL = "affine"
SHM_BYTES = 64


def _inputs(module: Any) -> list[Any]:
    tensor = module.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return [tensor]


def _calls(client: Any, module: Any, key: str) -> list[tuple[str, str, Callable[[], Any]]]:
    """(tritonclient method, RPC, call) for every RPC of the service; the call returns a value or awaitable."""
    region = f"conformance-{key}"
    return [
        ("is_server_live", "ServerLive", lambda: client.is_server_live()),
        ("is_server_ready", "ServerReady", lambda: client.is_server_ready()),
        ("is_model_ready", "ModelReady", lambda: client.is_model_ready(MODEL)),
        ("get_server_metadata", "ServerMetadata", lambda: client.get_server_metadata()),
        ("get_model_metadata", "ModelMetadata", lambda: client.get_model_metadata(MODEL)),
        ("get_model_config", "ModelConfig", lambda: client.get_model_config(MODEL)),
        ("get_inference_statistics", "ModelStatistics", lambda: client.get_inference_statistics(MODEL)),
        ("get_model_repository_index", "RepositoryIndex", lambda: client.get_model_repository_index()),
        ("load_model", "RepositoryModelLoad", lambda: client.load_model(MODEL)),
        ("infer", "ModelInfer", lambda: client.infer(MODEL, _inputs(module))),
        ("register_system_shared_memory", "SystemSharedMemoryRegister",
         lambda: client.register_system_shared_memory(region, f"/{region}", SHM_BYTES)),
        ("get_system_shared_memory_status", "SystemSharedMemoryStatus",
         lambda: client.get_system_shared_memory_status()),
        ("unregister_system_shared_memory", "SystemSharedMemoryUnregister",
         lambda: client.unregister_system_shared_memory(region)),
        ("register_cuda_shared_memory", "CudaSharedMemoryRegister",
         lambda: client.register_cuda_shared_memory(region, base64.b64encode(b"handle"), 0, SHM_BYTES)),
        ("get_cuda_shared_memory_status", "CudaSharedMemoryStatus", lambda: client.get_cuda_shared_memory_status()),
        ("unregister_cuda_shared_memory", "CudaSharedMemoryUnregister",
         lambda: client.unregister_cuda_shared_memory(region)),
        ("update_trace_settings", "TraceSetting", lambda: client.update_trace_settings(settings={"trace_rate": "1"})),
        ("get_trace_settings", "TraceSetting", lambda: client.get_trace_settings()),
        ("update_log_settings", "LogSettings", lambda: client.update_log_settings(settings={"log_info": True})),
        ("get_log_settings", "LogSettings", lambda: client.get_log_settings()),
        ("unload_model", "RepositoryModelUnload", lambda: client.unload_model(MODEL)),
    ]  # fmt: skip


def _code(error: InferenceServerException | None) -> str:
    if error is None:
        return "OK"
    status = str(error.status() or "")
    return status.removeprefix("StatusCode.") or f"NO_STATUS: {error.message()}"


def run_sync(url: str, key: str) -> list[list[str]]:
    client = grpcclient.InferenceServerClient(url)
    results = []
    for method, rpc, call in _calls(client, grpcclient, key):
        try:
            call()
            results.append([method, rpc, "OK"])
        except InferenceServerException as exc:
            results.append([method, rpc, _code(exc)])
    done: queue.Queue[InferenceServerException | None] = queue.Queue()
    client.load_model(MODEL)
    client.async_infer(MODEL, _inputs(grpcclient), callback=lambda result, error: done.put(error))
    results.append(["async_infer", "ModelInfer", _code(done.get(timeout=120))])
    client.start_stream(callback=lambda result, error: done.put(error))
    client.async_stream_infer(MODEL, _inputs(grpcclient))
    results.append(["start_stream + async_stream_infer", "ModelStreamInfer", _code(done.get(timeout=120))])
    client.stop_stream()
    client.close()
    return results


async def run_aio(url: str, key: str) -> list[list[str]]:
    results = []
    async with aioclient.InferenceServerClient(url) as client:
        for method, rpc, call in _calls(client, aioclient, key):
            try:
                await call()
                results.append([method, rpc, "OK"])
            except InferenceServerException as exc:
                results.append([method, rpc, _code(exc)])
        await client.load_model(MODEL)

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": MODEL, "inputs": _inputs(aioclient)}

        async for _result, error in client.stream_infer(one_request()):
            results.append(["stream_infer", "ModelStreamInfer", _code(error)])
            break
    return results


def main() -> None:
    faulthandler.dump_traceback_later(90, exit=True)  # a hang shows where it is
    url, mode = sys.argv[1:3]
    key = uuid.uuid4().hex[:8]
    region = shm.create_shared_memory_region(f"conformance-{key}", f"/conformance-{key}", SHM_BYTES)
    try:
        results = run_sync(url, key) if mode == "sync" else asyncio.run(run_aio(url, key))
    finally:
        shm.destroy_shared_memory_region(region)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
