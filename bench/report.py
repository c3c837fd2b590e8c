"""The benchmark's results: rows, ratios, targets, the printed table and the JSON document."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from bench.models import BenchModel
from bench.rawort import RawOrt
from bench.suite import BATCH_HISTOGRAM

SYSTEMS = {
    "floor": "bare grpc.aio server, ORT inline in the handler (bench/floor.py)",
    "direct": "MaaS inference worker's own GRPCInferenceService (queue-less)",
    "maas": "MaaS through the gateway and the Redis queue (maas up)",
}


@dataclass
class Row:
    """One measurement: a system serving a model to ``clients`` closed-loop clients."""

    model: str
    system: str
    clients: int
    requests: int
    errors: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch: float | None
    first_error: str = ""
    x_raw_batch1: float | None = None
    x_raw_best: float | None = None
    x_floor: float | None = None
    cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU µs per call of each server process on the request path (``/proc``, warm-up included)."""
    rps_by_round: list[float] = field(default_factory=list)
    """Each round's req/s (``rps`` is their median)."""

    @property
    def rps_spread(self) -> float | None:
        """(max - min) / median of the rounds' req/s: how much the machine moved (None: one round)."""
        if len(self.rps_by_round) < 2 or self.rps <= 0:
            return None
        return (max(self.rps_by_round) - min(self.rps_by_round)) / self.rps

    @property
    def cpu_total_us(self) -> float | None:
        """CPU µs per call of all the server's processes together (None if unreadable)."""
        return sum(self.cpu_us.values()) if self.cpu_us else None


@dataclass(frozen=True)
class Target:
    """A figure the benchmark tracks, with its goal (printed only, never enforced)."""

    name: str
    value: float | None
    goal: float
    at_least: bool
    unit: str = ""
    fmt: str = ".2f"

    @property
    def met(self) -> bool | None:
        """Whether the goal is met (None when not measured)."""
        if self.value is None:
            return None
        return self.value >= self.goal if self.at_least else self.value <= self.goal


@dataclass
class Report:
    """Everything one run measured."""

    config: dict[str, object]
    models: list[BenchModel]
    raw: dict[str, RawOrt]
    max_wait_ms: dict[str, int | None] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def find(self, model: str, system: str, clients: int) -> Row | None:
        """The row of one measurement, if it was made."""
        return next((r for r in self.rows if (r.model, r.system, r.clients) == (model, system, clients)), None)

    @property
    def total_errors(self) -> int:
        """Errors over every measurement."""
        return sum(r.errors for r in self.rows)

    def targets(self) -> list[Target]:
        """The tracked figures (None where the run did not measure them)."""
        tiny32, tiny1 = self.find("tiny", "maas", 32), self.find("tiny", "maas", 1)
        heavy32 = self.find("heavy", "maas", 32)
        return [
            Target("tiny c=32 MaaS / floor req/s", tiny32.x_floor if tiny32 else None, 0.65, at_least=True),
            Target("tiny c=1 MaaS p50", tiny1.p50_ms if tiny1 else None, 1.5, at_least=False, unit=" ms"),
            Target("heavy c=32 MaaS / raw ORT best batched", heavy32.x_raw_best if heavy32 else None, 0.25, True),
            Target("total errors", float(self.total_errors), 0, at_least=False, fmt=".0f"),
        ]

    def to_json(self) -> dict[str, object]:
        """The whole report as a JSON-able dict."""
        return {
            "config": self.config,
            "models": {m.name: {"width": m.width, "description": m.description} for m in self.models},
            "raw_ort": {name: raw.to_json() for name, raw in self.raw.items()},
            "max_wait_ms": self.max_wait_ms,
            "rows": [asdict(r) for r in self.rows],
            "total_errors": self.total_errors,
            "targets": [asdict(t) | {"met": t.met} for t in self.targets()],
        }


