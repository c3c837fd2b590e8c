"""Domain records of model optimisation: lineage and report of a derived version, and the operation.

The registry stores them as JSON (``VersionRecord.lineage``/``report``, and each operation under
``keys.operation``); clients receive them as ``maas.registry.v1`` messages. ``services.registry.optimize``
runs operations, ``services.registry.transforms`` measures the reports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

TRANSFORMS = ("graph", "int8-dynamic", "int8-static", "fp16")
"""Every transform, in the order ``auto`` tries them."""
DEVICE_TRANSFORMS = {"cpu": ("graph", "int8-dynamic", "int8-static"), "gpu": ("graph", "fp16")}
"""The transforms ``auto`` tries for each target device."""


@dataclass(frozen=True)
class Lineage:
    """Where a derived version came from."""

    source_version: int
    transform: str
    options: Mapping[str, str] = field(default_factory=dict)
    """The transform's options as given, with ``device`` and ``max_abs_diff``."""
    tool_versions: Mapping[str, str] = field(default_factory=dict)
    """onnx, onnxruntime and numpy versions of the process that derived it."""
    operation_id: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lineage:
        """Rebuild what ``dataclasses.asdict`` wrote."""
        return cls(**{**data, "options": dict(data["options"]), "tool_versions": dict(data["tool_versions"])})


@dataclass(frozen=True)
class OutputDiff:
    """One output of a variant against its source's, on the same inputs."""

    name: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None = None
    """Share of rows with the same arg-max, for classifier-shaped outputs ([N, C] float, C >= 2)."""


@dataclass(frozen=True)
class Latency:
    """Median latency of one run of the source and of the variant at one batch size."""

    batch_size: int
    source_p50_ms: float
    variant_p50_ms: float


@dataclass(frozen=True)
class OptimizationReport:
    """What one transform did, measured at derivation time on the machine that derived it."""

    transform: str
    outputs: tuple[OutputDiff, ...] = ()
    source_size_bytes: int = 0
    variant_size_bytes: int = 0
    latency: tuple[Latency, ...] = ()
    device: str = ""
    samples: int = 0
    """Rows the outputs were compared on."""
    warnings: tuple[str, ...] = ()
    error: str = ""
    """Why the transform was not kept (empty: it passed)."""
    version: int = 0
    """The version it became (0: none)."""

    def p50_ms(self, batch_size: int = 1) -> float | None:
        """Return the variant's median latency at ``batch_size`` (None: not measured)."""
        return next((m.variant_p50_ms for m in self.latency if m.batch_size == batch_size), None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimizationReport:
        """Rebuild what ``dataclasses.asdict`` (or the transform process) wrote."""
        return cls(
            **{
                **data,
                "outputs": tuple(OutputDiff(**o) for o in data.get("outputs", ())),
                "latency": tuple(Latency(**m) for m in data.get("latency", ())),
                "warnings": tuple(data.get("warnings", ())),
            }
        )


class OperationState(StrEnum):
    """Where an operation is; SUCCEEDED and FAILED are final."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class OperationRecord:
    """A long-running optimisation of one source version."""

    id: str
    model: str
    source_version: int
    transforms: tuple[str, ...]
    device: str
    state: OperationState = OperationState.PENDING
    progress_message: str = ""
    progress_percent: int = 0
    result_versions: tuple[int, ...] = ()
    reports: tuple[OptimizationReport, ...] = ()
    error_code: str = ""
    """FAILED: the ``grpc.StatusCode`` name (e.g. ``FAILED_PRECONDITION``)."""
    error_message: str = ""
    created_at_ms: int = 0
    updated_at_ms: int = 0
    lease_until_ms: int = 0
    """While not final: the registry running it renews this; past it, the operation is abandoned."""

    @property
    def is_done(self) -> bool:
        """Whether the operation ended (SUCCEEDED or FAILED)."""
        return self.state in (OperationState.SUCCEEDED, OperationState.FAILED)

    def failed(self, code: str, message: str, at_ms: int) -> OperationRecord:
        """Return this operation ended FAILED with ``code`` (a ``grpc.StatusCode`` name) and ``message``."""
        return replace(self, state=OperationState.FAILED, error_code=code, error_message=message, updated_at_ms=at_ms)

    def to_json(self) -> str:
        """Serialize for storage."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> OperationRecord:
        """Deserialize what ``to_json`` wrote."""
        data: dict[str, Any] = json.loads(raw)
        data["transforms"] = tuple(data["transforms"])
        data["state"] = OperationState(data["state"])
        data["result_versions"] = tuple(data["result_versions"])
        data["reports"] = tuple(OptimizationReport.from_dict(r) for r in data["reports"])
        return cls(**data)
