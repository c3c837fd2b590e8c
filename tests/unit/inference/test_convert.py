"""ModelInferRequest/Response <-> domain objects, through real protobuf messages."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from services.common.dtypes import DATATYPES, decode_raw, encode_raw
from services.common.errors import InvalidArgument
from services.inference import convert
from services.inference.runtime import InferResult

SAMPLES: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[-1.5, 0.25, 3.0e38]], dtype=np.float32),
    "FP64": np.array([[-1.5, 0.25, 1.0e300]], dtype=np.float64),
    "BYTES": np.array([[b"", b"a", "\u00e9t\u00e9".encode()]], dtype=object),
}
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The KServe v2 rule: which ``InferTensorContents`` field carries each datatype."""


def test_samples_cover_every_datatype() -> None:
    assert set(SAMPLES) == set(DATATYPES)


def request_with_raw(name: str, datatype: str, array: np.ndarray[Any, Any]) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="m",
        id="req-1",
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(array.shape))],
        raw_input_contents=[encode_raw(array)],
    )


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_raw_contents_round_trip(datatype: str) -> None:
    sample = SAMPLES[datatype]
    request = convert.infer_request_from_proto(request_with_raw("t", datatype, sample))

    decoded = request.inputs["t"]
    assert decoded.shape == sample.shape
    assert decoded.dtype == DATATYPES[datatype].numpy
    assert decoded.tolist() == sample.tolist()
    assert request.id == "req-1"
    assert request.model == "m"


@pytest.mark.parametrize("datatype", list(CONTENTS_FIELD))
def test_typed_contents_decode(datatype: str) -> None:
    sample = SAMPLES[datatype]
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype=datatype, shape=list(sample.shape))
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(sample.reshape(-1).tolist())
    request = convert.infer_request_from_proto(pb.ModelInferRequest(inputs=[tensor]))

    assert request.inputs["t"].dtype == DATATYPES[datatype].numpy
    assert request.inputs["t"].tolist() == sample.tolist()


def test_serialized_request_decodes_with_requested_outputs_in_order() -> None:
    message = request_with_raw("x", "FP32", np.ones((2, 4), dtype=np.float32))
    message.outputs.add(name="b")
    message.outputs.add(name="a")
    message.outputs.add(name="b")
    message.model_version = "3"

    request = convert.decode_infer_request(message.SerializeToString())

    assert request.outputs == ("b", "a")
    assert request.version == "3"
    assert request.inputs["x"].tolist() == [[1.0] * 4] * 2


def invalid(message: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidArgument) as info:
        convert.infer_request_from_proto(message)
    return info.value.message


def test_garbage_payload_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="not a serialized ModelInferRequest"):
        convert.decode_infer_request(b"\xff\xff\xff\xff")


def test_raw_contents_count_must_match_inputs() -> None:
    message = request_with_raw("x", "FP32", np.ones((1, 4), dtype=np.float32))
    message.raw_input_contents.append(b"")
    assert "raw_input_contents has 2 entries for 1 inputs" in invalid(message)


def test_raw_byte_size_mismatch_names_the_input() -> None:
    message = request_with_raw("x", "FP32", np.ones((1, 4), dtype=np.float32))
    message.inputs[0].shape[:] = [1, 5]
    assert invalid(message).startswith("input 'x': raw contents have 16 bytes, expected 20")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: setattr(t, "datatype", "FLOAT"), "input 't': datatype 'FLOAT' is not supported"),
        (lambda t: t.shape.__setitem__(0, -1), "input 't': shape [-1, 3] has a negative dimension"),
        (lambda t: setattr(t, "name", ""), "inputs[0].name is empty"),
    ],
)
def test_malformed_tensor_fields_are_named(mutate: Any, expected: str) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype="INT32", shape=[1, 3])
    tensor.contents.int_contents.extend([1, 2, 3])
    mutate(tensor)
    assert expected in invalid(pb.ModelInferRequest(inputs=[tensor]))


def test_duplicate_input_is_rejected() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype="INT32", shape=[1])
    tensor.contents.int_contents.append(1)
    assert invalid(pb.ModelInferRequest(inputs=[tensor, tensor])) == "input 't' appears more than once"


def test_typed_contents_count_must_match_shape() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    message = invalid(pb.ModelInferRequest(inputs=[tensor]))
    assert message == "input 't': contents.fp32_contents has 3 elements, expected 4 for shape [2, 2]"


def test_typed_contents_out_of_range_is_rejected() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype="INT8", shape=[1])
    tensor.contents.int_contents.append(300)
    assert (
        invalid(pb.ModelInferRequest(inputs=[tensor]))
        == "input 't': a value in contents.int_contents does not fit INT8"
    )


def test_fp16_needs_raw_contents() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype="FP16", shape=[1])
    assert (
        invalid(pb.ModelInferRequest(inputs=[tensor])) == "input 't': FP16 tensors must be sent in raw_input_contents"
    )


def test_response_carries_outputs_in_order_with_raw_contents() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    labels = np.array(["cat", "d\u00f6g"], dtype=object)
    result = InferResult(model="m", version=7, id="abc", outputs={"y": y, "labels": labels})

    response = pb.ModelInferResponse.FromString(convert.encode_infer_response(result))

    assert (response.model_name, response.model_version, response.id) == ("m", "7", "abc")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "FP32", [2, 3]),
        ("labels", "BYTES", [2]),
    ]
    assert decode_raw(DATATYPES["FP32"], [2, 3], response.raw_output_contents[0], name="y").tolist() == y.tolist()
    texts = decode_raw(DATATYPES["BYTES"], [2], response.raw_output_contents[1], name="labels")
    assert [t.decode() for t in texts] == ["cat", "d\u00f6g"]
