"""Closed-loop load generator: N clients, each with one batch-1 request in flight (tritonclient, gRPC aio).

Usage: python -m bench.load --url HOST:PORT --model NAME --width 16 --concurrency 8 --seconds 5

The benchmark runs one of these processes per measurement, whatever the server, so every system
is measured by the same client. All clients run a warm-up first (``--warmup``, 0.5 s), then the
measured window. Every exception counts as an error (warm-up included) and never stops a client.
Prints one JSON object: requests, warmup_requests, errors, seconds, rps, p50_ms, p99_ms, first_error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as grpcclient

_ERROR_PAUSE_S = 0.01
"""After an error a client pauses briefly, so a refused connection does not spin the CPU."""


@dataclass
class Stats:
    """What the clients observed."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def error(self, exc: BaseException) -> None:
        """Count an error, keeping the first message."""
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"[:500]


@dataclass(frozen=True)
class Load:
    """One measurement's parameters."""

    url: str
    model: str
    width: int
    concurrency: int
    seconds: float
    warmup: float
    timeout: float


async def _client(
    client: grpcclient.InferenceServerClient, load: Load, inputs: list[grpcclient.InferInput], end: float, stats: Stats
) -> None:
    while time.perf_counter() < end:
        started = time.perf_counter()
        try:
            await client.infer(load.model, inputs, client_timeout=load.timeout)
        except Exception as exc:
            stats.error(exc)
            await asyncio.sleep(_ERROR_PAUSE_S)
            continue
        stats.latencies.append(time.perf_counter() - started)


async def _phase(
    client: grpcclient.InferenceServerClient, load: Load, inputs: list[grpcclient.InferInput], seconds: float
) -> tuple[Stats, float]:
    stats = Stats()
    started = time.perf_counter()
    end = started + seconds
    await asyncio.gather(*(_client(client, load, inputs, end, stats) for _ in range(load.concurrency)))
    return stats, time.perf_counter() - started


async def run(load: Load) -> dict[str, object]:
    """Warm up, measure, and summarise."""
    x = grpcclient.InferInput("x", [1, load.width], "FP32")
    x.set_data_from_numpy(np.ones((1, load.width), np.float32))
    client = grpcclient.InferenceServerClient(load.url)
    try:
        warm, _ = await _phase(client, load, [x], load.warmup)
        stats, elapsed = await _phase(client, load, [x], load.seconds)
    finally:
        await client.close()
    ms = np.array(stats.latencies) * 1000
    return {
        "requests": len(stats.latencies),
        "warmup_requests": len(warm.latencies),
        "errors": stats.errors + warm.errors,
        "seconds": elapsed,
        "rps": len(stats.latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "first_error": warm.first_error or stats.first_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="host:port of a KServe v2 gRPC server.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--width", type=int, required=True, help="Each request is FP32 [1, width] named x.")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=30.0, help="client_timeout of each call, in seconds.")
    args = parser.parse_args()
    load = Load(args.url, args.model, args.width, args.concurrency, args.seconds, args.warmup, args.timeout)
    print(json.dumps(asyncio.run(run(load))), flush=True)


if __name__ == "__main__":
    main()
