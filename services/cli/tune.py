"""``maas tune NAME``: measure a deployed model at a few deployment settings and recommend one.

The measuring is ``services.client.tuning``; this module parses the grid, prints the table (or
JSON) and turns Ctrl-C into a stop request, so the original deployment is put back before exit.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from services.client import MaasClient, tuning
from services.client.tuning import TuneReport, TuneResult

ClientFactory = Callable[[], AbstractContextManager[MaasClient]]

_STOPPED_EXIT_CODE = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def _ints(text: str | None, option: str) -> list[int]:
    """``1,8,32`` -> [1, 8, 32]."""
    if text is None:
        return []
    items = [item.strip() for item in text.split(",")]
    if not all(item.isascii() and item.isdigit() for item in items):
        raise typer.BadParameter(f"expected whole numbers separated by commas, got '{text}'", param_hint=option)
    return [int(item) for item in items]


def _names(text: str | None) -> list[str]:
    if text is None:
        return []
    names = [item.strip() for item in text.split(",")]
    if not all(names):
        raise typer.BadParameter(f"expected pool names separated by commas, got '{text}'", param_hint="--pool")
    return names


@contextmanager
def _stop_on_ctrl_c() -> Iterator[threading.Event]:
    """Turn SIGINT into an event the tuning polls, so it can put the original deployment back first."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _result_json(result: TuneResult) -> dict[str, Any]:
    s = result.setting
    return {
        "max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms, "pool": s.pool, "workers": result.workers,
        "calls": result.calls, "errors": result.errors, "seconds": round(result.seconds, 3),
        "rps": round(result.rps, 1), "p50_ms": round(result.p50_ms, 3), "p99_ms": round(result.p99_ms, 3),
        "skipped": result.skipped,
    }  # fmt: skip


def report_json(report: TuneReport) -> dict[str, Any]:
    """Return the report as JSON-ready data (``--json``)."""
    o = report.original
    return {
        "model": report.model,
        "p99_budget_ms": report.p99_budget_ms,
        "pool_workers": None if report.pool_workers is None else dict(report.pool_workers),
        "results": [_result_json(r) for r in report.results],
        "recommended": None if report.recommended is None else _result_json(report.recommended),
        "applied": report.is_applied,
        "stopped": report.is_stopped,
        "original": {"max_batch_size": o.max_batch_size, "max_wait_ms": o.max_wait_ms, "pool": o.pool},
    }


def _table(report: TuneReport) -> Table:
    # NOTE: narrow enough for 80 columns (rich's width when the output is not a terminal).
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for header in ("batch", "wait ms", "pool", "workers", "rps", "p50 ms", "p99 ms", "errors"):
        table.add_column(header, no_wrap=True, justify="left" if header == "pool" else "right", min_width=len(header))
    table.add_column("note", no_wrap=True, min_width=8)
    for r in report.results:
        s = r.setting
        note = "skipped" if r.skipped else "best" if r is report.recommended else ""
        if not r.skipped and r.p99_ms > report.p99_budget_ms:
            note = "over p99"
        workers = "?" if r.workers is None else str(r.workers)
        table.add_row(
            str(s.max_batch_size), str(s.max_wait_ms), s.pool, workers, f"{r.rps:.1f}", f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}", str(r.errors), note,
        )  # fmt: skip
    return table


def _print_report(out: Console, report: TuneReport) -> None:
    if report.pool_workers is None:
        out.print("live workers by pool: unknown (needs a key with the admin scope)")
    else:
        pools = {r.setting.pool for r in report.results} | set(report.pool_workers)
        counts = ", ".join(f"{pool}={report.pool_workers.get(pool, 0)}" for pool in sorted(pools))
        out.print(f"live workers by pool: {counts} (MaaS starts none: scale a pool's workers to change its count)")
    out.print(_table(report))
    for r in report.results:
        if r.skipped:
            out.print(f"skipped {r.setting.describe()}: {r.skipped}", highlight=False)
    best, budget = report.recommended, report.p99_budget_ms
    if best is None:
        out.print(f"no setting had p99 <= {budget:g} ms without errors")
    else:
        out.print(
            f"recommended: {best.setting.describe()} ({best.rps:.1f} rps, p99 {best.p99_ms:.2f} ms <= {budget:g} ms)"
        )
    o = report.original
    if report.is_applied:
        out.print(f"applied: '{report.model}' now deployed with {best.setting.describe() if best else '-'}")
    else:
        kept = f"batch {o.max_batch_size}, wait {o.max_wait_ms} ms, pool {o.pool}"
        hint = "; --apply deploys the recommendation" if best is not None else ""
        out.print(f"restored the original deployment ({kept}){hint}")