def add_ratios(rows: Sequence[Row], raw: Mapping[str, RawOrt]) -> None:
    """Fill each row's ratios to raw ORT and to the floor at the same model and concurrency.

    ``rows`` and ``raw`` are one round's: a ratio compares figures measured a minute apart at most.
    """
    floors = {(r.model, r.clients): r for r in rows if r.system == "floor"}
    for row in rows:
        if row.model in raw:
            row.x_raw_batch1 = row.rps / raw[row.model].batch1_ips
            row.x_raw_best = row.rps / raw[row.model].best_ips
        floor = floors.get((row.model, row.clients))
        if floor is not None and floor.rps > 0:
            row.x_floor = row.rps / floor.rps


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _merged(rows: Sequence[Row]) -> Row:
    """One measurement's rounds as one row: each figure their median, the counts their sum."""
    first = rows[0]
    return Row(
        model=first.model, system=first.system, clients=first.clients, requests=sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows), rps=statistics.median(r.rps for r in rows),
        p50_ms=_median(r.p50_ms for r in rows), p99_ms=_median(r.p99_ms for r in rows),
        mean_batch=_median(r.mean_batch for r in rows),
        first_error=next((r.first_error for r in rows if r.first_error), ""),
        x_raw_batch1=_median(r.x_raw_batch1 for r in rows), x_raw_best=_median(r.x_raw_best for r in rows),
        x_floor=_median(r.x_floor for r in rows),
        cpu_us={name: statistics.median(r.cpu_us[name] for r in rows if name in r.cpu_us) for name in first.cpu_us},
        rps_by_round=[r.rps for r in rows],
    )  # fmt: skip


def merge_rounds(rounds: Sequence[Sequence[Row]], systems: Sequence[str]) -> list[Row]:
    """One row per (model, system, clients) (``_merged``), by model, then in the order of ``systems``, then clients.

    The ratios are the medians of each round's own ratios (``add_ratios``), so a drift of the
    machine between rounds moves both sides of a ratio alike.
    """
    groups: dict[tuple[str, str, int], list[Row]] = {}
    for rows in rounds:
        for row in rows:
            groups.setdefault((row.model, row.system, row.clients), []).append(row)
    order = {system: index for index, system in enumerate(systems)}
    models = list(dict.fromkeys(model for model, _system, _clients in groups))
    merged = [_merged(rows) for rows in groups.values()]
    return sorted(merged, key=lambda r: (models.index(r.model), order.get(r.system, len(order)), r.clients))


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_COLUMNS = (
    ("model", "<6"), ("system", "<7"), ("clients", ">7"), ("req/s", ">9"), ("spread", ">6"), ("p50 ms", ">8"),
    ("p99 ms", ">8"), ("errors", ">6"), ("mean batch", ">10"), ("x ORT b1", ">8"), ("x ORT best", ">10"),
    ("x floor", ">7"), ("cpu us/call", ">11"),
)  # fmt: skip


def _cells(row: Row) -> tuple[str, ...]:
    return (
        row.model, row.system, str(row.clients), _num(row.rps, ",.0f"), _num(row.rps_spread, ".0%"),
        _num(row.p50_ms, ".2f"), _num(row.p99_ms, ".2f"), str(row.errors), _num(row.mean_batch, ".2f"),
        _num(row.x_raw_batch1, ".2f"), _num(row.x_raw_best, ".2f"), _num(row.x_floor, ".2f"),
        _num(row.cpu_total_us, ",.0f"),
    )  # fmt: skip


def _line(cells: tuple[str, ...]) -> str:
    return "  ".join(format(cell, spec) for cell, (_, spec) in zip(cells, _COLUMNS, strict=True)).rstrip()


