"""Property-based fuzz of ModelInfer: every reply is a clear status, and the suite stays healthy.

Hypothesis builds ModelInferRequests near and far from three deployed signatures (FP32 fixed
shape, BYTES dynamic, INT64 dynamic batch with two inputs and outputs) and sends them, as
protobuf or as arbitrary bytes, to a real gateway + worker on a real Redis. Whatever comes in,
the reply is OK or a status in ``ALLOWED`` with a message: never UNKNOWN, INTERNAL or a hang.
The example-based tests at the end pin what the fuzz found.
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from structlog.testing import capture_logs

from inference import grpc_service_pb2 as pb
from services.common import dtypes
from services.common.embedded_redis import EmbeddedRedis
from services.common.redis_conn import create_redis
from tests.integration.suite import Suite
from tests.models import identity_model, two_io_model

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
"""DEADLINE_EXCEEDED and UNAVAILABLE are left out: nothing here is slow and Redis stays up."""

CALL_TIMEOUT_S = 10
MAX_BATCH = 4
INFER = "/inference.GRPCInferenceService/ModelInfer"

EXAMPLES = int(os.environ.get("MAAS_FUZZ_EXAMPLES", "300"))
"""Examples per run; set MAAS_FUZZ_EXAMPLES=5000 for a longer hunt."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # CI replays the same examples every run, so a failure there reproduces; locally the
    # examples vary and failures are kept in .hypothesis/ (gitignored) and replayed first.
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple[Spec, ...]
    outputs: tuple[str, ...]
    onnx: bytes
    max_batch_size: int = 0


