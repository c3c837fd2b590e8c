"""Throughput and latency of MaaS against raw ONNX Runtime and a bare Python gRPC server, in one run.

Usage: python -m bench.throughput [--seconds 3] [--rounds 3] [--concurrency 1,8,32] [--models tiny,heavy]
       [--systems floor,direct,maas] [--workers 1] [--short] [--json PATH]

For each model (tiny: y = 2x + 1 on [-1, 16]; heavy: 4 x Gemm 2048x2048 + Relu) it measures, on
this machine and in this run:

1. raw ONNX Runtime (CPU EP, in-process): a batch-1 ``session.run`` loop, and the best of batch
   sizes 1..64 (inferences per second);
2. ``floor``: a bare grpc.aio KServe v2 server running ORT inline (bench/floor.py), the least a
   Python gRPC server can cost;
3. ``direct``: a MaaS inference worker's own GRPCInferenceService (no gateway, no queue);
4. ``maas``: ``maas up`` (real processes, default log level) through the gateway and the Redis
   queue, deployed with ``maas models push --max-batch-size 32`` and the default batch wait;

each with closed-loop batch-1 clients (``python -m bench.load``, one process per measurement,
the same for every system). The measurements are interleaved in ``--rounds`` rounds (each: raw
ORT, then every system at each client count in turn), and each figure is the median of its
rounds, each ratio the median of the rounds' own ratios: on a shared machine that moves from
minute to minute, the two sides of a ratio are measured a few seconds apart. It prints one
table with the ratios, the rounds' spread and the server processes' CPU time per call
(``/proc``; MaaS's also split by process), then the tracked targets.
Exits non-zero only if something fails to start or a measurement has no successful request.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from bench import models as bench_models
from bench import rawort
from bench.models import BenchModel
from bench.rawort import RawOrt
from bench.report import SYSTEMS, Report, Row, add_ratios, merge_rounds, render
from bench.suite import REPO, Floor, MaasUp, clean_env, cpu_seconds, probe, run_main

_LOAD_SLACK_S = 90.0
"""Time a load process may take beyond its measurement before it is given up as failed."""


@dataclass(frozen=True)
class Options:
    """What to measure."""

    seconds: float
    rounds: int
    concurrency: list[int]
    models: list[str]
    systems: list[str]
    workers: int
    access_log_sample: float
    heavy_width: int
    json_path: Path | None

    @property
    def sweep_seconds(self) -> float:
        """Time per batch size of the raw ORT sweep."""
        return max(0.25, self.seconds / 4)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="Per measurement (default 3; --short: 1).")
    parser.add_argument("--rounds", type=int, default=None, help="Interleaved rounds (default 3; --short: 1).")
    parser.add_argument("--concurrency", default=None, help="Client counts (default 1,8,32; --short: 1,8).")
    parser.add_argument("--models", default="tiny,heavy")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workers", type=int, default=1, help="Inference workers of maas up.")
    parser.add_argument(
        "--access-log-sample", type=float, default=0.01, help="maas up's share of OK calls logged (errors: all)."
    )
    parser.add_argument("--short", action="store_true", help="CI mode: 1 round of 1 s, clients 1,8, heavy 256 wide.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results as JSON here.")
    args = parser.parse_args(argv)
    systems = _csv(args.systems)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {','.join(SYSTEMS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return Options(
        seconds=args.seconds if args.seconds is not None else (1.0 if args.short else 3.0),
        rounds=args.rounds if args.rounds is not None else (1 if args.short else 3),
        concurrency=[int(c) for c in _csv(args.concurrency or ("1,8" if args.short else "1,8,32"))],
        models=_csv(args.models),
        systems=systems,
        workers=args.workers,
        access_log_sample=args.access_log_sample,
        heavy_width=bench_models.SHORT_HEAVY_WIDTH if args.short else bench_models.HEAVY_WIDTH,
        json_path=args.json,
    )


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_load(url: str, model: BenchModel, clients: int, seconds: float) -> dict[str, object]:
    """One measurement by a fresh ``bench.load`` process; a failed process reads as no request."""
    command = [sys.executable, "-m", "bench.load", "--url", url, "--model", model.name, "--width", str(model.width),
               "--concurrency", str(clients), "--seconds", str(seconds)]  # fmt: skip
    try:
        done = subprocess.run(
            command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=seconds + _LOAD_SLACK_S
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            result: dict[str, object] = json.loads(lines[-1])
            return result
        failure = f"load process exited with code {done.returncode}: {done.stderr[-800:]}"
    except subprocess.TimeoutExpired:
        failure = f"load process did not finish within {seconds + _LOAD_SLACK_S:g} s"
    return {"requests": 0, "errors": 1, "rps": 0.0, "p50_ms": None, "p99_ms": None, "first_error": failure}


def _ms(value: object) -> float | None:
    return None if value is None else float(str(value))


def mean_batch(maas: MaasUp | None, name: str, before: tuple[float, float] | None) -> float | None:
    """Mean executed batch size since ``before``, from the workers' histograms (None if unknown)."""
    after = maas.batch_totals(name) if maas is not None else None
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def cpu_per_call(before: dict[str, float], after: dict[str, float], result: dict[str, object]) -> dict[str, float]:
    """Each process's CPU µs per call served (the warm-up's calls and CPU included)."""
    calls = int(str(result["requests"])) + int(str(result.get("warmup_requests", 0)))
    if calls == 0:
        return {}
    return {name: (after[name] - before[name]) / calls * 1e6 for name in after if name in before}


