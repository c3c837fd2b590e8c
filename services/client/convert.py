"""KServe v2 messages <-> numpy for the client: requests from arrays, results from replies."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from inference import grpc_service_pb2 as pb
from services.client.results import InferResult, ModelMetadata, TextPiece
from services.common import dtypes, generation
from services.common.errors import FailedPrecondition, InvalidArgument, MaasError, error_for_code
from services.common.metadata import TensorSpec


def version_string(version: int | str | None) -> str:
    """Return the wire form of a version: '' (the deployed one) for None."""
    return "" if version is None else str(version)


def infer_request(
    model: str, inputs: Mapping[str, npt.ArrayLike], *, version: str, outputs: Iterable[str]
) -> pb.ModelInferRequest:
    """Build a ModelInferRequest with raw contents; each input's datatype follows its numpy dtype.

    Raises:
        InvalidArgument: An input's dtype has no KServe v2 datatype.
    """
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, value in inputs.items():
        array = np.asarray(value)
        try:
            datatype = dtypes.from_numpy(array.dtype)
        except InvalidArgument as exc:
            raise InvalidArgument(f"input '{name}': {exc.message}") from None
        request.inputs.add(name=name, datatype=datatype.name, shape=array.shape)
        request.raw_input_contents.append(dtypes.encode_raw(array))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def infer_result(response: pb.ModelInferResponse) -> InferResult:
    """Decode every output of a reply into a numpy array.

    Raises:
        MaasError: The reply carries typed contents instead of raw ones (MaaS always sends raw).
    """
    if len(response.raw_output_contents) != len(response.outputs):
        raise MaasError(f"reply has {len(response.outputs)} outputs but {len(response.raw_output_contents)} raw ones")
    outputs: dict[str, npt.NDArray[Any]] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        datatype = dtypes.datatype(tensor.datatype)
        outputs[tensor.name] = dtypes.decode_raw(datatype, tuple(tensor.shape), raw, name=tensor.name)
    return InferResult(outputs, model_name=response.model_name, model_version=response.model_version)


def _spec(tensor: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    return TensorSpec(name=tensor.name, datatype=tensor.datatype, shape=tuple(tensor.shape))


def metadata_from_proto(response: pb.ModelMetadataResponse) -> ModelMetadata:
    """Convert a ModelMetadataResponse."""
    return ModelMetadata(
        name=response.name,
        versions=tuple(response.versions),
        platform=response.platform,
        inputs=tuple(_spec(t) for t in response.inputs),
        outputs=tuple(_spec(t) for t in response.outputs),
    )


def metadata_request(model: str, version: str) -> pb.ModelMetadataRequest:
    """Build a ModelMetadataRequest."""
    return pb.ModelMetadataRequest(name=model, version=version)


def ready_request(model: str, version: str) -> pb.ModelReadyRequest:
    """Build a ModelReadyRequest."""
    return pb.ModelReadyRequest(name=model, version=version)


_REAL_OPTIONS = ("temperature", "top_p")
"""Generation parameters that are real numbers: sent as ``double_param`` even when given as ints."""


def generation_request(model: str, prompt: str, *, version: str, options: Mapping[str, object]) -> pb.ModelInferRequest:
    """Build a generative model's request: the prompt (BYTES [1]) and the generation parameters.

    Each option becomes a parameter of its kind: bool -> ``bool_param``, int -> ``int64_param``,
    float (and ``temperature``, ``top_p``) -> ``double_param``; the gateway checks names, kinds and ranges.

    Raises:
        InvalidArgument: An option's value is of another type.
    """
    request = infer_request(
        model, {generation.PROMPT: np.array([prompt.encode()], dtype=object)}, version=version, outputs=()
    )
    for name, value in options.items():
        parameter = request.parameters[name]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int) and name not in _REAL_OPTIONS:
            parameter.int64_param = value
        elif isinstance(value, int | float):
            parameter.double_param = float(value)
        else:
            raise InvalidArgument(f"parameter '{name}' must be a bool, int or float, got {type(value).__name__}")
    return request


def generated_text(result: InferResult) -> str:
    """The whole text of a generative model's ModelInfer reply.

    Raises:
        MaasError: The reply has no ``text`` output of one element (not a generative model's).
    """
    text = result.get(generation.TEXT)
    if text is None or text.size != 1:
        raise MaasError(f"reply has no '{generation.TEXT}' output of one element: is the model generative?")
    return bytes(text.reshape(-1)[0]).decode(errors="replace")


def generated_answer(response: pb.ModelInferResponse) -> TextPiece:
    """A generative model's whole ModelInfer answer, as one final piece with its finish reason.

    Raises:
        MaasError: The reply has no ``text`` output of one element (not a generative model's).
    """
    return TextPiece(
        text=generated_text(infer_result(response)),
        is_final=True,
        finish_reason=_string_parameter(response, generation.FINISH_REASON),
        model_version=response.model_version,
    )


class PieceDecoder:
    """Turns one generation's ModelStreamInfer responses into ``TextPiece`` records.

    Text is decoded incrementally, so a character split between two responses comes out whole.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, response: pb.ModelStreamInferResponse) -> TextPiece:
        """Decode one response.

        Raises:
            MaasError: The response is the request's error (the taxonomy class of its ``error_code``).
            FailedPrecondition: The response is not a generation's (an ordinary model answered).
        """
        infer = response.infer_response
        if response.error_message:
            code = _string_parameter(infer, "error_code")
            status = grpc.StatusCode.__members__.get(code, grpc.StatusCode.INTERNAL)
            raise error_for_code(status, response.error_message)
        if generation.FINAL not in infer.parameters:
            raise FailedPrecondition(
                f"model '{infer.model_name}' is not a generative model: its answer has no "
                f"'{generation.FINAL}' parameter (call it with infer)"
            )
        is_final = infer.parameters[generation.FINAL].bool_param
        raw = b""
        if infer.raw_output_contents:
            [raw] = dtypes.decode_bytes(infer.raw_output_contents[0], 1, name=generation.TEXT)
        return TextPiece(
            text=self._utf8.decode(bytes(raw), final=is_final),
            is_final=is_final,
            finish_reason=_string_parameter(infer, generation.FINISH_REASON),
            model_version=infer.model_version,
        )


def _string_parameter(response: pb.ModelInferResponse, name: str) -> str:
    return response.parameters[name].string_param if name in response.parameters else ""