MODELS = (
    Model("fuzz_fp32", (Spec("inp", "FP32", (2, 3)),), ("out",), identity_model(TensorProto.FLOAT, [2, 3])),
    Model("fuzz_text", (Spec("inp", "BYTES", (-1,)),), ("out",), identity_model(TensorProto.STRING, ["n"])),
    Model(
        "fuzz_batch",
        (Spec("a", "INT64", (-1, 3)), Spec("b", "INT64", (-1, 3))),
        ("sum", "prod"),
        two_io_model(),
        max_batch_size=MAX_BATCH,
    ),
)
BY_NAME = {model.name: model for model in MODELS}
UNDEPLOYED = "fuzz_undeployed"
"""A model with a version but no deployment: FAILED_PRECONDITION."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz_suite(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    """One suite for every example (hypothesis runs them all in one test call)."""
    suite = await Suite(redis_server.url, tmp_path_factory.mktemp("fuzz"), timeout_s=CALL_TIMEOUT_S).start()
    try:
        for model in MODELS:
            deploy = {"max_batch_size": model.max_batch_size} if model.max_batch_size else {}
            await suite.push(model.name, model.onnx, **deploy)
        await suite.registry.create_model(UNDEPLOYED)
        await suite.registry.upload_version(UNDEPLOYED, MODELS[0].onnx)
        yield suite
    finally:
        await suite.stop()
        client = create_redis(redis_server.url, timeout_s=5)
        await client.flushdb()
        await client.aclose()


# --- strategies -------------------------------------------------------------------------------
# Each request is either valid (only values and batch sizes vary) or fuzzed; in a fuzzed one,
# each part (name, version, parameters, datatypes, shapes, contents, outputs) goes wrong one
# time in four, so examples get past the first check often enough to reach the later ones.

INT64 = st.integers(-(2**63), 2**63 - 1)
CONTENT_VALUES = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": INT64,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}
KNOWN_PARAMETERS = [
    "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data", "binary_data_size",
    "binary_data_output", "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification",
    "headers", "triton_enable_empty_final_response",
]  # fmt: skip
DATATYPES = [*dtypes.DATATYPES, "fp32", "FLOAT", "TYPE_FP32", "STRING", "BF16", "INT128", "", " FP32"]
# Digits isdigit() takes but int() or an int64 does not: superscript two, Arabic-Indic and fullwidth one.
VERSIONS = ["2", "0", "-1", "01", "1.0", " 1", "+1", "\u00b2", "\u0661", "\uff11", "9" * 20, str(2**63), str(2**64)]
NAMES = [UNDEPLOYED, "", "missing", "fuzz_fp32 ", "FUZZ_FP32", "fuzz_fp32/1", "fuzz:fp32:1", "{fuzz_fp32}", "a\x00"]
HUGE_DIMS = [2**31, 2**32 + 3, 10**12, 2**62, 2**63 - 1, -(2**63)]


class Fuzz:
    """Draws the parts of one request: valid ones, or, when ``on``, sometimes broken ones."""

    def __init__(self, draw: st.DrawFn, on: bool) -> None:
        self.draw = draw
        self.on = on

    def pick(self, valid: st.SearchStrategy[Any], broken: st.SearchStrategy[Any]) -> Any:
        """A valid value, or one time in four (when fuzzing) a broken one; failures shrink to valid."""
        if self.on and self.draw(st.integers(0, 3)) == 3:
            return self.draw(broken)
        return self.draw(valid)

    def parameters(self, target: Any) -> None:
        value = st.one_of(
            st.builds(pb.InferParameter, bool_param=st.booleans()),
            st.builds(pb.InferParameter, int64_param=INT64),
            st.builds(pb.InferParameter, string_param=st.text(max_size=8)),
            st.builds(pb.InferParameter, double_param=st.floats()),
            st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
            st.just(pb.InferParameter()),
        )
        key = st.one_of(st.sampled_from(KNOWN_PARAMETERS), st.text(max_size=10))
        for name, parameter in self.pick(st.just({}), st.dictionaries(key, value, min_size=1, max_size=3)).items():
            target[name].CopyFrom(parameter)

    def shape(self, spec: Spec, batch: int) -> list[int]:
        valid = [batch if dim < 0 else dim for dim in spec.shape]
        dim = st.one_of(st.integers(-2, 6), st.sampled_from(HUGE_DIMS))
        return list(self.pick(st.just(valid), st.lists(dim, max_size=4)))

    def raw(self, datatype: str, shape: list[int]) -> bytes:
        known = dtypes.DATATYPES.get(datatype)
        count = math.prod(shape) if all(dim >= 0 for dim in shape) else -1
        arbitrary = st.binary(max_size=64)
        if known is None or not 0 <= count <= 64:
            return bytes(self.draw(arbitrary))
        if known.itemsize is None:
            return bytes(self.pick(bytes_elements(count, broken=False), st.one_of(bytes_elements(count), arbitrary)))
        size = count * known.itemsize
        return bytes(self.pick(st.binary(min_size=size, max_size=size), arbitrary))

    def contents(self, datatype: str, shape: list[int]) -> pb.InferTensorContents:
        known = dtypes.DATATYPES.get(datatype)
        count = math.prod(shape) if all(dim >= 0 for dim in shape) else -1
        valid_field = known.contents_field if known else None
        field = self.pick(st.just(valid_field), st.sampled_from(list(CONTENT_VALUES))) if valid_field else None
        field = field or self.draw(st.sampled_from(list(CONTENT_VALUES)))
        size = self.pick(st.just(count), st.integers(0, 8)) if 0 <= count <= 64 else self.draw(st.integers(0, 8))
        values = self.draw(st.lists(CONTENT_VALUES[field], min_size=size, max_size=size))
        return pb.InferTensorContents(**{field: values})


def bytes_elements(count: int, *, broken: bool = True) -> st.SearchStrategy[bytes]:
    """``count`` length-prefixed BYTES elements, sometimes (``broken``) with a broken framing."""
    element = st.one_of(st.text(max_size=6).map(str.encode), st.binary(max_size=6))
    framed = st.lists(element, min_size=count, max_size=count).map(
        lambda items: b"".join(struct.pack("<I", len(item)) + item for item in items)
    )
    if not broken:
        return framed

    def corrupt(data: bytes, how: int, k: int) -> bytes:
        if how == 0:
            return data[: max(0, len(data) - k)]
        if how == 1:
            return data + bytes(k)
        if len(data) >= 4:
            return struct.pack("<I", 2**32 - k) + data[4:]
        return struct.pack("<I", k)

    return st.builds(corrupt, framed, st.integers(0, 2), st.integers(1, 8))


def _stray_spec(model: Model) -> st.SearchStrategy[Spec]:
    """An input the model does not have, or a second copy of one it has."""
    names = st.one_of(st.sampled_from([s.name for s in model.inputs]), st.text(max_size=4))
    return st.builds(Spec, names, st.sampled_from(DATATYPES), st.lists(st.integers(0, 3), max_size=3).map(tuple))


@dataclass
class Drawn:
    """One generated call and what the checks need to know of it."""

    request: pb.ModelInferRequest
    model: Model


@st.composite
def infer_requests(draw: st.DrawFn) -> Drawn:
    model = draw(st.sampled_from(MODELS))
    fuzz = Fuzz(draw, draw(st.booleans()))
    request = pb.ModelInferRequest(
        model_name=fuzz.pick(st.just(model.name), st.one_of(st.sampled_from(NAMES), st.text(max_size=8))),
        model_version=fuzz.pick(st.sampled_from(["", "1"]), st.one_of(st.sampled_from(VERSIONS), st.text(max_size=4))),
        id=draw(st.text(max_size=8)),
    )
    fuzz.parameters(request.parameters)
    specs = list(model.inputs) + fuzz.pick(st.just([]), st.lists(_stray_spec(model), min_size=1, max_size=2))
    specs = draw(st.permutations(specs)) if len(specs) > 1 else specs
    specs = fuzz.pick(st.just(specs), st.lists(st.sampled_from(specs), max_size=len(specs)))  # some missing
    batch = draw(st.integers(0, MAX_BATCH + 1))
    raws: list[bytes] = []
    for spec in specs:
        name = fuzz.pick(st.just(spec.name), st.text(max_size=4))
        datatype = fuzz.pick(st.just(spec.datatype), st.sampled_from(DATATYPES))
        shape = fuzz.shape(spec, batch)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        fuzz.parameters(tensor.parameters)
        mode = fuzz.pick(st.sampled_from(["raw", "typed"]), st.sampled_from(["both", "none"]))
        if mode in ("typed", "both"):
            tensor.contents.CopyFrom(fuzz.contents(datatype, shape))
        raws.append(fuzz.raw(datatype, shape) if mode in ("raw", "both") else b"")
    if any(raws) or fuzz.pick(st.just(False), st.booleans()):
        extra = fuzz.pick(st.just(0), st.integers(-1, 2))
        request.raw_input_contents.extend(raws[:-1] if extra == -1 else raws + [bytes(4)] * extra)
    outputs = fuzz.pick(st.lists(st.sampled_from(model.outputs), max_size=2), st.lists(st.text(max_size=4), max_size=2))
    for output in outputs:
        fuzz.parameters(request.outputs.add(name=output).parameters)
    return Drawn(request, model)


def raw_messages() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and serialized requests with bytes flipped, cut or appended."""

    def mutate(data: bytes, at: int, what: int, junk: bytes) -> bytes:
        if not data:
            return junk
        at %= len(data)
        if what == 0:
            return data[:at]
        if what == 1:
            return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        return data[:at] + junk + data[at:]

    valid = infer_requests().map(lambda drawn: drawn.request.SerializeToString())
    mutated = st.builds(mutate, valid, st.integers(0, 2**16), st.integers(0, 2), st.binary(min_size=1, max_size=8))
    return st.one_of(st.binary(max_size=256), mutated)


