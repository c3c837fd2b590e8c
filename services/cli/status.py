"""Tables of the cluster status for ``maas status`` and ``maas top`` (and its JSON form)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from services.common.metadata import DeploymentRecord
from services.common.stats import LATENCY_BUCKETS_MS
from services.common.status import ClusterStatus, QueueStatus, WorkerStatus

PIPE_WIDTH = 132
"""Columns of the tables when the output is not a terminal (a pipe or a file: no wrapping)."""


def print_view(console: Console, status: ClusterStatus) -> None:
    """Print ``render(status)`` on ``console``, ``PIPE_WIDTH`` wide unless it is a terminal."""
    if not console.is_terminal:  # NOTE: print(width=) cannot exceed the console's width: a wider one
        console = Console(file=console.file, width=max(console.width, PIPE_WIDTH))
    console.print(render(status))


def render(status: ClusterStatus) -> Group:
    """Return the workers table and the queues table, under a line with the time they were read."""
    read_at = time.strftime("%H:%M:%S", time.localtime(status.time_ms / 1000))
    header = Text(f"cluster at {read_at}: {len(status.workers)} live worker(s), {len(status.queues)} model version(s)")
    return Group(header, workers_table(status.workers), queues_table(status.queues))


def workers_table(workers: tuple[WorkerStatus, ...]) -> Table:
    """One row per live worker: pool, device (providers), loaded models, entries in flight, generations.

    ``generations``: running / at most, for a worker that serves a generative model ("-" otherwise).
    """
    table = Table(
        "worker", "pool", "host", "device", "models", "in flight", "generations", "beat", title="workers",
        box=box.SIMPLE_HEAD, pad_edge=False,
    )  # fmt: skip
    for worker in workers:
        table.add_row(
            worker.worker_id,
            worker.pool,
            worker.host,
            _device(worker.providers),
            _models_cell(worker),
            str(worker.in_flight),
            f"{worker.generations}/{worker.max_generations}" if worker.max_generations else "-",
            f"{worker.heartbeat_age_ms / 1000:.1f}s ago",
        )
    if not workers:
        table.add_row("[red]none[/]", "", "", "", "", "", "", "")
    return table


def queues_table(queues: tuple[QueueStatus, ...]) -> Table:
    """One row per deployed model version: its state, queue and calls over the last minute."""
    table = Table(title="queues (calls: last minute, at the gateways)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", no_wrap=True)
    table.add_column("pool")
    table.add_column("state", no_wrap=True)
    for name in ("workers", "queued", "pending", "oldest", "calls/s", "err/s", "p50 ms", "p99 ms"):
        table.add_column(name, justify="right")
    for queue in queues:
        calls = queue.calls
        table.add_row(
            f"{queue.model}:{queue.version}",
            queue.pool,
            "serving" if queue.workers else f"[yellow]{queue.state}[/]",
            str(queue.workers),
            str(queue.length),
            str(queue.pending),
            f"{queue.oldest_age_ms / 1000:.1f}s" if queue.length else "-",
            f"{calls.calls_per_s:.2f}",
            f"{calls.errors_per_s:.2f}",
            _latency(calls.p50_ms),
            _latency(calls.p99_ms),
        )
    if not queues:
        table.add_row("(nothing deployed)", *[""] * 10)
    return table


def serving_text(deployment: DeploymentRecord, *, is_generative: bool) -> str:
    """How a deployment's calls run: ``generative`` (one generation per call, token by token) or its batching.

    A worker runs up to its ``max_generations`` setting (MAAS_INFERENCE_MAX_GENERATIONS) at once:
    the workers table shows it (``generations``).
    """
    if is_generative:
        return "generative"
    return f"max batch {deployment.max_batch_size}, wait {deployment.max_wait_ms} ms"


def to_json(status: ClusterStatus) -> dict[str, Any]:
    """Return ``status`` as JSON-safe data: each queue with its ``state``; a p99 past the histogram is null."""
    return {
        "time_ms": status.time_ms,
        "workers": [asdict(worker) for worker in status.workers],
        "queues": [_finite(asdict(queue)) | {"state": queue.state} for queue in status.queues],
    }


def _finite(data: dict[str, Any]) -> dict[str, Any]:
    return {
        key: _finite(value) if isinstance(value, dict) else None if value == math.inf else value
        for key, value in data.items()
    }


def _models_cell(worker: WorkerStatus) -> str:
    """The loaded models, then a red line per version the worker did not load, with why (markup escaped)."""
    refused = (f"[red]not loaded {escape(error)}[/]" for error in worker.load_errors)
    return "\n".join([", ".join(worker.models) or "-", *refused])


def _device(providers: tuple[str, ...]) -> str:
    """Providers without their ``ExecutionProvider`` suffix (``CUDA, CPU``); ``-`` when none is loaded."""
    return ", ".join(name.removesuffix("ExecutionProvider") for name in providers) or "-"


def _latency(ms: float) -> str:
    """A bucket bound: ``<=5``; past the last bound ``>60000``; ``-`` without calls."""
    if not ms:
        return "-"
    if ms == math.inf:
        return f">{LATENCY_BUCKETS_MS[-1]}"
    return f"<={ms:g}"
