"""Throughput and latency of MaaS (`maas up`, real processes) against raw ONNX Runtime.

Usage: python -m bench.throughput [--seconds 5] [--concurrency 1,8,32] [--workers 1]

Prints one row per scenario with the ratio of MaaS's throughput to raw ONNX Runtime's, both
measured in this run on this machine (a batch-1 ``InferenceSession.run`` loop in one thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc

WIDTH = 256


def mlp_model(width: int = WIDTH) -> bytes:
    """Two dense layers with ReLU on FP32 [-1, width]: small, but real compute."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((width, width), dtype=np.float32) / 16 for _ in range(2))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    model = helper.make_model(
        helper.make_graph(nodes, "mlp", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def raw_ort(model: bytes, seconds: float) -> float:
    """Batch-1 requests per second of a plain InferenceSession loop."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.ones((1, WIDTH), np.float32)
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        session.run(None, {"x": x})
        count += 1
    return count / seconds


def start_suite(data_dir: Path, workers: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """Run `maas up` and return it with its endpoints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--workers", str(workers), "--gateway-port", "0",
         "--registry-port", "0", "--data-dir", str(data_dir), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    path = data_dir / "run" / "endpoints.json"
    deadline = time.monotonic() + 120
    while not path.exists():
        if up.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("maas up did not start")
        time.sleep(0.2)
    return up, json.loads(path.read_text())


async def _client(stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, end: float, lat: list[float]) -> int:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, WIDTH])
    request.raw_input_contents.append(np.ones((1, WIDTH), np.float32).tobytes())
    count = 0
    while time.perf_counter() < end:
        started = time.perf_counter()
        await stub.ModelInfer(request, timeout=30)
        lat.append(time.perf_counter() - started)
        count += 1
    return count


async def maas_run(gateway: str, concurrency: int, seconds: float) -> tuple[float, float, float]:
    """Return (requests/s, p50 ms, p99 ms) with ``concurrency`` closed-loop clients."""
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await _client(stub, time.perf_counter() + 0.5, [])  # warm-up
        latencies: list[float] = []
        end = time.perf_counter() + seconds
        counts = await asyncio.gather(*(_client(stub, end, latencies) for _ in range(concurrency)))
    quantiles = statistics.quantiles(latencies, n=100)
    return sum(counts) / seconds, quantiles[49] * 1000, quantiles[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    model = mlp_model()
    onnx.checker.check_model(onnx.load_from_string(model))
    raw = raw_ort(model, args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "mlp.onnx"
        model_path.write_bytes(model)
        up, endpoints = start_suite(Path(tmp) / "data", args.workers)
        try:
            env = os.environ | {"MAAS_REGISTRY": endpoints["registry"]}
            subprocess.run(
                [sys.executable, "-m", "services.cli", "models", "push", str(model_path), "--name", "mlp",
                 "--max-batch-size", "32", "--max-wait-ms", "2"],
                env=env, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            print(f"raw ONNX Runtime, batch 1, 1 thread: {raw:,.0f} req/s  (model: MLP {WIDTH}x{WIDTH} x2, CPU)")
            print(f"{'clients':>8} {'MaaS req/s':>12} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8}")
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                rate, p50, p99 = asyncio.run(maas_run(endpoints["gateway"], concurrency, args.seconds))
                print(f"{concurrency:>8} {rate:>12,.0f} {rate / raw:>7.2f} {p50:>8.2f} {p99:>8.2f}")
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(60)


if __name__ == "__main__":
    main()