# --- checks -----------------------------------------------------------------------------------


def _check_error(err: grpc.aio.AioRpcError) -> None:
    event(err.code().name)  # --hypothesis-show-statistics tells how far the examples got
    assert err.code() in ALLOWED, f"{err.code().name}: {err.details()}"
    assert err.details(), f"{err.code().name} without a message"


def _check_reply(drawn: Drawn, reply: pb.ModelInferResponse) -> None:
    """A successful reply answers the call's model with well-formed, consistent tensors."""
    request = drawn.request
    model = BY_NAME[request.model_name]
    assert reply.model_name == model.name
    assert len(reply.outputs) == len(reply.raw_output_contents)
    wanted = {output.name for output in request.outputs} or set(model.outputs)
    assert {output.name for output in reply.outputs} == wanted
    given = {tensor.name: tensor for tensor in request.inputs}
    # Triton's classification extension: a classified output is the top k as BYTES strings.
    classified = {output.name for output in request.outputs if "classification" in output.parameters}
    for output, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
        dt = dtypes.datatype(output.datatype)
        array = dtypes.decode_raw(dt, list(output.shape), raw, name=output.name)
        if output.name in classified:
            assert output.datatype == "BYTES"
        elif model.name != "fuzz_batch":
            assert list(array.shape) == list(given["inp"].shape)
    if model.name == "fuzz_fp32" and request.raw_input_contents and not classified:
        assert reply.raw_output_contents[0] == request.raw_input_contents[0]