def measure(
    system: str, url: str, model: BenchModel, clients: int, opts: Options, maas: MaasUp | None, pids: dict[str, int]
) -> Row:
    """One system serving one model to ``clients`` clients; ``pids``: its processes on the request path."""
    if maas is not None:
        maas.check_alive()
    before = maas.batch_totals(model.name) if system == "maas" and maas else None
    cpu_before = cpu_seconds(pids)
    result = run_load(url, model, clients, opts.seconds)
    cpu_us = cpu_per_call(cpu_before, cpu_seconds(pids), result)
    batch = 1.0 if system != "maas" else mean_batch(maas, model.name, before)
    row = Row(
        model=model.name, system=system, clients=clients, requests=int(str(result["requests"])),
        errors=int(str(result["errors"])), rps=float(str(result["rps"])), p50_ms=_ms(result["p50_ms"]),
        p99_ms=_ms(result["p99_ms"]), mean_batch=batch, first_error=str(result.get("first_error") or ""),
        cpu_us=cpu_us,
    )  # fmt: skip
    p50 = "-" if row.p50_ms is None else f"{row.p50_ms:.2f}"
    progress(f"{model.name} {system} c={clients}: {row.rps:,.0f} req/s, p50 {p50} ms, {row.errors} error(s)")
    return row


def start_maas(stack: ExitStack, work: Path, paths: dict[str, Path], opts: Options, report: Report) -> MaasUp:
    """``maas up``, push every model, wait until served; records each deployment's max_wait_ms."""
    progress(f"starting maas up ({opts.workers} worker(s))")
    maas = stack.enter_context(MaasUp(work, opts.workers, opts.access_log_sample))
    for name, path in paths.items():
        progress(f"maas models push {name}")
        maas.push(path, name)
    for model in report.models:
        probe(maas.gateway, model.name, model.width)
        report.max_wait_ms[model.name] = maas.max_wait_ms(model.name)
    return maas


def measure_model(
    model: BenchModel, path: Path, work: Path, opts: Options, maas: MaasUp | None
) -> tuple[RawOrt, list[Row]]:
    """Raw ORT and every system on one model, in ``opts.rounds`` interleaved rounds; their medians."""
    with ExitStack() as stack:
        servers: dict[str, tuple[str, dict[str, int]]] = {}
        for system in opts.systems:
            if system == "floor":
                floor = stack.enter_context(Floor(path, model.name, work))
                servers[system] = (floor.url, floor.pids)
            else:
                assert maas is not None
                url = maas.direct_url(model.name) if system == "direct" else maas.gateway
                servers[system] = (url, maas.pids(direct=system == "direct"))
            probe(servers[system][0], model.name, model.width)
        raws: list[RawOrt] = []
        rounds: list[list[Row]] = []
        for number in range(1, opts.rounds + 1):
            progress(f"{model.name}: round {number} of {opts.rounds}, raw ONNX Runtime")
            raws.append(rawort.measure(model, opts.seconds, opts.sweep_seconds))
            rows = [
                measure(system, url, model, clients, opts, maas if system != "floor" else None, pids)
                for clients in opts.concurrency
                for system, (url, pids) in servers.items()
            ]
            add_ratios(rows, {model.name: raws[-1]})
            rounds.append(rows)
    return RawOrt.median(raws), merge_rounds(rounds, opts.systems)


def run(opts: Options) -> Report:
    """Build the models, start the servers, measure every row in rounds."""
    built = bench_models.build(opts.models, opts.heavy_width)
    config: dict[str, object] = {
        "seconds": opts.seconds, "rounds": opts.rounds, "concurrency": opts.concurrency, "systems": opts.systems,
        "workers": opts.workers, "access_log_sample": opts.access_log_sample,
        "cpus": os.cpu_count(), "onnxruntime": ort.__version__,
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
    }  # fmt: skip
    report = Report(config=config, models=built, raw={})
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        paths = {m.name: work / f"{m.name}.onnx" for m in built}
        for model in built:
            paths[model.name].write_bytes(model.data)
        maas = start_maas(stack, work, paths, opts, report) if {"direct", "maas"} & set(opts.systems) else None
        for model in built:
            report.raw[model.name], rows = measure_model(model, paths[model.name], work, opts, maas)
            report.rows += rows
        progress("stopping")
    return report


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    return run_main(
        lambda: run(opts),
        render,
        Report.to_json,
        opts.json_path,
        lambda report: [f"{r.model} {r.system} c={r.clients}" for r in report.rows if r.requests == 0],
    )


if __name__ == "__main__":
    sys.exit(main())
