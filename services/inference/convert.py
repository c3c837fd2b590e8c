"""KServe v2 messages <-> the worker's domain objects; the only protobuf user besides servicer.py."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf.message import DecodeError

from inference import grpc_service_pb2 as pb
from services.common import generation
from services.common.dtypes import DataType, check_utf8, datatype, decode_raw, element_count, encode_raw, from_numpy
from services.common.errors import InvalidArgument
from services.common.metadata import PLATFORM, TensorSpec
from services.inference import classify
from services.inference.runtime import Array, InferRequest, InferResult, ModelRuntime


def decode_infer_request(payload: bytes) -> InferRequest:
    """Decode a serialized ``ModelInferRequest`` (as queued by the gateway).

    Raises:
        InvalidArgument: The payload is not a valid request (the message names the field).
    """
    try:
        message = pb.ModelInferRequest.FromString(payload)
    except DecodeError:
        raise InvalidArgument("request payload is not a serialized ModelInferRequest") from None
    return infer_request_from_proto(message)


def infer_request_from_proto(message: pb.ModelInferRequest) -> InferRequest:
    """Decode a ``ModelInferRequest`` into numpy inputs and requested output names.

    Raises:
        InvalidArgument: A tensor's datatype, shape or contents are malformed.
    """
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; "
            "send one entry per input or none"
        )
    inputs: dict[str, Array] = {}
    for index, tensor in enumerate(message.inputs):
        if not tensor.name:
            raise InvalidArgument(f"inputs[{index}].name is empty")
        if tensor.name in inputs:
            raise InvalidArgument(f"input '{tensor.name}' appears more than once")
        inputs[tensor.name] = _decode_input(tensor, raw[index] if raw else None)
    outputs = tuple(dict.fromkeys(output.name for output in message.outputs))
    if "" in outputs:
        raise InvalidArgument("outputs[].name is empty")
    return InferRequest(
        id=message.id,
        inputs=inputs,
        outputs=outputs,
        model=message.model_name,
        version=message.model_version,
        class_counts=_class_counts(message.outputs),
        parameters=tuple(_typed_parameter(name, value) for name, value in message.parameters.items()),
    )


def _typed_parameter(name: str, parameter: pb.InferParameter) -> tuple[str, str | None, object]:
    kind = parameter.WhichOneof("parameter_choice")
    return name, kind, getattr(parameter, kind) if kind else None


def _class_counts(outputs: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor]) -> dict[str, int]:
    """The ``classification`` parameters (class_count) of the requested outputs, by output name."""
    counts: dict[str, int] = {}
    for output in outputs:
        if classify.PARAMETER in output.parameters:
            parameter = output.parameters[classify.PARAMETER]
            kind = parameter.WhichOneof("parameter_choice")
            counts[output.name] = classify.check_class_count(output.name, kind, parameter.int64_param)
    return counts


def _decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Array:
    name = tensor.name
    try:
        dt = datatype(tensor.datatype)
    except InvalidArgument as exc:
        raise InvalidArgument(f"input '{name}': {exc.message}") from None
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension")
    array = decode_raw(dt, shape, raw, name=name) if raw is not None else _decode_contents(dt, shape, tensor)
    if dt.itemsize is None:
        check_utf8(array, name=name)
    return array


def _decode_contents(dt: DataType, shape: tuple[int, ...], tensor: pb.ModelInferRequest.InferInputTensor) -> Array:
    name = tensor.name
    field = dt.contents_field
    if field is None:
        raise InvalidArgument(f"input '{name}': {dt.name} tensors must be sent in raw_input_contents")
    values = list(getattr(tensor.contents, field))
    count = element_count(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': contents.{field} has {len(values)} elements, expected {count} for shape {list(shape)}"
        )
    if dt.itemsize is None:
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    try:
        return np.array(values, dtype=dt.numpy).reshape(shape)
    except OverflowError:
        raise InvalidArgument(f"input '{name}': a value in contents.{field} does not fit {dt.name}") from None


def infer_response_to_proto(result: InferResult) -> pb.ModelInferResponse:
    """Build a ``ModelInferResponse`` with raw output contents, in the result's output order."""
    response = pb.ModelInferResponse(model_name=result.model, model_version=str(result.version), id=result.id)
    for name, array in result.outputs.items():
        response.outputs.add(name=name, datatype=from_numpy(array.dtype).name, shape=list(array.shape))
        response.raw_output_contents.append(encode_raw(array))
    return response


def encode_generation_response(result: InferResult, finish_reason: str) -> bytes:
    """Serialize a generation's whole answer: ``result`` with its ``finish_reason`` response parameter."""
    response = infer_response_to_proto(result)
    response.parameters[generation.FINISH_REASON].string_param = finish_reason
    return bytes(response.SerializeToString())


def encode_infer_response(result: InferResult) -> bytes:
    """Serialize ``infer_response_to_proto(result)`` (the payload of a queue reply)."""
    return bytes(infer_response_to_proto(result).SerializeToString())


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def model_metadata_to_proto(runtime: ModelRuntime, versions: Sequence[int]) -> pb.ModelMetadataResponse:
    """Describe a loaded model: its loaded versions, platform and signature."""
    return pb.ModelMetadataResponse(
        name=runtime.model,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[_tensor_metadata(t) for t in runtime.signature.inputs],
        outputs=[_tensor_metadata(t) for t in runtime.signature.outputs],
    )
