"""Pure parts of optimisation: request checks, tolerance, choice of the fastest, records as JSON."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from services.common.errors import InvalidArgument
from services.common.metadata import TensorSpec, VersionRecord
from services.common.optimization import (
    Latency,
    Lineage,
    OperationRecord,
    OperationState,
    OptimizationReport,
    OutputDiff,
)
from services.registry.optimize import OptimizeRequest, exceeding, fastest, plan


def _report(transform: str, p50_ms: float, max_abs_diff: float = 0.01, error: str = "") -> OptimizationReport:
    return OptimizationReport(
        transform=transform,
        outputs=(OutputDiff("y", max_abs_diff, max_abs_diff / 2, 1.0),),
        latency=(Latency(1, 1.0, p50_ms), Latency(8, 2.0, p50_ms * 4)),
        error=error,
    )


def test_plan_returns_one_transform_or_the_device_s_list_for_auto() -> None:
    assert plan(OptimizeRequest("m", transform="fp16"), 10) == ("fp16",)
    assert plan(OptimizeRequest("m", is_auto=True), 10) == ("graph", "int8-dynamic", "int8-static")
    assert plan(OptimizeRequest("m", is_auto=True, device="gpu"), 10) == ("graph", "fp16")
    assert plan(OptimizeRequest("m", is_auto=True, options={"per_channel": "true"}), 10)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (OptimizeRequest("m", transform="int4"), "transform 'int4' is unknown"),
        (OptimizeRequest("m"), "set transform"),
        (OptimizeRequest("bad name", transform="graph"), "model name"),
        (OptimizeRequest("m", version=-1, transform="graph"), "version must be >= 0"),
        (OptimizeRequest("m", transform="graph", max_abs_diff=float("nan")), "max_abs_diff must be >= 0"),
        (OptimizeRequest("m", transform="graph", options={"level": "all"}), "options['level'] must be one of"),
        (OptimizeRequest("m", transform="graph", calibration_npz=b"x" * 11), "optimize_max_calibration_bytes"),
        (OptimizeRequest("m", is_auto=True, device="gpu", options={"per_channel": "true"}), "options['per_channel']"),
    ],
)
def test_plan_refuses_a_bad_request_naming_the_field(request_: OptimizeRequest, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        plan(request_, 10)
    assert message in caught.value.message


def test_exceeding_names_the_transform_the_output_and_both_numbers() -> None:
    assert exceeding(_report("int8-dynamic", 1.0, 0.31), None) == ""
    assert exceeding(_report("int8-dynamic", 1.0, 0.31), 0.5) == ""
    assert exceeding(_report("int8-dynamic", 1.0, 0.31), 0.05) == (
        "int8-dynamic: output 'y' max abs diff 0.31 > 0.05 (max_abs_diff)"
    )


def test_fastest_is_the_lowest_batch_1_p50_among_those_that_passed() -> None:
    reports = (_report("graph", 2.0), _report("int8-dynamic", 0.5, error="too far"), _report("int8-static", 1.0))
    best = fastest(reports)
    assert best is not None and best.transform == "int8-static"
    assert fastest((_report("graph", 1.0, error="x"),)) is None


def test_a_version_with_lineage_and_report_and_an_operation_survive_json() -> None:
    report = _report("fp16", 1.5)
    version = VersionRecord(
        model="m", version=2, sha256="0" * 64, size_bytes=1, inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 2)),), created_at_ms=1,
        lineage=Lineage(1, "fp16", {"device": "gpu"}, {"onnx": "1"}, "a" * 32), report=report,
    )  # fmt: skip
    assert VersionRecord.from_json(version.to_json()) == version
    old = json.loads(version.to_json())
    del old["lineage"], old["report"]  # a record stored before lineage existed
    assert VersionRecord.from_json(json.dumps(old)) == replace(version, lineage=None, report=None)
    operation = OperationRecord(
        id="a" * 32, model="m", source_version=1, transforms=("fp16",), device="gpu",
        state=OperationState.SUCCEEDED, result_versions=(2,), reports=(report,),
    )  # fmt: skip
    assert OperationRecord.from_json(operation.to_json()) == operation
    assert operation.failed("UNAVAILABLE", "gone", 5).state == OperationState.FAILED
