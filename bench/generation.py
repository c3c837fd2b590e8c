"""Streamed generation: MaaS against onnxruntime-genai called directly, in one run.

Usage: python -m bench.generation [--tokens 64] [--rounds 3] [--concurrency 1,4,16] [--burn 16]
       [--short] [--json PATH]

The model is tests/genai_model.py's tiny decoder (greedy: the byte after the previous one), made
slower per token with its ``burn`` option (``--burn 16``: about 1 ms a token on one core here), so
that a step costs something, as a real model's does. At each level of concurrent streams it
measures, each stream running ``--rounds`` generations of ``--tokens`` new tokens one after the
other:

1. ``direct``: onnxruntime-genai in this process, one thread and one ``og.Generator`` per
   stream, the tokens decoded to text as they come (what a worker does);
2. ``maas``: ``maas up`` (real processes: gateway, Redis, one worker with ``max_generations`` =
   the most streams measured), streaming through the gateway with the Python client's
   ``generate`` (ModelStreamInfer), all streams in one event loop.

For each: time to first token (p50, p99 over every generation), tokens/s per stream (a
generation's tokens over its duration, first token included; the mean), total tokens/s (every
token over the level's wall time), and the ratios MaaS / direct. Exits non-zero if something fails
to start or a level has no successful generation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from bench.suite import START_TIMEOUT_S, MaasUp, run_main
from services.client import AsyncMaasClient, MaasError
from tests.genai_model import build_genai_model

MODEL = "tiny-gen"
PROMPT = "hello "
"""Greedy decoding continues it with "!", '"', "#", ...: printable ASCII, a character per token (up to 94)."""
SYSTEMS = ("direct", "maas")


@dataclass(frozen=True)
class Options:
    """What to measure."""

    tokens: int
    rounds: int
    concurrency: list[int]
    burn: int
    json_path: Path | None


@dataclass(frozen=True)
class Generation:
    """One generation's timing."""

    first_token_s: float
    duration_s: float
    tokens: int


@dataclass
class Level:
    """What one system did at one concurrency: its generations, failures and wall time."""

    generations: list[Generation] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    wall_s: float = 0.0

    def failed(self, exc: BaseException) -> None:
        """Count a failed generation (keep the first message)."""
        self.errors += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    system: str
    streams: int
    generations: int
    errors: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    stream_tokens_per_s: float | None
    total_tokens_per_s: float
    x_direct_total: float | None = None
    """MaaS total tokens/s over direct's (maas rows only)."""
    x_direct_ttft: float | None = None
    """MaaS p50 time to first token over direct's (maas rows only)."""
    first_error: str = ""

    @classmethod
    def of(cls, system: str, streams: int, level: Level) -> Row:
        """Summarize a level's generations."""
        ttft_ms = np.array([g.first_token_s * 1000 for g in level.generations])
        rates = [g.tokens / g.duration_s for g in level.generations if g.duration_s > 0]
        tokens = sum(g.tokens for g in level.generations)
        return cls(
            system=system, streams=streams, generations=len(level.generations), errors=level.errors,
            ttft_p50_ms=float(np.percentile(ttft_ms, 50)) if len(ttft_ms) else None,
            ttft_p99_ms=float(np.percentile(ttft_ms, 99)) if len(ttft_ms) else None,
            stream_tokens_per_s=float(np.mean(rates)) if rates else None,
            total_tokens_per_s=tokens / level.wall_s if level.wall_s > 0 else 0.0, first_error=level.first_error,
        )  # fmt: skip


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="New tokens per generation (default 64; --short 16).")
    parser.add_argument("--rounds", type=int, default=None, help="Generations per stream (default 3; --short 1).")
    parser.add_argument("--concurrency", default=None, help="Concurrent streams (default 1,4,16; --short 1,4).")
    parser.add_argument("--burn", type=int, default=16, help="Slowing MatMul rows per step (tests/genai_model.py).")
    parser.add_argument("--short", action="store_true", help="CI mode: 16 tokens, 1 round, 1 and 4 streams.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results as JSON here.")
    args = parser.parse_args(argv)
    concurrency = [int(c) for c in (args.concurrency or ("1,4" if args.short else "1,4,16")).split(",") if c.strip()]
    return Options(
        tokens=args.tokens or (16 if args.short else 64),
        rounds=args.rounds or (1 if args.short else 3),
        concurrency=concurrency,
        burn=args.burn,
        json_path=args.json,
    )