def tune_command(
    client: ClientFactory,
    out: Console,
    err: Console,
    name: str,
    grid_text: tuple[str | None, str | None, str | None],
    *,
    p99_ms: float,
    options: tuning.TuneOptions,
    sample: Path | None,
    apply: bool,
    as_json: bool,
) -> None:
    """Run ``maas tune`` (typer parses the options in ``register``)."""
    batches, waits = _ints(grid_text[0], "--max-batch-size"), _ints(grid_text[1], "--max-wait-ms")
    pools = _names(grid_text[2])
    progress = (lambda r: None) if as_json else (lambda r: err.print(_progress_line(r), highlight=False))
    with client() as maas, _stop_on_ctrl_c() as stop:
        current = maas.get_model(name).deployment
        grid = tuning.settings_grid(current, batches, waits, pools) if current is not None else []
        inputs = None if sample is None else tuning.sample_inputs(sample, maas.model_metadata(name))
        report = maas.tune(
            name, grid, p99_budget_ms=p99_ms, inputs=inputs, options=options, apply=apply,
            is_stopped=stop.is_set, on_result=progress,
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report_json(report)))
    else:
        _print_report(out, report)
    if report.is_stopped:
        err.print("stopped (Ctrl-C); the original deployment was put back")
        raise typer.Exit(_STOPPED_EXIT_CODE)


def _progress_line(result: TuneResult) -> str:
    if result.skipped:
        return f"{result.setting.describe()}: skipped, {result.skipped}"
    return f"{result.setting.describe()}: {result.rps:.1f} rps, p99 {result.p99_ms:.2f} ms, {result.errors} errors"


def register(app: typer.Typer, client: ClientFactory, out: Console, err: Console) -> None:
    """Add ``maas tune`` to ``app``; ``client`` yields the CLI's configured client."""

    @app.command("tune")
    def tune(
        name: Annotated[str, typer.Argument(help="A deployed model.")],
        p99_ms: Annotated[float, typer.Option("--p99-ms", min=0.001, help="Latency budget: p99 in ms.")],
        max_batch_size: Annotated[
            str | None, typer.Option(help="Largest batches to try, e.g. 1,8,32 (default: the current one).")
        ] = None,
        max_wait_ms: Annotated[str | None, typer.Option(help="Batch fill waits to try in ms, e.g. 0,2.")] = None,
        pool: Annotated[
            str | None, typer.Option(help="Worker pools to try, e.g. cpu,gpu (default: the current).")
        ] = None,
        seconds: Annotated[float, typer.Option(min=0.1, help="Seconds of load per setting.")] = tuning.DEFAULT_SECONDS,
        concurrency: Annotated[int, typer.Option(min=1, help="Callers, each sending one call after the other.")] = (
            tuning.DEFAULT_CONCURRENCY
        ),
        warmup: Annotated[float, typer.Option(min=0.0, help="Seconds of warm-up calls per setting (not counted).")] = (
            tuning.DEFAULT_WARMUP_S
        ),
        ready_timeout: Annotated[
            float, typer.Option(min=0.1, help="Seconds to wait for a worker of the pool to serve a setting.")
        ] = tuning.DEFAULT_READY_TIMEOUT_S,
        sample: Annotated[
            Path | None, typer.Option(dir_okay=False, help="Inputs to send: .npz (one array per input) or .npy.")
        ] = None,
        apply: Annotated[bool, typer.Option("--apply", help="Deploy the recommendation at the end.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False,
    ) -> None:
        """Measure a deployed model under load at each setting and recommend the fastest within --p99-ms.

        Each setting is deployed in turn (the traffic split kept); the original deployment is put
        back at the end, even after an error or Ctrl-C, unless --apply deploys the recommendation.
        Calls go through the gateway: random inputs matching the signature, or --sample.
        """
        options = tuning.TuneOptions(
            seconds=seconds, concurrency=concurrency, warmup_s=warmup, ready_timeout_s=ready_timeout
        )
        tune_command(
            client, out, err, name, (max_batch_size, max_wait_ms, pool), p99_ms=p99_ms, options=options,
            sample=sample, apply=apply, as_json=as_json,
        )  # fmt: skip
