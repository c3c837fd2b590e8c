"""Conversions of the optimisation messages (``maas.registry.v1``) into domain records, for clients.

The registry's own direction (domain -> protobuf) lives in ``services.registry.convert``.
"""

from __future__ import annotations

import grpc

from maas.registry.v1 import registry_pb2
from services.common.optimization import (
    Latency,
    Lineage,
    OperationRecord,
    OperationState,
    OptimizationReport,
    OutputDiff,
)

_CODES = {code.value[0]: code.name for code in grpc.StatusCode}


def lineage_from_proto(msg: registry_pb2.Version) -> Lineage | None:
    """Return a version's lineage (None: not a derived version)."""
    if not msg.HasField("lineage"):
        return None
    lineage = msg.lineage
    return Lineage(
        source_version=lineage.source_version,
        transform=lineage.transform,
        options=dict(lineage.options),
        tool_versions=dict(lineage.tool_versions),
        operation_id=lineage.operation_id,
    )


def version_report_from_proto(msg: registry_pb2.Version) -> OptimizationReport | None:
    """Return a version's optimisation report (None: not a derived version)."""
    return report_from_proto(msg.report) if msg.HasField("report") else None


def report_from_proto(msg: registry_pb2.OptimizationReport) -> OptimizationReport:
    """Convert one optimisation report."""
    return OptimizationReport(
        transform=msg.transform,
        outputs=tuple(
            OutputDiff(
                name=o.name,
                max_abs_diff=o.max_abs_diff,
                mean_abs_diff=o.mean_abs_diff,
                top1_agreement=o.top1_agreement if o.HasField("top1_agreement") else None,
            )
            for o in msg.outputs
        ),
        source_size_bytes=msg.source_size_bytes,
        variant_size_bytes=msg.variant_size_bytes,
        latency=tuple(
            Latency(batch_size=m.batch_size, source_p50_ms=m.source_p50_ms, variant_p50_ms=m.variant_p50_ms)
            for m in msg.latency
        ),
        device=msg.device,
        samples=msg.samples,
        warnings=tuple(msg.warnings),
        error=msg.error,
        version=msg.version,
    )


def operation_from_proto(msg: registry_pb2.Operation) -> OperationRecord:
    """Convert an operation; its error code becomes the ``grpc.StatusCode`` name."""
    return OperationRecord(
        id=msg.id,
        model=msg.model,
        source_version=msg.source_version,
        transforms=tuple(msg.transforms),
        device=msg.device,
        state=OperationState(registry_pb2.Operation.State.Name(msg.state)),
        progress_message=msg.progress_message,
        progress_percent=msg.progress_percent,
        result_versions=tuple(msg.result_versions),
        reports=tuple(report_from_proto(r) for r in msg.reports),
        error_code=_CODES.get(msg.error_code, "UNKNOWN") if msg.error_code else "",
        error_message=msg.error_message,
        created_at_ms=msg.created_at_ms,
        updated_at_ms=msg.updated_at_ms,
    )