def progress(message: str) -> None:
    print(f"[bench-generation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Direct:
    """onnxruntime-genai in this process: one ``og.Model``, a thread and a generator per stream."""

    def __init__(self, bundle: Path) -> None:
        self._model = og.Model(str(bundle))
        self._tokenizer = og.Tokenizer(self._model)
        self._prompt = np.asarray(self._tokenizer.encode(PROMPT), np.int32)

    def generate(self, tokens: int) -> Generation:
        """One greedy generation of ``tokens`` new tokens, decoded to text as they come."""
        started = time.perf_counter()
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(self._prompt) + tokens, do_sample=False)
        generator = og.Generator(self._model, params)
        generator.append_tokens(self._prompt)
        stream = self._tokenizer.create_stream()
        first, count = 0.0, 0
        while not generator.is_done():
            generator.generate_next_token()
            stream.decode(int(generator.get_next_tokens()[0]))
            count += 1
            first = first or time.perf_counter() - started
        return Generation(first, time.perf_counter() - started, count)

    def measure(self, streams: int, opts: Options) -> Level:
        """``streams`` threads, each running ``opts.rounds`` generations."""
        level, lock = Level(), threading.Lock()

        def stream() -> None:
            for _ in range(opts.rounds):
                try:
                    done = self.generate(opts.tokens)
                except Exception as exc:  # counted: the table shows the first one
                    with lock:
                        level.failed(exc)
                    continue
                with lock:
                    level.generations.append(done)

        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            for future in [pool.submit(stream) for _ in range(streams)]:
                future.result()
        level.wall_s = time.perf_counter() - started
        return level


async def _maas_generation(client: AsyncMaasClient, tokens: int) -> Generation:
    started = time.perf_counter()
    first, count = 0.0, 0
    async for _piece in client.generate(MODEL, PROMPT, max_new_tokens=tokens):
        count += 1  # a piece per token (no empty final piece is asked for)
        first = first or time.perf_counter() - started
    return Generation(first, time.perf_counter() - started, count)


async def measure_maas(gateway: str, registry: str, streams: int, opts: Options) -> Level:
    """``streams`` concurrent streams through the gateway, each running ``opts.rounds`` generations."""
    level = Level()
    async with AsyncMaasClient(gateway, registry, timeout_s=120) as client:

        async def stream() -> None:
            for _ in range(opts.rounds):
                try:
                    level.generations.append(await _maas_generation(client, opts.tokens))
                except MaasError as exc:
                    level.failed(exc)

        started = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(streams)))
        level.wall_s = time.perf_counter() - started
    return level


