"""Signature validation, provider choice and real ONNX Runtime sessions on tiny models."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from services.common.errors import InvalidArgument, MaasError
from services.common.metadata import TensorSpec
from services.inference.runtime import (
    Array,
    InferRequest,
    ModelRuntime,
    RunTimes,
    Signature,
    has_gpu_driver,
    parse_version,
    select_providers,
)
from tests.models import affine_model, identity_model, two_io_model

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
SIGNATURE = Signature(
    inputs=(TensorSpec("a", "INT64", (-1, 3)), TensorSpec("b", "FP32", (2,))),
    outputs=(TensorSpec("out", "INT64", (-1, 3)),),
)


def test_valid_request_passes() -> None:
    inputs = {"a": np.zeros((5, 3), np.int64), "b": np.zeros(2, np.float32)}
    SIGNATURE.validate(InferRequest(id="r", inputs=inputs, outputs=("out",)))


A_OK, B_OK = np.zeros((1, 3), np.int64), np.zeros(2, np.float32)


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected"),
    [
        ({"c": np.zeros(1)}, (), "unknown input 'c'; the model's inputs are 'a', 'b'"),
        ({"a": A_OK}, (), "missing input 'b'"),
        ({"a": np.zeros((1, 3), np.int32), "b": B_OK}, (), "input 'a': datatype INT32, expected INT64"),
        ({"a": np.zeros(3, np.int64), "b": B_OK}, (), "input 'a': shape [3] has rank 1, expected [-1, 3]"),
        ({"a": np.zeros((1, 4), np.int64), "b": B_OK}, (), "input 'a': dimension 1 is 4, expected 3"),
        ({"a": A_OK, "b": np.zeros(3, np.float32)}, (), "input 'b': dimension 0 is 3, expected 2"),
        ({"a": A_OK, "b": B_OK}, ("nope",), "unknown requested output 'nope'"),
    ],
)
def test_invalid_requests_name_the_tensor(inputs: dict[str, Array], outputs: tuple[str, ...], expected: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        SIGNATURE.validate(InferRequest(id="r", inputs=inputs, outputs=outputs))
    assert expected in info.value.message


@pytest.mark.parametrize(
    ("setting", "available", "has_gpu", "expected"),
    [
        ("auto", [CUDA, CPU], True, [CUDA, CPU]),
        ("auto", [CUDA, CPU], False, [CPU]),
        ("auto", [CPU], True, [CPU]),
        ("cpu", [CUDA, CPU], True, [CPU]),
        ("cuda", [CPU], False, [CUDA, CPU]),
    ],
)
def test_provider_selection(setting: str, available: list[str], has_gpu: bool, expected: list[str]) -> None:
    assert select_providers(setting, available, has_gpu=has_gpu) == expected  # type: ignore[arg-type]


def test_parse_version() -> None:
    assert (parse_version(""), parse_version("12")) == (0, 12)
    with pytest.raises(InvalidArgument, match="model_version 'latest' is not a version number"):
        parse_version("latest")


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown()


async def load(tmp_path: Path, data: bytes, executor: ThreadPoolExecutor) -> ModelRuntime:
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    return await ModelRuntime.load(path, model="m", version=1, providers="cpu", intra_op_threads=1, executor=executor)


async def test_runtime_exposes_signature_and_runs(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    runtime = await load(tmp_path, two_io_model(), executor)

    assert runtime.signature.inputs == (TensorSpec("a", "INT64", (-1, 3)), TensorSpec("b", "INT64", (-1, 3)))
    assert runtime.signature.output_names == ("sum", "prod")
    assert runtime.signature.is_batchable
    assert runtime.providers == [CPU]
    a, b = np.arange(6).reshape(2, 3), np.full((2, 3), 3)
    outputs = await runtime.run({"a": a, "b": b}, ["prod"])
    assert list(outputs) == ["prod"]
    assert outputs["prod"].tolist() == (a * b).tolist()


async def test_bytes_inputs_reach_the_model_as_text(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    runtime = await load(tmp_path, identity_model(TensorProto.STRING, ["n"]), executor)
    words = np.array([b"caf\xc3\xa9", b""], dtype=object)

    outputs = await runtime.run({"inp": words}, [])

    assert outputs["out"].tolist() == ["caf\u00e9", ""]
    with pytest.raises(InvalidArgument, match="input 'inp': BYTES elements must be UTF-8"):
        await runtime.run({"inp": np.array([b"\xff"], dtype=object)}, [])


async def test_ort_errors_are_translated(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    runtime = await load(tmp_path, affine_model(), executor)
    with pytest.raises(InvalidArgument) as info:
        await runtime.run({"x": np.zeros((1, 3), np.float32)}, [])
    assert info.value.message.startswith("model run failed: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT")
    assert "\n" not in info.value.message


async def test_unloadable_model_is_a_maas_error(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    with pytest.raises(MaasError, match="model 'm' version 1 failed to load"):
        await load(tmp_path, b"not an onnx file", executor)


@pytest.mark.skipif(has_gpu_driver(), reason="checks the CPU-only path: this machine has a GPU driver")
async def test_explicit_cuda_without_a_gpu_fails_loudly(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(affine_model())
    with pytest.raises(MaasError, match="providers=cuda, but ONNX Runtime could not use CUDA"):
        await ModelRuntime.load(path, model="m", version=1, providers="cuda", intra_op_threads=1, executor=executor)


class CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that counts the runs handed to it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(*args, **kwargs)


@pytest.mark.parametrize(("inline_run_max_s", "expected_submits"), [(1.0, 0), (0.0, 5), (1e-12, 5)])
async def test_fast_runs_move_onto_the_event_loop_once_measured(
    tmp_path: Path, inline_run_max_s: float, expected_submits: int
) -> None:
    pool = CountingExecutor()
    path = tmp_path / "model.onnx"
    path.write_bytes(affine_model())
    try:
        runtime = await ModelRuntime.load(
            path, model="m", version=1, providers="cpu", intra_op_threads=1, executor=pool,
            inline_run_max_s=inline_run_max_s,
        )  # fmt: skip
        for value in range(5):
            outputs = await runtime.run({"x": np.full((1, 4), value, np.float32)}, [])
            np.testing.assert_array_equal(outputs["y"], np.full((1, 4), 2 * value + 1, np.float32))
    finally:
        pool.shutdown()
    # The warm-up at load time measures the model; only one measured fast enough runs off the pool.
    assert pool.submitted == expected_submits


def test_the_typical_run_time_ignores_a_slow_run_and_follows_runs_that_got_slower() -> None:
    times = RunTimes(0.00001)  # the warm-up: 10 µs
    times.add(0.005)  # preempted, or waiting for the GIL on the thread pool
    assert times.typical_s == 0.00001
    for _ in range(8):  # larger batches: every run now takes 2 ms
        times.add(0.002)
    assert times.typical_s == 0.002
    times.add(0.00002)
    assert times.typical_s == 0.00002
    assert RunTimes().typical_s == math.inf  # a failed warm-up: unknown until runs are measured


async def test_a_fast_model_stays_on_the_event_loop_after_a_slow_run(tmp_path: Path) -> None:
    pool = CountingExecutor()
    path = tmp_path / "model.onnx"
    path.write_bytes(affine_model())
    try:
        runtime = await ModelRuntime.load(
            path, model="m", version=1, providers="cpu", intra_op_threads=1, executor=pool, inline_run_max_s=0.01,
        )  # fmt: skip
        runtime.run_times.add(1.0)  # one run held up for a second (a loaded machine)
        for value in range(5):
            await runtime.run({"x": np.full((1, 4), value, np.float32)}, [])
    finally:
        pool.shutdown()
    assert pool.submitted == 0
