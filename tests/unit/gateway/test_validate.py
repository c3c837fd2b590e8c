"""The gateway's request validation: every bad input gets a precise INVALID_ARGUMENT message."""

from __future__ import annotations

import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.metadata import TensorSpec, VersionRecord
from services.gateway import convert
from services.gateway.clients import parse_version
from services.gateway.router import validate

VERSION = VersionRecord(
    model="affine",
    version=1,
    sha256="0" * 64,
    size_bytes=1,
    inputs=(TensorSpec("x", "FP32", (-1, 4)), TensorSpec("s", "BYTES", (-1,))),
    outputs=(TensorSpec("y", "FP32", (-1, 4)),),
    created_at_ms=0,
)


def _request(**overrides: object) -> pb.ModelInferRequest:
    x = np.ones((2, 4), np.float32)
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.inputs.add(name="s", datatype="BYTES", shape=[2])
    request.raw_input_contents.extend([x.tobytes(), b"\x01\x00\x00\x00a\x01\x00\x00\x00b"])
    for key, value in overrides.items():
        if key == "raw_x":
            request.raw_input_contents[0] = value  # type: ignore[assignment]
        elif key == "shape_x":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)  # type: ignore[arg-type]
        elif key == "datatype_x":
            request.inputs[0].datatype = value  # type: ignore[assignment]
        elif key == "output":
            request.outputs.add(name=value)  # type: ignore[arg-type]
    return request


def test_valid_request_passes() -> None:
    validate(convert.infer_call(_request(output="y")), VERSION)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"raw_x": b"\x00" * 12}, "input 'x': raw_input_contents has 12 bytes, expected 32"),
        ({"shape_x": [8]}, "input 'x': shape [8] has rank 1, expected rank 2 (model shape [-1, 4])"),
        ({"shape_x": [4, 2]}, "input 'x': dimension 1 is 2, expected 4 (model shape [-1, 4])"),
        ({"shape_x": [-2, 4]}, "input 'x': dimension 0 is -2, expected a size >= 0"),
        ({"datatype_x": "FP64"}, "input 'x': datatype FP64 does not match the model, expected FP32"),
        ({"datatype_x": "FP8"}, "datatype 'FP8' is not supported; expected one of BOOL"),
        ({"output": "z"}, "unknown output 'z': model 'affine' has 'y'"),
    ],
)
def test_bad_inputs_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(convert.infer_call(_request(**overrides)), VERSION)
    assert message in info.value.message


def test_missing_and_unknown_inputs() -> None:
    request = _request()
    request.inputs[1].name = "t"
    with pytest.raises(InvalidArgument, match="unknown input 't': model 'affine' expects 'x', 's'"):
        validate(convert.infer_call(request), VERSION)
    del request.inputs[1]
    del request.raw_input_contents[1]
    with pytest.raises(InvalidArgument, match="missing input 's'"):
        validate(convert.infer_call(request), VERSION)


def test_raw_contents_count_must_match_inputs() -> None:
    request = _request()
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidArgument, match="raw_input_contents has 3 entries, expected one per input"):
        validate(convert.infer_call(request), VERSION)


def test_typed_contents_are_counted() -> None:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3])
    request.inputs.add(name="s", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a")
    with pytest.raises(InvalidArgument, match="input 'x': contents has 3 elements, expected 4"):
        validate(convert.infer_call(request), VERSION)
    request.inputs[0].contents.fp32_contents.append(4)
    validate(convert.infer_call(request), VERSION)


def test_fp16_needs_raw_contents() -> None:
    version = VersionRecord(
        model="half", version=1, sha256="0" * 64, size_bytes=1, inputs=(TensorSpec("h", "FP16", (2,)),),
        outputs=(), created_at_ms=0,
    )  # fmt: skip
    request = pb.ModelInferRequest(model_name="half")
    request.inputs.add(name="h", datatype="FP16", shape=[2]).contents.SetInParent()
    with pytest.raises(InvalidArgument, match="input 'h': FP16 tensors must be sent in raw_input_contents"):
        validate(convert.infer_call(request), version)


def test_input_without_data() -> None:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.inputs.add(name="s", datatype="BYTES", shape=[1])
    with pytest.raises(InvalidArgument, match="input 'x' has no data"):
        validate(convert.infer_call(request), VERSION)


@pytest.mark.parametrize(("text", "number"), [("", 0), ("1", 1), ("42", 42)])
def test_parse_version(text: str, number: int) -> None:
    assert parse_version("m", text) == number


@pytest.mark.parametrize("text", ["0", "-1", "v1", "1.0", "latest"])
def test_parse_version_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match=f"model_version for model 'm' must be a positive integer, got '{text}'"):
        parse_version("m", text)


def test_model_config_excludes_batch_dimension_when_batched() -> None:
    from services.common.metadata import DeploymentRecord

    deployment = DeploymentRecord(model="affine", version=1, max_batch_size=16)
    config = convert.model_config(VERSION, deployment, {"max_request_tensor_bytes": 1024}).config
    assert config.max_batch_size == 16
    assert list(config.input[0].dims) == [4]
    assert config.platform == "onnxruntime_onnx"
    assert config.parameters["max_request_tensor_bytes"].string_value == "1024"
    unbatched = convert.model_config(VERSION, None, {}).config
    assert unbatched.max_batch_size == 0
    assert list(unbatched.input[0].dims) == [-1, 4]


def _rejected(request: pb.ModelInferRequest, max_batch_size: int = 0) -> str:
    with pytest.raises(InvalidArgument) as info:
        validate(convert.infer_call(request), VERSION, max_batch_size)
    return info.value.message


def test_raw_and_typed_contents_together_are_refused() -> None:
    request = _request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 8)
    assert _rejected(request) == (
        "input 'x': both raw_input_contents and contents are set; send the data in one of them"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x09\x00\x00\x00a", "input 's': BYTES element 0 claims 9 bytes past the end"),
        (b"\xff\xff\xff\xffa", "input 's': BYTES element 0 claims 4294967295 bytes past the end"),
        (b"\x01\x00\x00\x00a", "input 's': BYTES contents end before element 1 of 2"),
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x00", "input 's': BYTES contents have 1 bytes after 2 elements"),
    ],
)
def test_bytes_framing_is_checked_before_enqueueing(raw: bytes, message: str) -> None:
    request = _request()
    request.raw_input_contents[1] = raw
    assert _rejected(request) == message


@pytest.mark.parametrize(
    ("where", "name", "message"),
    [
        ("request", "sequence_id", "parameter 'sequence_id' is not supported: MaaS serves stateless models only"),
        ("request", "priority", "parameter 'priority' is not supported: MaaS does not implement it; remove it"),
        ("input", "shared_memory_region", "input 'x': parameter 'shared_memory_region' is not supported: shared"),
        ("output", "binary_data", "output 'y': parameter 'binary_data' is not supported: MaaS does not implement"),
    ],
)
def test_parameters_maas_does_not_implement_are_refused(where: str, name: str, message: str) -> None:
    request = _request(output="y")
    holder = {"request": request, "input": request.inputs[0], "output": request.outputs[0]}[where]
    holder.parameters[name].int64_param = 1
    assert _rejected(request).startswith(message)


def test_batch_size_is_checked_against_the_deployment() -> None:
    request = _request()
    validate(convert.infer_call(request), VERSION, 2)
    expected = "input 'x': batch size 2 exceeds the deployment's max_batch_size 1; split the request"
    assert _rejected(request, 1) == expected