async def wait_served(gateway: str, registry: str) -> None:
    """Generate one token until a call succeeds (the worker has loaded the model).

    Raises:
        RuntimeError: No call succeeded within START_TIMEOUT_S.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    async with AsyncMaasClient(gateway, registry, timeout_s=10) as client:
        while True:
            try:
                await client.generate_text(MODEL, PROMPT, max_new_tokens=1)
                return
            except MaasError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{gateway} does not serve '{MODEL}': {exc}") from None
                await asyncio.sleep(0.2)


def _levels(system: str, opts: Options, measure: Callable[[int], Level]) -> list[Row]:
    rows = []
    for streams in opts.concurrency:
        row = Row.of(system, streams, measure(streams))
        progress(f"{system} streams={streams}: {row.total_tokens_per_s:,.0f} tokens/s, {row.errors} error(s)")
        rows.append(row)
    return rows


def with_ratios(rows: list[Row]) -> list[Row]:
    """Add to each maas row its ratios to the direct row of the same concurrency."""
    direct = {row.streams: row for row in rows if row.system == "direct"}
    out = []
    for row in rows:
        base = direct.get(row.streams)
        if row.system == "maas" and base is not None:
            total = row.total_tokens_per_s / base.total_tokens_per_s if base.total_tokens_per_s else None
            ttft = row.ttft_p50_ms / base.ttft_p50_ms if row.ttft_p50_ms and base.ttft_p50_ms else None
            row = Row(**{**asdict(row), "x_direct_total": total, "x_direct_ttft": ttft})
        out.append(row)
    return out


def run(opts: Options) -> list[Row]:
    """Build the model, measure it directly, then through ``maas up``."""
    with tempfile.TemporaryDirectory(prefix="maas-bench-gen-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        bundle = build_genai_model(work / MODEL, burn=opts.burn)
        progress(f"direct onnxruntime-genai (burn {opts.burn})")
        direct = Direct(bundle)
        direct.generate(opts.tokens)  # warm-up
        rows = _levels("direct", opts, lambda streams: direct.measure(streams, opts))
        progress("starting maas up (1 worker)")
        env = {"MAAS_INFERENCE_MAX_GENERATIONS": str(max(opts.concurrency))}
        maas = stack.enter_context(MaasUp(work, workers=1, access_log_sample=0.01, env=env))
        maas.push(bundle, MODEL)
        registry = str(maas.endpoints["registry"])
        asyncio.run(wait_served(maas.gateway, registry))

        def measure(streams: int) -> Level:
            maas.check_alive()
            return asyncio.run(measure_maas(maas.gateway, registry, streams, opts))

        rows += _levels("maas", opts, measure)
        progress("stopping")
    return with_ratios(rows)


_COLUMNS = (
    ("streams", ">7"), ("system", "<6"), ("gens", ">5"), ("errors", ">6"), ("TTFT p50 ms", ">11"),
    ("TTFT p99 ms", ">11"), ("tok/s/stream", ">12"), ("total tok/s", ">11"), ("x direct tok/s", ">14"),
    ("x direct TTFT", ">13"),
)  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[Row], opts: Options) -> str:
    """The table, under a line saying what was measured."""
    lines = [
        f"generation: tests/genai_model.py decoder, burn {opts.burn}, prompt {PROMPT!r}, {opts.tokens} new tokens "
        f"per generation, {opts.rounds} generation(s) per stream; maas = maas up, 1 worker, Python client streaming",
        "  ".join(format(name, spec) for name, spec in _COLUMNS),
    ]
    for row in sorted(rows, key=lambda r: (r.streams, SYSTEMS.index(r.system))):
        cells = (
            str(row.streams), row.system, str(row.generations), str(row.errors), _fmt(row.ttft_p50_ms, ".2f"),
            _fmt(row.ttft_p99_ms, ".2f"), _fmt(row.stream_tokens_per_s, ",.0f"), _fmt(row.total_tokens_per_s, ",.0f"),
            _fmt(row.x_direct_total, ".2f"), _fmt(row.x_direct_ttft, ".2f"),
        )  # fmt: skip
        lines.append("  ".join(format(cell, spec) for cell, (_, spec) in zip(cells, _COLUMNS, strict=True)))
    lines += [f"{row.system} streams={row.streams}: {row.first_error}" for row in rows if row.first_error]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    config = {"tokens": opts.tokens, "rounds": opts.rounds, "concurrency": opts.concurrency, "burn": opts.burn}
    return run_main(
        lambda: run(opts),
        lambda rows: render(rows, opts),
        lambda rows: {"config": config, "rows": [asdict(row) for row in rows]},
        opts.json_path,
        lambda rows: [f"{row.system} streams={row.streams}" for row in rows if row.generations == 0],
    )


if __name__ == "__main__":
    sys.exit(main())
