"""Side by side: two ``maas up`` stacks (two source trees, or two sets of settings), loads in pairs.

Usage: python -m bench.ab [--a-tree PATH] [--b-tree PATH] [--a-env K=V ...] [--b-env K=V ...]
       [--models tiny] [--deployed tiny,heavy] [--concurrency 32,1] [--rounds 8] [--seconds 3]

On a shared machine whose speed moves from minute to minute, two runs of ``make bench`` cannot
show a 5-10 % change: this can. Both stacks run at once (idle while the other is measured); each
round measures A and B back to back at each client count, in alternating order, and a change is
read as the median of the pairs' own ratios (B / A), with their range. Another tree is a checkout
with its generated protos (``git worktree add DIR REF``, then ``make protos`` or grpc_tools there);
its services run from it, the load clients from this one.

Prints one line per pair, then one summary line per client count: each side's req/s, p50, CPU
per call (gateway, workers and Redis) and mean executed batch, then B / A.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import models as bench_models
from bench.suite import REPO, MaasUp, cpu_seconds, probe
from bench.throughput import cpu_per_call, mean_batch, run_load


@dataclass(frozen=True)
class Pair:
    """One round's A and B at one client count."""

    clients: int
    rps: tuple[float, float]
    p50_ms: tuple[float, float]
    cpu_us: tuple[float, float]
    """MaaS's CPU per call (gateway, workers and Redis together)."""
    errors: int
    batch: tuple[float, float] = (math.nan, math.nan)
    """The mean executed batch size (NaN when the workers' metrics could not be read)."""


def _ratio(values: tuple[float, float]) -> float:
    return values[1] / values[0] if values[0] else float("nan")


def summary(pairs: Sequence[Pair]) -> str:
    """One client count's pairs: medians of A and B, and the median and range of the pairs' B / A."""
    rps = [_ratio(p.rps) for p in pairs]
    p50 = [_ratio(p.p50_ms) for p in pairs]

    def median(index: int, field: str) -> float:
        known = [value for p in pairs if not math.isnan(value := getattr(p, field)[index])]
        return statistics.median(known) if known else math.nan

    side_a = f"A {median(0, 'rps'):,.0f} req/s p50 {median(0, 'p50_ms'):.2f} ms cpu {median(0, 'cpu_us'):,.0f} us"
    side_b = f"B {median(1, 'rps'):,.0f} req/s p50 {median(1, 'p50_ms'):.2f} ms cpu {median(1, 'cpu_us'):,.0f} us"
    return (
        f"c={pairs[0].clients:>2}: {side_a} batch {median(0, 'batch'):.1f} | {side_b} batch {median(1, 'batch'):.1f} "
        f"| B/A req/s {statistics.median(rps):.3f} [{min(rps):.2f}-{max(rps):.2f}] "
        f"p50 {statistics.median(p50):.3f} [{min(p50):.2f}-{max(p50):.2f}] ({len(pairs)} pairs, "
        f"{sum(p.errors for p in pairs)} errors)"
    )


def _env(items: Sequence[str]) -> dict[str, str]:
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (_k, eq, _v) in zip(items, pairs, strict=True) if not eq]
    if bad:
        raise SystemExit(f"--a-env/--b-env take NAME=VALUE, got {bad}")
    return {name: value for name, _eq, value in pairs}


def _measure(
    maas: MaasUp, model: bench_models.BenchModel, clients: int, seconds: float
) -> tuple[float, float, float, int, float]:
    pids = maas.pids()
    before, batches = cpu_seconds(pids), maas.batch_totals(model.name)
    result = run_load(maas.gateway, model, clients, seconds)
    cpu = sum(cpu_per_call(before, cpu_seconds(pids), result).values())
    p50 = result.get("p50_ms")
    batch = mean_batch(maas, model.name, batches)
    return (
        float(str(result["rps"])),
        float(str(p50)) if p50 is not None else math.nan,
        cpu,
        int(str(result["errors"])),
        math.nan if batch is None else batch,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--a-tree", type=Path, default=REPO)
    parser.add_argument("--b-tree", type=Path, default=REPO)
    parser.add_argument("--a-env", nargs="*", default=[], help="MAAS_* settings of stack A, NAME=VALUE.")
    parser.add_argument("--b-env", nargs="*", default=[], help="MAAS_* settings of stack B, NAME=VALUE.")
    parser.add_argument("--models", default="tiny", help="Models loaded by the clients.")
    parser.add_argument("--deployed", default="", help="Models deployed (default: --models); e.g. tiny,heavy.")
    parser.add_argument("--concurrency", default="32,1")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    built = {m.name: m for m in bench_models.build(sorted({*names, *args.deployed.split(",")} - {""}), 2048)}
    counts = [int(c) for c in args.concurrency.split(",") if c]
    stacks = {"A": (args.a_tree.resolve(), _env(args.a_env)), "B": (args.b_tree.resolve(), _env(args.b_env))}
    with tempfile.TemporaryDirectory(prefix="maas-ab-") as tmp, ExitStack() as stack:
        ups = {}
        for label, (tree, env) in stacks.items():
            work = Path(tmp) / label
            work.mkdir()
            ups[label] = up = stack.enter_context(MaasUp(work, 1, 0.01, env, repo=tree))
            for model in built.values():
                path = work / f"{model.name}.onnx"
                path.write_bytes(model.data)
                up.push(path, model.name)
                probe(up.gateway, model.name, model.width)
            print(f"stack {label}: {tree} {env or ''}", file=sys.stderr, flush=True)
        results: dict[tuple[str, int], list[Pair]] = {}
        for round_index in range(args.rounds):
            order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
            for name in names:
                for clients in counts:
                    got = {label: _measure(ups[label], built[name], clients, args.seconds) for label in order}
                    a, b = got["A"], got["B"]
                    pair = Pair(clients, (a[0], b[0]), (a[1], b[1]), (a[2], b[2]), a[3] + b[3], (a[4], b[4]))
                    results.setdefault((name, clients), []).append(pair)
                    print(f"round {round_index + 1} {name} {summary([pair])}", flush=True)
        for (name, _clients), pairs in results.items():
            print(f"{name} {summary(pairs)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
