"""KServe v2 messages <-> numpy for the client: requests from arrays, results from replies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from inference import grpc_service_pb2 as pb
from services.client.results import InferResult, ModelMetadata
from services.common import dtypes
from services.common.errors import InvalidArgument, MaasError
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
