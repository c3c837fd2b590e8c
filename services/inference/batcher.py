"""Dynamic batching: stack compatible requests along axis 0, run once, split the outputs back.

Requests can be stacked when the model is batchable (every input and output has a variable
first dimension) and they agree on each input's datatype and trailing dimensions. Everything
else runs one request at a time.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from services.common.errors import MaasError
from services.inference.runtime import Array, InferRequest, Signature

Outcome: TypeAlias = dict[str, Array] | MaasError
"""A request's outputs by name, or the error it gets as its reply."""
RunFn: TypeAlias = Callable[[Mapping[str, Array], Sequence[str]], Awaitable[dict[str, Array]]]
"""Runs a model: ``run(feeds, output_names) -> outputs`` (``ModelRuntime.run``)."""
_StackKey: TypeAlias = tuple[object, ...]


@dataclass
class Timing:
    """Where one group's time went, in ns (the statistics extension's compute phases)."""

    input_ns: int = 0
    """Stacking the requests' inputs."""
    output_ns: int = 0
    """Splitting the stacked outputs."""
    runs: list[tuple[int, int]] = field(default_factory=list)
    """(batch rows, ns) of each model run that succeeded."""

    @property
    def infer_ns(self) -> int:
        """Time in successful model runs."""
        return sum(ns for _rows, ns in self.runs)


def batch_rows(request: InferRequest, signature: Signature) -> int | None:
    """Return the rows a request adds to a stacked batch, or None if it cannot be stacked."""
    if not signature.is_batchable or not request.inputs:
        return None
    arrays = list(request.inputs.values())
    if any(array.ndim == 0 for array in arrays):
        return None
    rows = {array.shape[0] for array in arrays}
    return rows.pop() if len(rows) == 1 else None


def _stack_key(request: InferRequest) -> _StackKey:
    return tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in request.inputs.items()))


def plan_groups(requests: Sequence[InferRequest], signature: Signature) -> list[list[int]]:
    """Group request indexes that can run as one stacked batch.

    Returns:
        Groups of indexes, in order of their first request; each group keeps arrival order.
    """
    groups: dict[_StackKey, list[int]] = {}
    for index, request in enumerate(requests):
        key = ("alone", index) if batch_rows(request, signature) is None else _stack_key(request)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def concatenate(requests: Sequence[InferRequest]) -> dict[str, Array]:
    """Stack the requests' inputs along axis 0 (they must be in one group of ``plan_groups``)."""
    if len(requests) == 1:
        return dict(requests[0].inputs)
    names = list(requests[0].inputs)
    return {name: np.concatenate([request.inputs[name] for request in requests], axis=0) for name in names}


def split(outputs: Mapping[str, Array], rows: Sequence[int]) -> list[dict[str, Array]]:
    """Split stacked outputs back into one dict per request of ``rows`` rows each.

    Raises:
        MaasError: An output does not have one row per input row.
    """
    total = sum(rows)
    for name, array in outputs.items():
        got = array.shape[0] if array.ndim > 0 else 0
        if got != total:
            raise MaasError(f"model output '{name}' has {got} rows for a batch of {total} rows")
    # NOTE: slices (views), not np.split: its array_split costs about 10 µs of Python a call.
    bounds = itertools.pairwise(itertools.accumulate(rows, initial=0))
    return [{name: array[start:stop] for name, array in outputs.items()} for start, stop in bounds]


def wanted_outputs(request: InferRequest, signature: Signature) -> tuple[str, ...]:
    """The outputs a request gets back: those it asked for, else every output of the model."""
    return request.outputs or signature.output_names


def union_outputs(requests: Sequence[InferRequest], signature: Signature) -> list[str]:
    """Outputs a stacked run must compute for all of ``requests``, in the model's order."""
    wanted = {name for request in requests for name in wanted_outputs(request, signature)}
    return [name for name in signature.output_names if name in wanted]


async def run_one(run: RunFn, request: InferRequest, signature: Signature, timing: Timing | None = None) -> Outcome:
    """Run one request alone; a ``MaasError`` becomes its outcome; a successful run is added to ``timing``."""
    names = wanted_outputs(request, signature)
    started = time.perf_counter_ns()
    try:
        outputs = await run(request.inputs, names)
    except MaasError as exc:
        return exc
    if timing is not None:
        timing.runs.append((batch_rows(request, signature) or 1, time.perf_counter_ns() - started))
    return {name: outputs[name] for name in names}


async def run_group(
    run: RunFn, group: Sequence[InferRequest], signature: Signature, timing: Timing | None = None
) -> list[Outcome]:
    """Run one group of ``plan_groups`` and return one outcome per request, in order.

    A stacked run that fails is re-run one request at a time, so only the bad request fails.
    Stacking, successful runs and splitting are timed into ``timing``.
    """
    if len(group) == 1:
        return [await run_one(run, group[0], signature, timing)]
    rows = [batch_rows(request, signature) or 0 for request in group]
    try:
        started = time.perf_counter_ns()
        feeds = concatenate(group)
        stacked_ns = time.perf_counter_ns()
        stacked = await run(feeds, union_outputs(group, signature))
        ran_ns = time.perf_counter_ns()
        parts = split(stacked, rows)
    except MaasError:
        return [await run_one(run, request, signature, timing) for request in group]
    if timing is not None:
        timing.input_ns += stacked_ns - started
        timing.runs.append((sum(rows), ran_ns - stacked_ns))
        timing.output_ns += time.perf_counter_ns() - ran_ns
    return [
        {name: part[name] for name in wanted_outputs(request, signature)}
        for part, request in zip(parts, group, strict=True)
    ]
