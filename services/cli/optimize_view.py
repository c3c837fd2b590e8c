"""Tables of optimisation for ``maas models optimize`` and ``maas models show`` (rich)."""

from __future__ import annotations

from collections.abc import Iterable

from rich import box
from rich.table import Table

from services.common.metadata import VersionRecord
from services.common.optimization import Lineage, OperationRecord, OptimizationReport


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _latency(report: OptimizationReport, batch_size: int) -> str:
    measured = next((m for m in report.latency if m.batch_size == batch_size), None)
    if measured is None:
        return "-"
    return f"{_ms(measured.source_p50_ms)} -> {_ms(measured.variant_p50_ms)}"


def _diffs(report: OptimizationReport) -> str:
    parts = []
    for output in report.outputs:
        top1 = "" if output.top1_agreement is None else f" top1 {output.top1_agreement:.1%}"
        parts.append(f"{output.name}: max {output.max_abs_diff:.3g} mean {output.mean_abs_diff:.3g}{top1}")
    return "\n".join(parts) or "-"


def _size(report: OptimizationReport) -> str:
    if not report.variant_size_bytes:
        return "-"
    ratio = report.source_size_bytes / report.variant_size_bytes
    return f"{report.source_size_bytes} -> {report.variant_size_bytes} ({ratio:.1f}x)"


def reports_table(reports: Iterable[OptimizationReport], title: str = "optimisation report") -> Table:
    """One row per transform: outcome, output differences, size, p50 latency at batch 1 and 8."""
    table = Table(
        "transform", "result", "outputs (abs diff vs source)", "size bytes", "p50 ms b1", "p50 ms b8", "device",
        title=title, box=box.SIMPLE_HEAD, pad_edge=False,
    )  # fmt: skip
    notes = []
    for report in reports:
        result = f"version {report.version}" if report.version else ("failed" if report.error else "passed")
        table.add_row(
            report.transform, result, _diffs(report), _size(report), _latency(report, 1), _latency(report, 8),
            report.device or "-",
        )  # fmt: skip
        notes += [f"{report.transform}: {report.error}" for _ in (1,) if report.error]
        notes += [f"{report.transform}: warning: {warning}" for warning in report.warnings]
    if notes:
        table.caption = "\n".join(notes)
    return table


def lineage_text(lineage: Lineage) -> str:
    """One line: source version, transform, options and tool versions."""
    options = ", ".join(f"{key}={value}" for key, value in sorted(lineage.options.items())) or "none"
    tools = ", ".join(f"{key} {value}" for key, value in sorted(lineage.tool_versions.items()))
    return (
        f"derived from v{lineage.source_version} by {lineage.transform} (options: {options}; tools: {tools}; "
        f"operation {lineage.operation_id})"
    )


def operation_text(operation: OperationRecord) -> str:
    """One line: the operation's state, progress and result or error."""
    text = (
        f"operation {operation.id}: {operation.state.value} {operation.progress_percent}% {operation.progress_message}"
    )
    if operation.error_code:
        text += f"\n  error {operation.error_code}: {operation.error_message}"
    if operation.result_versions:
        text += f"\n  new version(s): {', '.join(str(v) for v in operation.result_versions)}"
    return text


def has_optimization(version: VersionRecord) -> bool:
    """Whether a version was derived by OptimizeVersion (it has lineage or a report)."""
    return version.lineage is not None or version.report is not None
