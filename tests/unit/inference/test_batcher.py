"""Dynamic batching: grouping, stacking, splitting and the one-by-one fallback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from services.common.errors import InvalidArgument, MaasError
from services.common.metadata import TensorSpec
from services.inference import batcher
from services.inference.runtime import Array, InferRequest, Signature

BATCHABLE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),),
    outputs=(TensorSpec("y", "FP32", (-1, 2)), TensorSpec("z", "FP32", (-1, 2))),
)
FIXED = Signature(inputs=(TensorSpec("x", "FP32", (1, 2)),), outputs=(TensorSpec("y", "FP32", (1, 2)),))


def req(
    rows: int, *, start: float = 0.0, dtype: type = np.float32, width: int = 2, outputs: tuple[str, ...] = ()
) -> InferRequest:
    x = (np.arange(rows * width, dtype=np.float64) + start).astype(dtype).reshape(rows, width)
    return InferRequest(id=f"r{start}", inputs={"x": x}, outputs=outputs)


class AffineRun:
    """A numpy model: y = 2x + 1, z = -x; refuses negative inputs. Records each call's rows."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str]]] = []

    async def __call__(self, feeds: Mapping[str, Array], names: Sequence[str]) -> dict[str, Array]:
        x = np.asarray(feeds["x"])
        self.calls.append((x.shape[0], list(names)))
        if (x < 0).any():
            raise InvalidArgument("model run failed: negative input")
        values = {"y": 2 * x + 1, "z": -x}
        return {name: values[name] for name in names}


def test_compatible_requests_form_one_group_in_arrival_order() -> None:
    requests = [req(1), req(3), req(1, dtype=np.float64), req(2), req(1, width=3)]
    assert batcher.plan_groups(requests, BATCHABLE) == [[0, 1, 3], [2], [4]]


def test_non_batchable_models_run_requests_alone() -> None:
    assert batcher.plan_groups([req(1), req(1)], FIXED) == [[0], [1]]


def test_request_with_mismatched_batch_dims_runs_alone() -> None:
    odd = InferRequest(id="odd", inputs={"x": np.zeros((2, 2)), "w": np.zeros((3, 2))})
    assert batcher.batch_rows(odd, BATCHABLE) is None
    assert batcher.batch_rows(req(4), BATCHABLE) == 4


def test_concatenate_and_split_round_trip() -> None:
    requests = [req(1, start=0), req(3, start=10), req(2, start=20)]
    stacked = batcher.concatenate(requests)
    assert stacked["x"].shape == (6, 2)

    parts = batcher.split({"x": stacked["x"]}, [1, 3, 2])
    assert [p["x"].tolist() for p in parts] == [r.inputs["x"].tolist() for r in requests]


def test_split_checks_one_row_per_input_row() -> None:
    with pytest.raises(MaasError, match="model output 'y' has 5 rows for a batch of 6 rows"):
        batcher.split({"y": np.zeros((5, 2))}, [3, 3])


async def test_group_runs_once_and_each_request_gets_its_outputs() -> None:
    run = AffineRun()
    group = [req(1, start=0, outputs=("z",)), req(2, start=5), req(1, start=9, outputs=("y",))]

    outcomes = await batcher.run_group(run, group, BATCHABLE)

    assert run.calls == [(4, ["y", "z"])]
    assert [list(o) for o in outcomes if isinstance(o, dict)] == [["z"], ["y", "z"], ["y"]]
    for request, outcome in zip(group, outcomes, strict=True):
        assert isinstance(outcome, dict)
        x = request.inputs["x"]
        for name, array in outcome.items():
            assert array.tolist() == (2 * x + 1 if name == "y" else -x).tolist()


async def test_failed_stacked_run_is_retried_one_by_one() -> None:
    run = AffineRun()
    group = [req(1, start=0), req(1, start=-5), req(2, start=3)]

    outcomes = await batcher.run_group(run, group, BATCHABLE)

    assert [rows for rows, _names in run.calls] == [4, 1, 1, 2]
    assert isinstance(outcomes[1], InvalidArgument)
    assert isinstance(outcomes[0], dict) and outcomes[0]["y"].tolist() == [[1.0, 3.0]]
    assert isinstance(outcomes[2], dict) and outcomes[2]["y"].tolist() == [[7.0, 9.0], [11.0, 13.0]]