async def _assert_healthy(suite: Suite) -> None:
    ready = await suite.inference.ServerReady(pb.ServerReadyRequest(), timeout=CALL_TIMEOUT_S)
    assert ready.ready
    assert suite.worker is not None and suite.worker.is_ready


def _no_error_logs(logs: list[dict[str, object]]) -> None:
    errors = [entry for entry in logs if entry.get("log_level") in ("error", "critical")]
    assert not errors, f"error logged: {errors}"


# --- the fuzz ---------------------------------------------------------------------------------


@FUZZ
@given(drawn=infer_requests())
async def test_every_infer_request_gets_a_clear_status(fuzz_suite: Suite, drawn: Drawn) -> None:
    with capture_logs() as logs:
        await _infer_and_check(fuzz_suite, drawn)
        await _assert_healthy(fuzz_suite)
    _no_error_logs(logs)


async def _infer_and_check(suite: Suite, drawn: Drawn) -> None:
    try:
        reply = await suite.inference.ModelInfer(drawn.request, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        _check_error(err)
    else:
        event("OK")
        _check_reply(drawn, reply)


@settings(FUZZ, max_examples=EXAMPLES // 3)
@given(calls=st.lists(infer_requests(), min_size=2, max_size=6))
async def test_concurrent_calls_batched_together_each_get_their_own_status(
    fuzz_suite: Suite, calls: list[Drawn]
) -> None:
    # Calls in flight together reach the worker in one batch: a bad one must fail alone.
    with capture_logs() as logs:
        await asyncio.gather(*(_infer_and_check(fuzz_suite, drawn) for drawn in calls))
        await _assert_healthy(fuzz_suite)
    _no_error_logs(logs)


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(message=raw_messages())
async def test_any_bytes_as_a_request_get_a_clear_status(fuzz_suite: Suite, message: bytes) -> None:
    call = fuzz_suite.channel.unary_unary(INFER)  # identity (de)serializers: bytes in, bytes out
    with capture_logs() as logs:
        try:
            reply = await call(message, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            _check_error(err)
        else:
            event("OK")
            pb.ModelInferResponse.FromString(reply)
        await _assert_healthy(fuzz_suite)
    _no_error_logs(logs)


async def test_the_suite_still_serves_after_the_fuzz(fuzz_suite: Suite) -> None:
    await _assert_healthy(fuzz_suite)
    request = pb.ModelInferRequest(model_name="fuzz_batch")
    request.inputs.add(name="a", datatype="INT64", shape=[2, 3])
    request.inputs.add(name="b", datatype="INT64", shape=[2, 3])
    a, b = np.arange(6, dtype="<i8"), np.full(6, 3, dtype="<i8")
    request.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    request.outputs.add(name="prod")
    reply = await fuzz_suite.inference.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    assert [output.name for output in reply.outputs] == ["prod"]
    assert np.frombuffer(reply.raw_output_contents[0], "<i8").tolist() == (a * b).tolist()


# --- what the fuzz found ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["99999999999999999999", str(2**63), "\u00b2"])
async def test_a_version_the_registry_cannot_hold_is_invalid_argument(fuzz_suite: Suite, version: str) -> None:
    # Found by the fuzz: these passed isdigit() and then broke int() or the registry's int64 (INTERNAL).
    request = pb.ModelInferRequest(model_name="fuzz_fp32", model_version=version)
    request.inputs.add(name="inp", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend([0.0] * 6)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fuzz_suite.inference.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"model_version for model 'fuzz_fp32' must be a positive integer, got '{version}'"


async def test_the_largest_int64_version_is_looked_up(fuzz_suite: Suite) -> None:
    request = pb.ModelInferRequest(model_name="fuzz_fp32", model_version=str(2**63 - 1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fuzz_suite.inference.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == f"model 'fuzz_fp32' has no version {2**63 - 1}"