def header_lines(report: Report) -> list[str]:
    """What was measured, raw ONNX Runtime's figures and the deployments' batching."""
    cfg = report.config
    lines = [
        f"MaaS benchmark on {cfg['cpus']} CPU(s), onnxruntime {cfg['onnxruntime']} (CPU EP, default intra-op threads); "
        f"{cfg['seconds']:g} s per measurement after a 0.5 s warm-up; closed-loop batch-1 clients "
        "(tritonclient gRPC aio, one load process per measurement)",
        f"  {cfg.get('rounds', 1)} round(s), interleaved: each round measures raw ORT, then every system at each "
        "client count in turn; a figure is the median of its rounds, a ratio the median of the rounds' own "
        "ratios; spread: (max - min) / median of the rounds' req/s",
        f"  every process of the run (load clients, floor, MaaS) has GRPC_EXPERIMENTS="
        f"{cfg.get('grpc_experiments') or '(unset)'} (services/__init__.py sets it: see README, request path)",
    ]
    lines += [f"  model {m.name}: {m.description}" for m in report.models]
    lines += [f"  system {name}: {desc}" for name, desc in SYSTEMS.items() if name in cfg["systems"]]
    if report.max_wait_ms:
        waits = ", ".join(f"{name} {_num(ms, 'd')} ms" for name, ms in report.max_wait_ms.items())
        lines.append(
            f"  MaaS: {cfg['workers']} worker(s), max_batch_size 32, deployment max_wait_ms: {waits}, "
            f"access log: {cfg.get('access_log_sample', 1.0):g} of OK calls (maas up --access-log-sample)"
        )
        lines.append(f"  mean batch (maas rows): workers' {BATCH_HISTOGRAM} delta _sum / _count, warm-up included")
    lines.append("raw ONNX Runtime, in-process session.run loop (medians of the rounds):")
    for name, raw in report.raw.items():
        sweep = ", ".join(f"{b}: {ips:,.0f}" for b, ips in raw.by_batch.items())
        lines.append(
            f"  {name:<6} batch-1 {raw.batch1_ips:,.0f} inf/s (p50 {raw.batch1_p50_ms:.3f} ms); "
            f"best batched {raw.best_ips:,.0f} inf/s at batch {raw.best_batch}  [inf/s by batch: {sweep}]"
        )
    return lines


def table_lines(report: Report) -> list[str]:
    """The comparison table, then the CPU per call of each MaaS process."""
    head = _line(tuple(name for name, _ in _COLUMNS))
    lines = [head, "-" * len(head), *(_line(_cells(row)) for row in report.rows)]
    split = [row for row in report.rows if row.system == "maas" and row.cpu_us]
    if split:
        lines += ["", "cpu us/call: server processes' CPU time (user + system, /proc) per call, warm-up included:"]
        lines += [
            f"  {row.model:<6} maas  {row.clients:>3} clients: "
            + ", ".join(f"{name} {us:,.0f}" for name, us in sorted(row.cpu_us.items()))
            for row in split
        ]
    return lines


def target_lines(report: Report) -> list[str]:
    """The tracked figures against their goals."""
    lines = ["targets:"]
    for t in report.targets():
        goal = f"{'>=' if t.at_least else '<='} {t.goal:g}{t.unit}" if t.goal else "0"
        verdict = {None: "not measured", True: "met", False: "MISSED"}[t.met]
        value = "-" if t.value is None else f"{t.value:{t.fmt}}{t.unit}"
        lines.append(f"  {t.name:<40} {value:>10}   target {goal:<10} {verdict}")
    return lines


def error_lines(report: Report) -> list[str]:
    """The first error of each row that had errors."""
    return [
        f"  {r.model} {r.system} c={r.clients}: {r.errors} error(s), first: {r.first_error}"
        for r in report.rows
        if r.errors
    ]


def render(report: Report) -> str:
    """Header, table, errors and targets as printed."""
    errors = error_lines(report)
    parts = [*header_lines(report), "", *table_lines(report), ""]
    if errors:
        parts += ["errors:", *errors, ""]
    return "\n".join([*parts, *target_lines(report)])
