"""The "Python floor": the least a Python KServe v2 gRPC server can do per request.

A bare ``grpc.aio`` server that implements ``inference.GRPCInferenceService/ModelInfer`` only:
``np.frombuffer`` on ``raw_input_contents``, ONNX Runtime run inline in the handler (no executor,
no batching, no queue, no interceptors, no logging), ``raw_output_contents`` back. Every other RPC
answers UNIMPLEMENTED (the generated base class).

Usage: python -m bench.floor --model PATH [--name NAME] [--host 127.0.0.1] [--port 0] [--ready-file PATH]

Prints ``{"port": N}`` on stdout once serving (and writes it to ``--ready-file`` if given).
SIGINT or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc

_DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(t): name for name, t in _DTYPES.items()}


class FloorServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer on one ONNX Runtime session, run inline on the event loop."""

    def __init__(self, name: str, session: ort.InferenceSession) -> None:
        self._name = name
        self._session = session
        self._outputs = [o.name for o in session.get_outputs()]

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """Decode raw inputs, run the model, return raw outputs."""
        if request.model_name != self._name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
        feeds = {
            spec.name: np.frombuffer(raw, dtype=_DTYPES[spec.datatype]).reshape(spec.shape)
            for spec, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        results = self._session.run(self._outputs, feeds)
        response = pb.ModelInferResponse(model_name=self._name, id=request.id)
        for name, array in zip(self._outputs, results, strict=True):
            response.outputs.add(name=name, datatype=_NAMES[array.dtype], shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


async def serve(model: Path, name: str, host: str, port: int, ready_file: Path | None) -> None:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    server = grpc.aio.server()
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(name, session), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    line = json.dumps({"port": bound})
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(line)
        tmp.replace(ready_file)
    print(line, flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="The .onnx file.")
    parser.add_argument("--name", default="", help="Model name clients call (default: the file's stem).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port.")
    parser.add_argument("--ready-file", type=Path, default=None, help='Where to write {"port": N} once serving.')
    args = parser.parse_args()
    asyncio.run(serve(args.model, args.name or args.model.stem, args.host, args.port, args.ready_file))


if __name__ == "__main__":
    main()
